// SPDX-License-Identifier: MIT
#include "polyak/core/tensor_view.hpp"

#include <catch2/catch.hpp>
#include <unsupported/Eigen/CXX11/Tensor>  // the tensors viewed below (polyak does not include it)

#include <vector>

#include "test_types.hpp"

using polyak::ParameterList;
using polyak::StorageOrder;
using polyak::TensorView;
using Shape = std::vector<std::int64_t>;

TEST_CASE("views of Eigen matrices keep their pointer, logical shape and storage order", "[tensor_view]") {
  Eigen::MatrixXf col_major(3, 4);
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_major(2, 5);
  Eigen::ArrayXXf array(6, 2);
  Eigen::VectorXf vector(7);
  Eigen::RowVectorXf row_vector(3);
  std::vector<float> raw(8);
  Eigen::Map<Eigen::MatrixXf> map(raw.data(), 2, 4);

  ParameterList<float> list;
  list.add("col", col_major).add("row", row_major).add("array", array).add("vector", vector);
  list.add("row_vector", row_vector).add("map", map);

  REQUIRE(list.size() == 6);
  CHECK(list[0].shape() == Shape{3, 4});
  CHECK(list[0].storage_order() == StorageOrder::ColMajor);
  CHECK(list[0].data() == col_major.data());
  CHECK(list[1].shape() == Shape{2, 5});
  CHECK(list[1].storage_order() == StorageOrder::RowMajor);
  CHECK(list[2].shape() == Shape{6, 2});
  CHECK(list[3].shape() == Shape{7});
  CHECK(list[4].shape() == Shape{3});
  CHECK(list[5].shape() == Shape{2, 4});
  CHECK(list[5].data() == raw.data());
  CHECK(list.numel() == 12 + 10 + 12 + 7 + 3 + 8);
  CHECK_FALSE(list[0].is_buffer());
}

TEST_CASE("views of Eigen::Tensor, TensorMap and raw pointers", "[tensor_view]") {
  Eigen::Tensor<double, 4> conv(2, 3, 4, 5);
  Eigen::Tensor<double, 2, Eigen::RowMajor> row_major(3, 2);
  std::vector<double> raw(64 * 3 * 3 * 3), other(64);
  Eigen::TensorMap<Eigen::Tensor<double, 3>> mapped(other.data(), 4, 4, 4);

  ParameterList<double> list;
  list.add("conv", conv).add("row", row_major).add("mapped", mapped);
  list.add_buffer("raw", TensorView<double>(raw.data(), {64, 3, 3, 3}));

  CHECK(list[0].shape() == Shape{2, 3, 4, 5});
  CHECK(list[0].storage_order() == StorageOrder::ColMajor);
  CHECK(list[1].storage_order() == StorageOrder::RowMajor);
  CHECK(list[2].shape() == Shape{4, 4, 4});
  CHECK(list[2].data() == other.data());
  CHECK(list[3].shape() == Shape{64, 3, 3, 3});
  CHECK(list[3].storage_order() == StorageOrder::RowMajor);
  CHECK(list[3].is_buffer());
  CHECK(list[3].numel() == 64 * 27);
}

TEMPLATE_TEST_CASE("every supported scalar type can be viewed", "[tensor_view]", POLYAK_SCALAR_TYPES) {
  Eigen::Matrix<TestType, Eigen::Dynamic, 1> v(4);
  ParameterList<TestType> list;
  list.add("v", v);
  CHECK(list[0].data() == v.data());
  CHECK(list[0].numel() == 4);
}

TEST_CASE("contiguous sub-blocks are accepted, strided ones refused by name", "[tensor_view]") {
  Eigen::MatrixXf m(4, 6);
  ParameterList<float> list;
  list.add("column", m.col(0)).add("columns", m.middleCols(2, 3));
  CHECK(list[0].data() == &m(0, 0));
  CHECK(list[0].shape() == Shape{4});
  CHECK(list[1].shape() == Shape{4, 3});

  CHECK_THROWS_WITH(list.add("corner", m.block(0, 0, 2, 2)),
                    Catch::Contains("'corner'") && Catch::Contains("strided"));
  CHECK_THROWS_WITH(list.add("row", m.block(1, 0, 1, 6)),
                    Catch::Contains("'row'") && Catch::Contains("strided"));
  std::vector<float> raw(10);
  Eigen::Map<Eigen::VectorXf, 0, Eigen::InnerStride<>> every_other(raw.data(), 5, Eigen::InnerStride<>(2));
  CHECK_THROWS_WITH(list.add("every_other", every_other), Catch::Contains("strided"));
  CHECK(list.size() == 2);  // the refused views were not added
}

TEST_CASE("names must be unique and non-empty", "[tensor_view]") {
  Eigen::VectorXf a(2), b(2);
  ParameterList<float> list;
  list.add("a", a);
  CHECK_THROWS_WITH(list.add("a", b), Catch::Contains("'a'") && Catch::Contains("already"));
  CHECK_THROWS_AS(list.add_buffer("", b), std::invalid_argument);
  CHECK(list.size() == 1);
}

TEST_CASE("a raw view refuses negative extents and null data", "[tensor_view]") {
  float x = 0;
  CHECK_THROWS_WITH(TensorView<float>(&x, {2, -1}), Catch::Contains("negative"));
  CHECK_THROWS_WITH(TensorView<float>(nullptr, {3}), Catch::Contains("null"));
  CHECK_NOTHROW(TensorView<float>(nullptr, {0, 5}));
}

// Issue 12, item 2: a shape whose element count overflows was accepted with numel() == 0.
TEST_CASE("a shape whose element count overflows is refused", "[tensor_view]") {
  float x = 0;
  const std::int64_t big = std::int64_t{1} << 32;
  CHECK_THROWS_WITH(TensorView<float>(&x, {big, big}), Catch::Contains("overflows"));
  // counted left to right, as safetensors counts, so that what a view holds can be saved and loaded
  CHECK_THROWS_WITH(TensorView<float>(&x, {big, big, 0}), Catch::Contains("overflows"));
  double d = 0;
  CHECK_THROWS_WITH(TensorView<double>(&d, {std::int64_t{1} << 61}),
                    Catch::Contains("overflows"));  // 2^61 doubles: 2^64 bytes
  CHECK_NOTHROW(TensorView<float>(nullptr, {0, big}));
}

// Issue 12, item 3: the same memory listed twice (tied weights) was averaged twice, and swap then
// swap back destroyed the live values.
TEST_CASE("tensors that share memory are refused by name", "[tensor_view]") {
  Eigen::VectorXf embed = Eigen::VectorXf::Zero(6);
  ParameterList<float> list;
  list.add("embed", embed);
  CHECK_THROWS_WITH(list.add("head", embed), Catch::Contains("'head' shares memory with 'embed'"));
  Eigen::Map<Eigen::VectorXf> tail(embed.data() + 3, 3);  // a partial overlap
  CHECK_THROWS_WITH(list.add_buffer("tail", tail), Catch::Contains("'tail' shares memory with 'embed'"));
  CHECK(list.size() == 1);  // nothing added
  Eigen::VectorXf other = Eigen::VectorXf::Zero(6);
  Eigen::Map<Eigen::VectorXf> first_half(other.data(), 3), second_half(other.data() + 3, 3);
  list.add("first_half", first_half).add("second_half", second_half);  // adjacent, not shared
  CHECK(list.size() == 3);
}

// Issue 12, item 12: a viewed Eigen object resized after the view was made was read after free at
// the next update. The view remembers the object and asks it before each use.
TEST_CASE("a viewed Eigen object that was resized is detected by name", "[tensor_view]") {
  Eigen::VectorXf w = Eigen::VectorXf::Zero(4);
  Eigen::Tensor<float, 2> t(2, 2);
  ParameterList<float> list;
  list.add("w", w).add("t", t);
  CHECK_NOTHROW(list.check_storage());
  w.setOnes();  // writing values is fine
  CHECK_NOTHROW(list.check_storage());
  w.resize(1000);
  CHECK_THROWS_WITH(list.check_storage(), Catch::Contains("tensor 'w' was resized, moved or replaced"));
  // (A list of its own: resizing w back need not give it its old address, and under ASan it does not.)
  ParameterList<float> tensors;
  tensors.add("t", t);
  CHECK_NOTHROW(tensors.check_storage());
  t.resize(3, 3);
  CHECK_THROWS_WITH(tensors.check_storage(), Catch::Contains("tensor 't' was resized"));
}
