// SPDX-License-Identifier: MIT
// The scalar types polyak averages, and the type each one is averaged in.
#pragma once

#include <cstddef>  // std::size_t
#include <cstdint>  // std::int64_t, std::uint16_t, std::uint32_t
#include <cstring>  // std::memcpy: bit casts
#include <type_traits>

#include <Eigen/Core>  // Eigen::half, Eigen::bfloat16

namespace polyak {

/// True for the parameter scalar types polyak accepts: float, double, Eigen::half, Eigen::bfloat16.
template <class T>
inline constexpr bool is_supported_scalar_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, Eigen::half> ||
    std::is_same_v<T, Eigen::bfloat16>;

/// The type an average of T is kept in. 16-bit models are averaged in float: PyTorch keeps the
/// average in the parameter's own dtype, where an EMA with decay 0.999 loses most of each update
/// to rounding. float and double are averaged in themselves.
template <class T>
struct accumulator {
  static_assert(is_supported_scalar_v<T>,
                "polyak: parameters must be float, double, Eigen::half or Eigen::bfloat16");
  using type =
      std::conditional_t<std::is_same_v<T, Eigen::half> || std::is_same_v<T, Eigen::bfloat16>, float, T>;
};

template <class T>
using accumulator_t = typename accumulator<T>::type;

namespace detail {

/// A scalar type's name as safetensors (and polyak's checkpoints) spell it: "F32", "F64", "F16",
/// "BF16", "I64".
template <class T>
constexpr const char* scalar_dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "F32";
  if constexpr (std::is_same_v<T, double>) return "F64";
  if constexpr (std::is_same_v<T, Eigen::half>) return "F16";
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) return "BF16";
  if constexpr (std::is_same_v<T, std::int64_t>) return "I64";
}

/// Converts n scalars to their accumulator type. bfloat16 is the upper half of a float, so the
/// conversion is a shift, written so that compilers vectorize it (Eigen's cast converts one by one,
/// which held bfloat16 updates to a third of the memory bandwidth here).
template <class T>
void widen(const T* in, accumulator_t<T>* out, std::size_t n) {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t low;
      std::memcpy(&low, in + i, sizeof low);
      const std::uint32_t bits = static_cast<std::uint32_t>(low) << 16;
      std::memcpy(out + i, &bits, sizeof bits);
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<accumulator_t<T>>(in[i]);
  }
}

}  // namespace detail

}  // namespace polyak
