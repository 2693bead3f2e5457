// SPDX-License-Identifier: MIT
// Averaging functions: how AveragedModel folds the current weights into the average.
//
// An averaging function is any callable of the shape
//     fn(averaged, current, num_averaged)
// where `averaged` is a writable flat Eigen array (ArrayMap<accumulator_t<T>>), `current` a read-only
// one (ConstArrayMap<T>) and `num_averaged` the number of models averaged so far (>= 1 when it is
// called). It either updates `averaged` in place and returns void, or returns the new average as an
// Eigen expression, as PyTorch's avg_fn does; polyak then assigns it in the same single pass.
//
// A multi-tensor function gets all tensors of one update at once, as two TensorArrays; mark a user's
// callable as one with polyak::multi_tensor(fn). PyTorch's names for these are multi_avg_fn and
// get_*_multi_avg_fn.
#pragma once

#include <cmath>      // std::abs
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::forward

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {

/// One update's arithmetic for a built-in rule. Every built-in rule (SWA, EMA, ScheduledEMA,
/// PowerEMA, their multi-tensor forms) is, at a given step, "average += w (current - average)" with
/// one weight for every scalar, or a copy, or nothing. A rule's kernel(num_averaged) computes that
/// once per update_parameters; AveragedModel hands the same small value to every block of a 16-bit
/// model and every thread (and a backend that averages elsewhere can apply the same value). A
/// rule without kernel() (a user's functor) is called as before.
struct StepKernel {
  /// What the update does.
  enum class Kind {
    Skip,    ///< the average stays as it is (ScheduledEMA between its update_every steps)
    Copy,    ///< average = current
    Lerp,    ///< average += weight (current - average), rounded as torch.lerp (see EMA)
    Divide,  ///< average += (current - average) / weight: PyTorch's SWA, weight = n + 1
  };
  Kind kind = Kind::Skip;  ///< what the update does
  double weight = 0;       ///< Lerp's w, Divide's divisor

  /// Applies the kernel to flat arrays: `averaged` of the accumulator type, `current` of any type.
  template <class Averaged, class Current>
  void apply(Averaged&& averaged, const Current& current) const {
    using S = typename std::remove_reference_t<Averaged>::Scalar;
    switch (kind) {
      case Kind::Skip:
        return;
      case Kind::Copy:
        averaged = current.template cast<S>();
        return;
      case Kind::Divide:
        averaged += (current.template cast<S>() - averaged) / static_cast<S>(weight);
        return;
      case Kind::Lerp: {
        const S w = static_cast<S>(weight);
        if (std::abs(w) < S(0.5)) {
          averaged += w * (current.template cast<S>() - averaged);
        } else {
          averaged = current.template cast<S>() - (current.template cast<S>() - averaged) * (S(1) - w);
        }
        return;
      }
    }
  }
};

/// Stochastic weight averaging: the equal-weight running mean of every model seen,
///     averaged += (current - averaged) / (num_averaged + 1).
/// PyTorch: get_swa_avg_fn(), the default of AveragedModel.
struct SWA {
  /// Each scalar is averaged on its own, so an update may be split across threads and blocks.
  static constexpr bool is_elementwise = true;

  /// The step that folds in model num_averaged + 1: a division by num_averaged + 1.
  static StepKernel kernel(std::int64_t num_averaged) noexcept {
    return {StepKernel::Kind::Divide, static_cast<double>(num_averaged + 1)};
  }

  template <class Averaged, class Current>
  /// Folds `current` into `averaged`, both flat arrays, the model being number num_averaged + 1: as
  /// PyTorch's avg_fn(averaged, current, num_averaged).
  void operator()(Averaged&& averaged, const Current& current, std::int64_t num_averaged) const {
    kernel(num_averaged).apply(averaged, current);
  }
};

/// Exponential moving average of the weights,
///     averaged = averaged + (1 - decay) * (current - averaged),
/// with torch.lerp(averaged, current, w = 1 - decay)'s formula and branch: averaged + w (current -
/// averaged) for |w| < 0.5, current - (current - averaged)(1 - w) otherwise. PyTorch: get_ema_avg_fn.
///
/// Rounding: polyak rounds twice (the product, then the sum). PyTorch 1.13's CPU lerp on AVX2 and
/// AVX-512 machines fuses the multiply-add into one rounding (an FMA), as its CUDA lerp does, so a
/// float EMA can differ from PyTorch's by one unit in the last place per step: measured at most
/// 1.1e-7 relative over tests/reference/averaged_model.py's cases and 2.1e-7 over the libtorch
/// parity run (tests/torch/test_torch_parity.cpp); in double, below 2.2e-16. SWA (a division, no
/// lerp) matches PyTorch bit for bit.
class EMA {
 public:
  /// Each scalar is averaged on its own, so an update may be split across threads and blocks.
  static constexpr bool is_elementwise = true;

  /// PyTorch's default decay.
  EMA() = default;

  /// `decay` must lie in [0, 1]; anything else, NaN included, is refused.
  explicit EMA(double decay) : decay_(decay) {
    if (!detail::in_unit_interval(decay)) {
      throw InvalidArgument("polyak::EMA: " + detail::unit_interval_problem(decay, "decay"));
    }
  }

  /// The decay.
  double decay() const noexcept { return decay_; }

  /// Every step: a lerp by 1 - decay.
  StepKernel kernel(std::int64_t /*num_averaged*/) const noexcept {
    return {StepKernel::Kind::Lerp, 1.0 - decay_};
  }

  template <class Averaged, class Current>
  /// Folds `current` into `averaged`, both flat arrays, the model being number num_averaged + 1: as
  /// PyTorch's avg_fn(averaged, current, num_averaged).
  void operator()(Averaged&& averaged, const Current& current, std::int64_t num_averaged) const {
    kernel(num_averaged).apply(averaged, current);
  }

 private:
  double decay_ = 0.999;
};

/// The tensors of one update, each as a flat Eigen array, in the model's order. What a multi-tensor
/// averaging function receives; `S` is `const T` for the model's side.
template <class S>
class TensorArrays {
  using Mutable = std::remove_const_t<S>;

 public:
  /// One tensor, as a flat Eigen array (const on the model's side).
  using Array =
      Eigen::Map<std::conditional_t<std::is_const_v<S>, const Eigen::Array<Mutable, Eigen::Dynamic, 1>,
                                    Eigen::Array<Mutable, Eigen::Dynamic, 1>>>;

  /// The entries `indices[0..count)` of `entries`.
  TensorArrays(const NamedTensor<Mutable>* entries, const std::size_t* indices, std::size_t count) noexcept
      : entries_(entries), indices_(indices), count_(count) {}

  /// How many tensors.
  std::size_t size() const noexcept { return count_; }
  /// Tensor `i`.
  Array operator[](std::size_t i) const {
    const auto& entry = entries_[indices_[i]];
    return Array(entry.data(), static_cast<Eigen::Index>(entry.numel()));
  }

 private:
  const NamedTensor<Mutable>* entries_;
  const std::size_t* indices_;
  std::size_t count_;
};

namespace detail {

template <class Fn, class = void>
struct is_elementwise : std::false_type {};
template <class Fn>
struct is_elementwise<Fn, std::void_t<decltype(Fn::is_elementwise)>>
    : std::bool_constant<Fn::is_elementwise> {};

template <class Fn, class = void>
struct is_multi_tensor : std::false_type {};
template <class Fn>
struct is_multi_tensor<Fn, std::void_t<decltype(Fn::is_multi_tensor)>>
    : std::bool_constant<Fn::is_multi_tensor> {};

template <class Fn, class = void>
struct has_kernel : std::false_type {};
template <class Fn>
struct has_kernel<Fn, std::void_t<decltype(std::declval<const Fn&>().kernel(std::int64_t{}))>>
    : std::is_same<decltype(std::declval<const Fn&>().kernel(std::int64_t{})), StepKernel> {};

/// Calls a per-tensor function, assigning its result when it returns one (PyTorch's avg_fn shape).
template <class Fn, class Averaged, class Current>
void apply_avg_fn(Fn& fn, Averaged&& averaged, const Current& current, std::int64_t num_averaged) {
  if constexpr (std::is_void_v<std::invoke_result_t<Fn&, Averaged&, const Current&, std::int64_t>>) {
    fn(averaged, current, num_averaged);
  } else {
    averaged = fn(averaged, current, num_averaged);
  }
}

}  // namespace detail

/// True when the per-tensor function `Fn` treats each scalar on its own (SWA, EMA; a user's functor
/// says so with `static constexpr bool is_elementwise = true;` and must then be safe to call from
/// several threads at once). AveragedModel splits such updates anywhere, across threads.
template <class Fn>
inline constexpr bool is_elementwise_v = detail::is_elementwise<Fn>::value;

/// True when `Fn` is called once per update with all tensors (TensorArrays) rather than per tensor.
template <class Fn>
inline constexpr bool is_multi_tensor_v = detail::is_multi_tensor<Fn>::value;

/// A multi-tensor function that applies the per-tensor function `Fn` to each pair of tensors.
template <class Fn>
struct ForEachTensor {
  /// It takes all tensors of an update at once (TensorArrays), as PyTorch's multi_avg_fn.
  static constexpr bool is_multi_tensor = true;
  /// Elementwise where Fn is.
  static constexpr bool is_elementwise = is_elementwise_v<Fn>;
  Fn fn;  ///< the per-tensor averaging function

  template <class S, class C>
  /// Applies fn to each pair of tensors.
  void operator()(const TensorArrays<S>& averaged, const TensorArrays<C>& current,
                  std::int64_t num_averaged) {
    for (std::size_t i = 0; i < averaged.size(); ++i) {
      detail::apply_avg_fn(fn, averaged[i], current[i], num_averaged);
    }
  }
};

/// Marks a user's callable `fn(TensorArrays<Acc> averaged, TensorArrays<const T> current, n)` as a
/// multi-tensor averaging function (PyTorch's multi_avg_fn).
template <class Fn>
struct MultiTensorFn {
  /// It takes all tensors of an update at once.
  static constexpr bool is_multi_tensor = true;
  Fn fn;  ///< the user's callable

  template <class S, class C>
  /// Calls fn(averaged, current, num_averaged).
  void operator()(const TensorArrays<S>& averaged, const TensorArrays<C>& current,
                  std::int64_t num_averaged) {
    fn(averaged, current, num_averaged);
  }
};

/// Marks `fn` as a multi-tensor averaging function: AveragedModel calls it once an update with all
/// tensors (PyTorch's multi_avg_fn).
template <class Fn>
MultiTensorFn<Fn> multi_tensor(Fn fn) {
  return MultiTensorFn<Fn>{std::move(fn)};
}

/// PyTorch: torch.optim.swa_utils.get_swa_avg_fn().
inline SWA get_swa_avg_fn() { return SWA{}; }

/// PyTorch: torch.optim.swa_utils.get_ema_avg_fn(decay).
inline EMA get_ema_avg_fn(double decay = 0.999) { return EMA{decay}; }

/// PyTorch: torch.optim.swa_utils.get_swa_multi_avg_fn().
inline ForEachTensor<SWA> get_swa_multi_avg_fn() { return {SWA{}}; }

/// PyTorch: torch.optim.swa_utils.get_ema_multi_avg_fn(decay).
inline ForEachTensor<EMA> get_ema_multi_avg_fn(double decay = 0.999) { return {EMA{decay}}; }

}  // namespace polyak
