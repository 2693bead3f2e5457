// SPDX-License-Identifier: MIT
// The loop every elementwise update runs over one tensor's range (AveragedModel's, and the libtorch
// device average's on the CPU), 16-bit models widened a cache-sized block at a time.
#pragma once

#include <algorithm>  // std::min
#include <cstddef>    // std::size_t
#include <type_traits>

#include <Eigen/Core>

#include "polyak/core/scalar_type.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {

namespace detail {

/// Applies `apply(averaged_array, current_array)` to scalars [from, to) of one tensor: `averaged`
/// in accumulator_t<T>, `current` in T. A 16-bit tensor's values are widened to float a block at a
/// time into a buffer that stays in L1, so `apply` sees float arrays and memory is still crossed
/// once. AveragedModel's update, and the libtorch device average's on the CPU.
template <class Apply, class T>
void apply_to_range(const Apply& apply, accumulator_t<T>* averaged, const T* current, std::size_t from,
                    std::size_t to) {
  using Accumulator = accumulator_t<T>;  ///< the average's: float for 16-bit models
  if constexpr (std::is_same_v<T, Accumulator>) {
    const auto length = static_cast<Eigen::Index>(to - from);
    apply(ArrayMap<Accumulator>(averaged + from, length), ConstArrayMap<T>(current + from, length));
  } else {
    constexpr std::size_t block = 1024;
    alignas(64) Accumulator widened[block];
    for (std::size_t b = from; b < to; b += block) {
      const std::size_t length = std::min(block, to - b);
      widen(current + b, widened, length);
      const auto n = static_cast<Eigen::Index>(length);
      apply(ArrayMap<Accumulator>(averaged + b, n), ConstArrayMap<Accumulator>(widened, n));
    }
  }
}

}  // namespace detail

}  // namespace polyak
