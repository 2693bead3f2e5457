// SPDX-License-Identifier: MIT
// Eigen's Tensor module first, polyak after: its forward declarations of Tensor and TensorMap must
// agree with Eigen's in either order (test_tensor_view.cpp includes them the other way round).
#include <unsupported/Eigen/CXX11/Tensor>

#include "polyak/checkpoint.hpp"
#include "polyak/checkpoint/safetensors.hpp"

#include "support.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "polyak/core/averaged_model.hpp"
#include "polyak/core/batch_norm.hpp"
#include "polyak/core/model_averaging.hpp"
#include "polyak/core/swag.hpp"
#include "polyak/core/swalr.hpp"

using polyak::DType;
using polyak::FormatError;
using polyak::StateDict;
using polyak::TensorView;

namespace {

using polyak_test::file_bytes;
using polyak_test::temporary_path;
using polyak_test::write_file;

/// A safetensors file from a header text and data bytes.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int b = 0; b < 8; ++b)
    out[static_cast<std::size_t>(b)] = static_cast<char>((header.size() >> (8 * b)) & 0xff);
  return out + header + data;
}

template <class T>
std::vector<T> values_of(const polyak::StoredTensor& stored) {
  const polyak::StoredTensor t = stored.owned();
  std::vector<T> out(t.bytes.size() / sizeof(T));
  std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
  return out;
}

}  // namespace

TEST_CASE("a state dict round-trips through safetensors, every dtype and the metadata", "[serialization]") {
  Eigen::Matrix<float, 2, 3, Eigen::RowMajor> f;
  f << 1, 2, 3, 4, 5, 6;
  Eigen::VectorXd d = Eigen::VectorXd::LinSpaced(5, -1.0, 1.0 / 3);
  Eigen::Matrix<Eigen::half, Eigen::Dynamic, 1> h(3);
  h << Eigen::half(0.5f), Eigen::half(-2.0f), Eigen::half(65504.0f);
  Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, 1> b(2);
  b << Eigen::bfloat16(3.0f), Eigen::bfloat16(-0.125f);
  StateDict sd;
  sd.insert("f", TensorView<float>(f.data(), {2, 3}));
  sd.insert("d", TensorView<double>(d.data(), {5}));
  sd.insert("h", TensorView<Eigen::half>(h.data(), {3}));
  sd.insert("b", TensorView<Eigen::bfloat16>(b.data(), {2}));
  sd.insert_scalar<std::int64_t>("count", -42);
  sd.metadata["note"] = "résumé \"quoted\"";
  const auto path = temporary_path("round_trip.safetensors");
  polyak::save_safetensors(path, sd);

  const StateDict back = polyak::load_safetensors(path);
  CHECK(back.size() == 5);
  std::vector<std::string> names;
  for (const auto& [name, tensor] : back) names.push_back(name);
  CHECK(names == std::vector<std::string>{"f", "d", "h", "b", "count"});  // the order kept
  CHECK(values_of<float>(back.at("f")) == std::vector<float>{1, 2, 3, 4, 5, 6});
  CHECK(back.at("f").shape == std::vector<std::int64_t>{2, 3});
  CHECK(values_of<double>(back.at("d")) == std::vector<double>(d.data(), d.data() + 5));
  CHECK(back.at("h").dtype == DType::F16);
  CHECK(static_cast<float>(values_of<Eigen::half>(back.at("h"))[2]) == 65504.0f);
  CHECK(static_cast<float>(values_of<Eigen::bfloat16>(back.at("b"))[1]) == -0.125f);
  CHECK(back.scalar<std::int64_t>("count") == -42);
  CHECK(back.at("count").shape.empty());
  CHECK(back.metadata.at("note") == "résumé \"quoted\"");
  // The data starts on an 8-byte boundary, as safetensors' writer aligns it.
  const auto bytes = file_bytes(path);
  std::uint64_t header = 0;
  for (int i = 7; i >= 0; --i)
    header = (header << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  CHECK(header % 8 == 0);
}

TEST_CASE("column-major tensors are written in row-major order, by logical index", "[serialization]") {
  Eigen::MatrixXf m(2, 3);  // column-major
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 3; ++j) m(i, j) = static_cast<float>(10 * i + j);
  }
  Eigen::Tensor<float, 3> t(2, 3, 4);  // column-major
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 3; ++j) {
      for (int k = 0; k < 4; ++k) t(i, j, k) = static_cast<float>(100 * i + 10 * j + k);
    }
  }
  polyak::ParameterList<float> list;
  list.add("m", m).add("t", t);
  StateDict sd;
  sd.insert("m", list[0].view());
  sd.insert("t", list[1].view());
  CHECK(values_of<float>(sd.at("m")) == std::vector<float>{0, 1, 2, 10, 11, 12});
  const auto stored = values_of<float>(sd.at("t"));
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 3; ++j) {
      for (int k = 0; k < 4; ++k) CHECK(stored[static_cast<std::size_t>((i * 3 + j) * 4 + k)] == t(i, j, k));
    }
  }
  // and back into column-major storage
  Eigen::MatrixXf m2 = Eigen::MatrixXf::Zero(2, 3);
  polyak::ParameterList<float> list2;
  list2.add("m", m2);
  sd.copy_to("m", list2[0].view());
  CHECK(m2 == m);
}

TEST_CASE("malformed files are FormatErrors that name the problem", "[serialization]") {
  const auto path = temporary_path("bad.safetensors");
  const std::string good_header = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string data(8, '\0');
  auto refused = [&](const std::string& bytes, const std::string& fragment) {
    write_file(path, bytes);
    CHECK_THROWS_WITH(polyak::load_safetensors(path), Catch::Contains(fragment));
    CHECK_THROWS_AS(polyak::load_safetensors(path), FormatError);
  };
  write_file(path, safetensors_bytes(good_header, data));
  CHECK(polyak::load_safetensors(path).size() == 1);

  refused("1234", "fewer than the 8");
  refused(safetensors_bytes(good_header, data).substr(0, 20), "runs past the end");
  refused(std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}", "exceeds");
  refused(safetensors_bytes("{\"x\":", ""), "not JSON");
  refused(safetensors_bytes("[1,2]", ""), "does not start with '{'");
  // Refused as Python's safetensors refuses them (issue 21, item 14): a byte-order mark or a space
  // first, a NUL (nlohmann's parser stopped there and ignored the rest), bytes after the object.
  refused(safetensors_bytes("\xef\xbb\xbf" + good_header, data), "does not start with '{'");
  refused(safetensors_bytes(" " + good_header, data), "does not start with '{'");
  refused(safetensors_bytes(good_header + std::string(3, '\0'), data), "NUL byte at offset");
  refused(safetensors_bytes(good_header + std::string(1, '\0') + "garbage", data), "NUL byte");
  refused(safetensors_bytes(good_header + "x", data), "not JSON");
  CHECK(polyak::load_safetensors((write_file(path, safetensors_bytes(good_header + " \n\t\r", data)), path))
            .size() == 1);  // JSON's whitespace after the object is what Python reads too
  // Every refusal names the file (item 13): with many inputs, the user knows which.
  refused(safetensors_bytes("{\"x\":", ""), "'" + path + "'");
  refused("1234", "'" + path + "'");
  refused(safetensors_bytes(R"({"x":{"dtype":"Q8","shape":[2],"data_offsets":[0,8]}})", data),
          "'" + path + "'");
  refused(safetensors_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                            R"("y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"x":{}})",
                            data),
          "the key 'x' appears twice");
  refused(safetensors_bytes(R"({"x":{"dtype":"Q8","shape":[2],"data_offsets":[0,8]}})", data),
          "unsupported dtype 'Q8'");
  refused(safetensors_bytes(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data),
          "need 3 elements");
  refused(safetensors_bytes(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data),
          "non-negative");
  refused(safetensors_bytes(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", data), "outside");
  refused(safetensors_bytes(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", data), "outside");
  refused(
      safetensors_bytes(
          R"({"x":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", data),
      "overflows");
  refused(safetensors_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                            R"("y":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
                            data),
          "overlap");
  refused(safetensors_bytes(R"({"x":{"dtype":"F32","shape":[2]}})", data), "needs exactly");
  refused(safetensors_bytes(R"({"__metadata__":{"k":1}})", ""), "not a string");
  // found by the fuzzer: an empty name was std::invalid_argument from StateDict, not a FormatError
  refused(safetensors_bytes(R"({"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", data),
          "empty string");
  // Every truncation of a good file is refused, never read past its end.
  const std::string whole = safetensors_bytes(good_header, data);
  for (std::size_t n = 0; n < whole.size(); ++n) {
    write_file(path, whole.substr(0, n));
    CHECK_THROWS_AS(polyak::load_safetensors(path), FormatError);
  }
}

TEST_CASE("saving replaces the file whole and leaves no temporary behind", "[serialization]") {
  const auto path = temporary_path("replace.safetensors");
  StateDict first, second;
  first.insert_scalar<double>("v", 1.0);
  second.insert_scalar<double>("v", 2.0);
  polyak::save_safetensors(path, first);
  polyak::save_safetensors(path, second);
  CHECK(polyak::load_safetensors(path).scalar<double>("v") == 2.0);
  for (const auto& entry : std::filesystem::directory_iterator(std::filesystem::path(path).parent_path())) {
    CHECK(entry.path().filename().string().find(".tmp.") == std::string::npos);
  }
  CHECK_THROWS(polyak::save_safetensors("/nonexistent-folder/x.safetensors", first));
}

// Issue 12, item 2: entries were sorted by start offset alone, so an empty tensor tied with the
// next one and polyak refused its own file.
TEST_CASE("a file with empty tensors round-trips", "[serialization]") {
  const auto path = temporary_path("empty_tensor.safetensors");
  StateDict sd;
  float one = 5.0f;
  sd.insert("b", TensorView<float>(nullptr, {0}));
  sd.insert("a", TensorView<float>(&one, {1}));
  sd.insert("c", TensorView<double>(nullptr, {3, 0}));
  polyak::save_safetensors(path, sd);
  const StateDict back = polyak::load_safetensors(path);
  REQUIRE(back.size() == 3);
  CHECK(back.at("b").shape == std::vector<std::int64_t>{0});
  CHECK(back.at("c").shape == std::vector<std::int64_t>{3, 0});
  CHECK(values_of<float>(back.at("a")) == std::vector<float>{5.0f});
}

// Issue 12, "promises": Python's safetensors refuses duplicate names, gaps between tensors and
// bytes after the last one; polyak accepted all three (the last duplicate won).
TEST_CASE("what Python's safetensors refuses, polyak refuses", "[serialization]") {
  const auto path = temporary_path("strict.safetensors");
  auto refused = [&](const std::string& header, const std::string& data, const std::string& fragment) {
    write_file(path, safetensors_bytes(header, data));
    CHECK_THROWS_AS(polyak::load_safetensors(path), FormatError);
    CHECK_THROWS_WITH(polyak::load_safetensors(path), Catch::Contains(fragment));
  };
  const std::string eight(8, '\0'), twelve(12, '\0');
  refused(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
          R"("x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
          eight, "'x' appears twice");
  refused(R"({"__metadata__":{"k":"1","k":"2"}})", "", "'k' appears twice");
  refused(R"({"x":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", eight,
          "'dtype' appears twice");
  refused(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
          R"("y":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
          twelve, "gap");
  refused(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight, "gap");
  refused(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight,
          "4 bytes after the last tensor");
  // the reading side of the same file, for the streaming readers
  write_file(path, safetensors_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight));
  CHECK_THROWS_AS(polyak::read_safetensors_header(path), FormatError);
}

TEST_CASE("every error polyak throws is a polyak::Error and the standard exception callers catch",
          "[serialization][errors]") {
  // An argument refused (a decay outside [0, 1]): std::invalid_argument, as before.
  REQUIRE_THROWS_AS(polyak::EMA{1.5}, polyak::Error);
  REQUIRE_THROWS_AS(polyak::EMA{1.5}, std::invalid_argument);
  REQUIRE_THROWS_AS(polyak::EMA{1.5}, polyak::InvalidArgument);
  // A file that is not safetensors: FormatError, a std::runtime_error.
  const std::string path = temporary_path("errors.safetensors");
  write_file(path, "not a safetensors file");
  REQUIRE_THROWS_AS(polyak::load_safetensors(path), polyak::FormatError);
  REQUIRE_THROWS_AS(polyak::load_safetensors(path), polyak::Error);
  REQUIRE_THROWS_AS(polyak::load_safetensors(path), std::runtime_error);
  // A file that cannot be created (its folder is missing): RuntimeError, with what() naming the path
  // through either base.
  const std::string missing = path + ".missing/state.safetensors";
  try {
    polyak::save_safetensors(missing, StateDict{});
    FAIL("saving into a missing folder did not throw");
  } catch (const polyak::Error& e) {
    REQUIRE(dynamic_cast<const polyak::RuntimeError*>(&e) != nullptr);
    REQUIRE(std::string(e.what()).find(missing) != std::string::npos);
  }
  std::remove(path.c_str());
}

TEST_CASE("SafetensorsReader::read_bytes reads any piece of a tensor, and refuses one outside it",
          "[serialization]") {
  std::vector<float> values(100);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.5f;
  StateDict sd;
  sd.insert_scalar("first", std::int64_t{5});
  sd.insert("w", values.data(), {10, 10});
  const std::string path = temporary_path("pieces.safetensors");
  polyak::save_safetensors(path, sd);
  polyak::SafetensorsReader reader(path);
  const auto& entry = reader.header().entries.at(1);
  REQUIRE(entry.name == "w");
  for (const std::size_t from : {std::size_t{0}, std::size_t{13}, std::size_t{99}}) {
    std::vector<float> piece(100 - from);
    reader.read_bytes(entry, from * sizeof(float), piece.size() * sizeof(float),
                      reinterpret_cast<std::byte*>(piece.data()));
    CHECK(piece == std::vector<float>(values.begin() + static_cast<std::ptrdiff_t>(from), values.end()));
  }
  std::byte sink[8];
  reader.read_bytes(entry, 400, 0, sink);  // an empty piece at the end is in range
  CHECK_THROWS_AS(reader.read_bytes(entry, 397, 4, sink), polyak::InvalidArgument);
  CHECK_THROWS_WITH(reader.read_bytes(entry, 401, 0, sink), Catch::Contains("lie outside tensor 'w'"));
  // A file cut short after it was opened: a FormatError naming the file, not a short read.
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 8);
  CHECK_THROWS_WITH(reader.read_bytes(entry, 0, 400, reinterpret_cast<std::byte*>(values.data())),
                    Catch::Contains(path) && Catch::Contains("cannot read tensor 'w'"));
}
