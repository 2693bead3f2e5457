// SPDX-License-Identifier: MIT
#include "polyak/core/scalar_type.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

// The table of scalar types, read back every way the library reads it.
static_assert(std::is_same_v<polyak::dtype_type<polyak::DType::F32>, float>);
static_assert(std::is_same_v<polyak::dtype_type<polyak::DType::F64>, double>);
static_assert(std::is_same_v<polyak::dtype_type<polyak::DType::F16>, Eigen::half>);
static_assert(std::is_same_v<polyak::dtype_type<polyak::DType::BF16>, Eigen::bfloat16>);
static_assert(std::is_same_v<polyak::dtype_type<polyak::DType::I64>, std::int64_t>);
static_assert(polyak::dtype_of<Eigen::bfloat16>() == polyak::DType::BF16);
static_assert(polyak::dtype_of<std::int64_t>() == polyak::DType::I64);
static_assert(polyak::has_dtype_v<std::int64_t> && !polyak::has_dtype_v<int> &&
              !polyak::has_dtype_v<long double>);
static_assert(polyak::is_supported_scalar_v<Eigen::half> && !polyak::is_supported_scalar_v<std::int64_t>);
// 16-bit models are averaged in float; float and double in themselves (PyTorch keeps the dtype).
static_assert(std::is_same_v<polyak::accumulator_t<Eigen::half>, float>);
static_assert(std::is_same_v<polyak::accumulator_t<Eigen::bfloat16>, float>);
static_assert(std::is_same_v<polyak::accumulator_t<float>, float>);
static_assert(std::is_same_v<polyak::accumulator_t<double>, double>);

TEST_CASE("every DType has its safetensors name and its element size", "[scalar_type]") {
  using polyak::DType;
  CHECK(std::string(polyak::dtype_name(DType::F32)) == "F32");
  CHECK(std::string(polyak::dtype_name(DType::F64)) == "F64");
  CHECK(std::string(polyak::dtype_name(DType::F16)) == "F16");
  CHECK(std::string(polyak::dtype_name(DType::BF16)) == "BF16");
  CHECK(std::string(polyak::dtype_name(DType::I64)) == "I64");
  CHECK(polyak::dtype_size(DType::F32) == 4);
  CHECK(polyak::dtype_size(DType::F64) == 8);
  CHECK(polyak::dtype_size(DType::F16) == 2);
  CHECK(polyak::dtype_size(DType::BF16) == 2);
  CHECK(polyak::dtype_size(DType::I64) == 8);
}

TEST_CASE("bfloat16 widens to the float of its bits and narrows as Eigen rounds, NaN kept", "[scalar_type]") {
  // bfloat16 is the upper half of a float: widening appends 16 zero bits (a closed form, not Eigen).
  const std::vector<std::uint16_t> bits = {0x0000, 0x8000, 0x3f80, 0xbf80, 0x7f7f,
                                           0x0001, 0x7f80, 0xff80, 0x7fc0};
  std::vector<Eigen::bfloat16> in(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) in[i] = Eigen::numext::bit_cast<Eigen::bfloat16>(bits[i]);
  std::vector<float> wide(bits.size());
  polyak::detail::widen(in.data(), wide.data(), in.size());
  for (std::size_t i = 0; i < bits.size(); ++i) {
    const std::uint32_t expected = static_cast<std::uint32_t>(bits[i]) << 16;
    std::uint32_t got;
    std::memcpy(&got, &wide[i], sizeof got);
    CHECK(got == expected);
  }
  // Narrowing rounds to nearest, ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 and goes to 1;
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6 and goes to 1 + 2^-6.
  const std::vector<float> values = {1.0f + std::ldexp(1.0f, -8), 1.0f + 3 * std::ldexp(1.0f, -8), 3.0e38f,
                                     std::numeric_limits<float>::quiet_NaN()};
  std::vector<Eigen::bfloat16> narrow(values.size());
  polyak::detail::narrow(values.data(), narrow.data(), values.size());
  CHECK(static_cast<float>(narrow[0]) == 1.0f);
  CHECK(static_cast<float>(narrow[1]) == 1.0f + std::ldexp(1.0f, -6));
  CHECK(static_cast<float>(narrow[2]) == static_cast<float>(Eigen::bfloat16(3.0e38f)));
  CHECK(std::isnan(static_cast<float>(narrow[3])));
}

TEST_CASE("with_scalar_type calls the function with the C++ type of a DType", "[scalar_type]") {
  using polyak::DType;
  for (const DType dtype : {DType::F32, DType::F64, DType::F16, DType::BF16, DType::I64}) {
    const DType seen =
        polyak::detail::with_scalar_type(dtype, [](auto zero) { return polyak::dtype_of<decltype(zero)>(); });
    CHECK(seen == dtype);
  }
}
