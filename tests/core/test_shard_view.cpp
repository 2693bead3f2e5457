// SPDX-License-Identifier: MIT
// ShardView and FlatLayout (polyak/core/shard_view.hpp): one member's range of a flat model, on
// ThreadCommunicator (threads stand for ranks). Its checkpoints: checkpoint/test_distributed_checkpoint.cpp.
#include "polyak/core/shard_view.hpp"

#include "support.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "polyak/core/averaged_model.hpp"

using polyak::FlatLayout;
using polyak::ShardView;
using polyak::ThreadCommunicator;
using polyak_test::on_threads;

namespace {

FlatLayout model_layout() {
  FlatLayout layout;
  layout.add("a", {3, 5}).add("b", {7}).add("c", {2, 2, 2}).add("d", {1});  // 31 scalars
  return layout;
}

}  // namespace

TEST_CASE("FlatLayout lays tensors end to end, FlatLayout::of takes a list's names and shapes", "[shard]") {
  const FlatLayout layout = model_layout();
  REQUIRE(layout.numel() == 31);
  const std::vector<std::size_t> offsets = {0, 15, 22, 30};
  for (std::size_t i = 0; i < offsets.size(); ++i) CHECK(layout.tensors()[i].offset == offsets[i]);

  Eigen::MatrixXf a(3, 5);  // column-major: a flat model is row-major all the same
  Eigen::VectorXf b(7), d(1);
  Eigen::Matrix<float, 2, 4, Eigen::RowMajor> c;
  polyak::ParameterList<float> list;
  list.add("a", a).add("b", b).add("c", polyak::TensorView<float>(c.data(), {2, 2, 2})).add("d", d);
  const FlatLayout of = FlatLayout::of(list);
  CHECK(of.hash() == layout.hash());
  REQUIRE(of.tensors().size() == 4);
  CHECK(of.tensors()[0].shape == std::vector<std::int64_t>{3, 5});
  CHECK(of.numel() == 31);
  FlatLayout renamed;
  renamed.add("a", {3, 5}).add("b", {7}).add("c", {2, 4}).add("d", {1});  // one shape differs
  CHECK(renamed.hash() != layout.hash());
  CHECK_THROWS_AS(FlatLayout().add("a", {2}).add("a", {3}), polyak::InvalidArgument);
  CHECK_THROWS_AS(FlatLayout().add("", {2}), polyak::InvalidArgument);
  CHECK_THROWS_AS(FlatLayout().add("a", {-1}), polyak::InvalidArgument);
}

TEST_CASE("even_shard cuts a model into ranges differing by at most one scalar that cover it exactly",
          "[shard]") {
  for (const std::size_t numel : {std::size_t{0}, std::size_t{1}, std::size_t{31}, std::size_t{32}}) {
    for (const int members : {1, 3, 4, 7}) {
      std::size_t next = 0;
      for (int r = 0; r < members; ++r) {
        const polyak::ShardRange range = polyak::even_shard(numel, r, members);
        CHECK(range.begin == next);
        const std::size_t size = range.end - range.begin;
        CHECK((size == numel / members || size == numel / members + 1));
        CHECK((size == numel / members + 1) == (static_cast<std::size_t>(r) < numel % members));
        next = range.end;
      }
      CHECK(next == numel);
    }
  }
  // Near the top of size_t: no product overflows.
  const std::size_t huge = ~std::size_t{0};
  CHECK(polyak::even_shard(huge, 6, 7).end == huge);
  CHECK_THROWS_WITH(polyak::even_shard(10, 4, 4), Catch::Contains("rank 4 is not one of 4 members"));
  CHECK_THROWS_AS(polyak::even_shard(10, -1, 4), polyak::InvalidArgument);
  CHECK_THROWS_AS(polyak::even_shard(10, 0, 0), polyak::InvalidArgument);
}

TEST_CASE("a shard's pieces are each tensor's run inside the range, named as the tensor", "[shard]") {
  // (Catch2's assertions are not thread-safe: member 1 records what it sees, the test checks after.)
  std::vector<ShardView<float>::Piece> pieces;
  std::vector<std::string> names;
  std::vector<std::ptrdiff_t> starts;
  const auto errors = on_threads(3, [&](ThreadCommunicator& comm) {
    const polyak::ShardRange range = polyak::even_shard(31, comm.rank(), comm.size());  // 11, 10, 10
    std::vector<float> mine(range.end - range.begin);
    ShardView<float> shard(model_layout(), mine.data(), range, comm);
    if (comm.rank() != 1) return;
    pieces = shard.pieces();
    for (const auto& tensor : shard.parameters()) {
      names.push_back(tensor.name());
      starts.push_back(tensor.numel() > 0 ? tensor.data() - mine.data() : -1);
    }
  });
  for (const auto& e : errors) CHECK(e.empty());
  REQUIRE(pieces.size() == 4);  // member 1 holds [11, 21): a's last 4 scalars, b's first 6
  CHECK((pieces[0].offset == 11 && pieces[0].length == 4));
  CHECK((pieces[1].offset == 0 && pieces[1].length == 6));
  CHECK((pieces[2].length == 0 && pieces[3].length == 0));
  CHECK(names == std::vector<std::string>{"a", "b", "c", "d"});
  CHECK(starts == std::vector<std::ptrdiff_t>{0, 4, -1, -1});
}

TEST_CASE("shard ranges that do not cover the model exactly are refused on every member", "[shard]") {
  struct Case {
    std::vector<std::pair<std::size_t, std::size_t>> ranges;  // per member
    const char* message;
  };
  const std::vector<Case> cases = {
      {{{0, 9}, {10, 20}, {20, 31}}, "leave [9, 10) of the model's 31 scalars to no rank"},
      {{{0, 9}, {9, 20}, {20, 30}}, "end at 30, before the model's 31"},
      {{{0, 9}, {9, 20}, {20, 32}}, "rank 2's range [20, 32) reaches past the model's 31 scalars"},
      {{{0, 12}, {9, 20}, {20, 31}}, "rank 1's range [9, 20) overlaps another's, which ends at 12"},
      {{{0, 9}, {20, 10}, {9, 31}}, "rank 1's range [20, 10) ends before it begins"},
      {{{0, 31}, {0, 31}, {31, 31}}, "overlaps"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.message);
    const auto errors = on_threads(3, [&](ThreadCommunicator& comm) {
      const auto [begin, end] = c.ranges[static_cast<std::size_t>(comm.rank())];
      std::vector<float> mine(32);
      ShardView<float> shard(model_layout(), mine.data(), begin, end, comm);
    });
    for (const auto& e : errors)
      CHECK_THAT(e, Catch::Contains(c.message) && Catch::Contains("no shard was made"));
  }
  std::vector<std::string> errors;
  // Null data on one member, and members with different layouts.
  errors = on_threads(2, [&](ThreadCommunicator& comm) {
    std::vector<float> mine(32);
    ShardView<float> shard(model_layout(), comm.rank() == 0 ? nullptr : mine.data(),
                           comm.rank() == 0 ? 0 : 16, comm.rank() == 0 ? 16 : 31, comm);
  });
  for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("rank(s) 0 passed null data"));
  errors = on_threads(2, [&](ThreadCommunicator& comm) {
    std::vector<float> mine(32);
    FlatLayout layout = model_layout();
    if (comm.rank() == 1) layout.add("e", {1});
    ShardView<float> shard(layout, mine.data(), comm.rank() == 0 ? 0 : 16, comm.rank() == 0 ? 16 : 31, comm);
  });
  for (const auto& e : errors) CHECK_THAT(e, Catch::Contains("different layouts"));
}
