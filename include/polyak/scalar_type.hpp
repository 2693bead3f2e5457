// SPDX-License-Identifier: MIT
// The scalar types polyak averages, and the type each one is averaged in.
#pragma once

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

}  // namespace polyak
