// SPDX-License-Identifier: MIT
// StateDict (polyak/checkpoint/state_dict.hpp): named tensors and text metadata, held in row-major
// order whatever the storage order they came from, owned or borrowed.
#include "polyak/checkpoint/state_dict.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

using polyak::StateDict;

TEST_CASE("a StateDict holds tensors row-major by logical index, whatever their storage order",
          "[state_dict]") {
  Eigen::MatrixXf column_major(2, 3);
  column_major << 1, 2, 3, 4, 5, 6;  // logical rows {1, 2, 3}, {4, 5, 6}
  StateDict sd;
  sd.insert("m", polyak::TensorView<float>(column_major.data(), {2, 3}, polyak::StorageOrder::ColMajor));
  const auto& stored = sd.at("m");
  CHECK(stored.dtype == polyak::DType::F32);
  CHECK(stored.shape == std::vector<std::int64_t>{2, 3});
  CHECK(polyak::to_doubles(stored) == std::vector<double>{1, 2, 3, 4, 5, 6});
  // Copied back into a column-major matrix of the same shape: the same logical values.
  Eigen::MatrixXf back = Eigen::MatrixXf::Zero(2, 3);
  sd.copy_to("m", polyak::TensorView<float>(back.data(), {2, 3}, polyak::StorageOrder::ColMajor));
  CHECK(back == column_major);
  // Into raw row-major memory.
  std::vector<float> row_major(6);
  sd.copy_to("m", row_major.data(), {2, 3});
  CHECK(row_major == std::vector<float>{1, 2, 3, 4, 5, 6});
}

TEST_CASE("names are unique and not empty, a missing tensor, another dtype or shape are FormatErrors",
          "[state_dict]") {
  StateDict sd;
  sd.insert_scalar("n_averaged", std::int64_t{7});
  CHECK(sd.scalar<std::int64_t>("n_averaged") == 7);
  CHECK_THROWS_WITH(sd.insert_scalar("n_averaged", std::int64_t{8}), Catch::Contains("already in it"));
  CHECK_THROWS_AS(sd.insert_scalar("", 1.0), polyak::InvalidArgument);
  CHECK_THROWS_AS(sd.insert_scalar("__metadata__", 1.0), polyak::InvalidArgument);
  CHECK(sd.size() == 1);
  CHECK_THROWS_WITH(sd.at("missing"), Catch::Contains("no tensor 'missing'"));
  CHECK_THROWS_WITH(sd.scalar<double>("n_averaged"), Catch::Contains("'n_averaged' is I64, expected F64"));
  CHECK_THROWS_WITH(sd.expect<std::int64_t>("n_averaged", {1}),
                    Catch::Contains("has shape [], expected [1]"));
  CHECK_THROWS_AS(sd.scalar<double>("missing"), polyak::FormatError);
}

TEST_CASE("merge prefixes names and metadata, extract takes them back", "[state_dict]") {
  StateDict inner;
  const std::vector<double> values = {1.5, -2.5};
  inner.insert("w", values.data(), {2});
  inner.metadata["decay"] = "0.999";
  StateDict outer;
  outer.insert_scalar("step", std::int64_t{3});
  outer.merge("ema.", inner);
  CHECK(outer.contains("ema.w"));
  CHECK(outer.metadata.at("ema.decay") == "0.999");
  CHECK_THROWS_AS(outer.merge("ema.", inner), polyak::InvalidArgument);  // its names again
  const StateDict back = outer.extract("ema.");
  CHECK(back.size() == 1);
  CHECK(polyak::to_doubles(back.at("w")) == values);
  CHECK(back.metadata == inner.metadata);
  std::vector<std::string> names;
  for (const auto& [name, tensor] : outer) names.push_back(name);
  CHECK(names == std::vector<std::string>{"step", "ema.w"});  // the order inserted
}

TEST_CASE("a borrowed entry shows its memory's later values, owned() is a snapshot", "[state_dict]") {
  Eigen::VectorXf weights(3);
  weights << 1, 2, 3;
  StateDict borrowed;
  borrowed.borrow("w", polyak::TensorView<float>(weights.data(), {3}));
  CHECK(borrowed.at("w").is_borrowed());
  const StateDict snapshot = borrowed.owned();
  CHECK_FALSE(snapshot.at("w").is_borrowed());
  weights << 7, 8, 9;
  CHECK(polyak::to_doubles(borrowed.at("w")) == std::vector<double>{7, 8, 9});
  CHECK(polyak::to_doubles(snapshot.at("w")) == std::vector<double>{1, 2, 3});
}
