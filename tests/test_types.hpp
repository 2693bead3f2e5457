// SPDX-License-Identifier: MIT
// The scalar types every typed test runs over, and how closely each can be expected to agree.
#pragma once

#include <Eigen/Core>

#include "polyak/core/scalar_type.hpp"

namespace polyak_test {

/// Relative agreement expected of a few operations carried out in S (a handful of roundings).
template <class S>
struct tolerance;
template <>
struct tolerance<double> {
  static constexpr double value = 1e-12;
};
template <>
struct tolerance<float> {
  static constexpr double value = 2e-6;
};
/// One rounding to the 16-bit type: half has an 11-bit significand, bfloat16 an 8-bit one.
template <>
struct tolerance<Eigen::half> {
  static constexpr double value = 1.0 / 2048;
};
template <>
struct tolerance<Eigen::bfloat16> {
  static constexpr double value = 1.0 / 256;
};

template <class S>
inline constexpr double tolerance_v = tolerance<S>::value;

/// |a - b| <= tol * max(1, |b|): relative for large values, absolute near zero.
inline bool close(double a, double b, double tol) {
  const double scale = std::abs(b) > 1.0 ? std::abs(b) : 1.0;
  return std::abs(a - b) <= tol * scale;
}

}  // namespace polyak_test

#define POLYAK_SCALAR_TYPES float, double, Eigen::half, Eigen::bfloat16
