// SPDX-License-Identifier: MIT
// AveragedModel: an owned running average of a model's weights (PyTorch's
// torch.optim.swa_utils.AveragedModel).
#pragma once

#include <algorithm>  // std::swap_ranges, std::upper_bound
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::move
#include <vector>

#include <Eigen/Core>  // Eigen::aligned_allocator

#include "polyak/core/detail/apply_range.hpp"
#include "polyak/core/detail/counter.hpp"
#include "polyak/core/detail/state_io_fwd.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/averaging_functions.hpp"
#include "polyak/core/detail/tensor_spec.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/core/tensor_view.hpp"
#include "polyak/core/thread_pool.hpp"

namespace polyak {

/// A running average of a model's tensors, kept in one owned block of memory.
///
/// `T` is the model's scalar type; the average is kept in `accumulator_t<T>` (float for Eigen::half
/// and Eigen::bfloat16 models, which copy_to rounds once). `AvgFn` is SWA (default), EMA, a
/// ForEachTensor / MultiTensorFn, or any callable of the shape described in averaging_functions.hpp.
///
/// As in PyTorch, the copy is taken at construction; the first update_parameters() copies the model
/// again, later ones apply `AvgFn`. With `use_buffers == false`, buffers are copied from the model on
/// every update (current PyTorch's behaviour); with `true` they are averaged like parameters.
///
/// Every call that takes a model first checks that its tensors have the averaged copy's count, names,
/// kinds (parameter or buffer), order, shapes and storage orders; otherwise it throws
/// std::invalid_argument naming the first tensor that differs, and changes nothing.
///
/// Values are not checked for NaN or infinity: like PyTorch, a non-finite weight propagates into the
/// average. A functor that throws midway leaves the tensors before it updated.
///
/// An elementwise function (is_elementwise_v) on a 16-bit model receives the current values already
/// widened to float, a block of 1024 scalars at a time.
///
/// Threads are opt-in: set_thread_pool(&pool) spreads each update of an elementwise function (SWA,
/// EMA, their multi-tensor forms, or a user's functor marked is_elementwise) over the pool, when
/// every thread gets at least min_scalars_per_thread scalars; smaller models stay on the calling
/// thread, where waking workers would cost more than it saves.
///
/// An AveragedModel is movable, not copyable (its views point into its own storage).
template <class T, class AvgFn = SWA>
class AveragedModel {
 public:
  using Scalar = T;                      ///< the model's scalar type
  using Accumulator = accumulator_t<T>;  ///< the average's: float for 16-bit models
  using AveragingFunction = AvgFn;       ///< the averaging rule

  /// Below this many scalars a thread, an update runs on the calling thread alone.
  static constexpr std::size_t min_scalars_per_thread = std::size_t{1} << 18;

  static_assert(
      is_multi_tensor_v<AvgFn> ||
          std::is_invocable_v<AvgFn&, ArrayMap<Accumulator>&, const ConstArrayMap<T>&, std::int64_t>,
      "polyak::AveragedModel: the averaging function must be callable as "
      "fn(ArrayMap<accumulator_t<T>>& averaged, const ConstArrayMap<T>& current, std::int64_t "
      "num_averaged), or be marked multi-tensor with polyak::multi_tensor(fn)");

  /// Copies `model` (parameters and buffers) into the averaged copy; n_averaged() is 0.
  explicit AveragedModel(const ParameterList<T>& model, AvgFn avg_fn = {}, bool use_buffers = false)
      : avg_fn_(std::move(avg_fn)), use_buffers_(use_buffers) {
    // Each tensor starts on a 64-byte boundary: whole cache lines, aligned vector loads.
    constexpr std::size_t align = 64 / sizeof(Accumulator);
    std::vector<std::size_t> offsets;
    std::size_t total = 0;
    for (const auto& entry : model) {
      offsets.push_back(total);
      total += (entry.numel() + align - 1) / align * align;
    }
    storage_.resize(total);
    for (std::size_t i = 0; i < model.size(); ++i) {
      const auto& entry = model[i];
      TensorView<Accumulator> view(storage_.data() + offsets[i], entry.shape(), entry.storage_order());
      if (entry.is_buffer()) {
        averaged_.add_buffer(entry.name(), view);
      } else {
        averaged_.add(entry.name(), view);
      }
      (entry.is_buffer() && !use_buffers_ ? copied_ : updated_).push_back(i);
    }
    updated_offsets_.push_back(0);
    for (const std::size_t i : updated_)
      updated_offsets_.push_back(updated_offsets_.back() + model[i].numel());
    copy_from(model, updated_);
    copy_from(model, copied_);
  }

  AveragedModel(const AveragedModel&) = delete;
  AveragedModel& operator=(const AveragedModel&) = delete;
  /// Movable: the views of the average move with it.
  AveragedModel(AveragedModel&&) = default;
  /// Movable.
  AveragedModel& operator=(AveragedModel&&) = default;

  /// Folds `model` into the average: the first call copies it, later calls apply the averaging
  /// function; then n_averaged() grows by one.
  void update_parameters(const ParameterList<T>& model) {
    check_matches(model, "update_parameters");
    detail::check_can_count(n_averaged_, "n_averaged", "polyak::AveragedModel::update_parameters");
    if (n_averaged_ == 0) {
      copy_from(model, updated_);
    } else if constexpr (is_elementwise_v<AvgFn>) {
      auto& fn = elementwise_fn();
      using Fn = std::remove_reference_t<decltype(fn)>;
      if constexpr (detail::has_kernel<Fn>::value) {
        // A built-in rule: its step computed once, the same kernel for every block and thread.
        const StepKernel kernel = fn.kernel(n_averaged_);
        update_elementwise(
            model, [kernel](auto&& averaged, const auto& current) { kernel.apply(averaged, current); });
      } else {
        const std::int64_t n = n_averaged_;
        update_elementwise(model, [&fn, n](auto&& averaged, const auto& current) {
          detail::apply_avg_fn(fn, averaged, current, n);
        });
      }
    } else if constexpr (is_multi_tensor_v<AvgFn>) {
      if (!updated_.empty()) {
        avg_fn_(TensorArrays<Accumulator>(&averaged_[0], updated_.data(), updated_.size()),
                TensorArrays<const T>(&model[0], updated_.data(), updated_.size()), n_averaged_);
      }
    } else {
      for (const std::size_t i : updated_) {
        const ConstArrayMap<T> current(model[i].data(), static_cast<Eigen::Index>(model[i].numel()));
        detail::apply_avg_fn(avg_fn_, averaged_[i].flat(), current, n_averaged_);
      }
    }
    copy_from(model, copied_);
    ++n_averaged_;
  }

  /// Spreads later updates over `pool` (nullptr: back to the calling thread alone). The pool must
  /// outlive its use here.
  void set_thread_pool(ThreadPool* pool) noexcept { pool_ = pool; }

  /// How many models have been folded in (PyTorch's n_averaged buffer).
  std::int64_t n_averaged() const noexcept { return n_averaged_; }

  /// Views onto the averaged parameters: the model's names, order and shapes.
  ParameterList<Accumulator> parameters() const { return select(/*buffers=*/false); }

  /// Views onto the averaged copy's buffers (averaged with use_buffers, else the model's last ones).
  ParameterList<Accumulator> buffers() const { return select(/*buffers=*/true); }

  /// Every tensor of the averaged copy, parameters and buffers in the model's order.
  const ParameterList<Accumulator>& tensors() const noexcept { return averaged_; }

  /// Writes the averaged parameters and buffers into `model` (to evaluate or export the average),
  /// rounding once to T where T is a 16-bit type.
  void copy_to(const ParameterList<T>& model) const {
    check_matches(model, "copy_to");
    for (std::size_t i = 0; i < model.size(); ++i) {
      model[i].flat() = averaged_[i].flat().template cast<T>();
    }
  }

  /// Exchanges the averaged values and the model's values in place: evaluate the average, then swap
  /// back to go on training, without a third copy. Only where the average is kept in T itself (float
  /// and double models): a 16-bit model cannot hold a float average without rounding it, so there
  /// copy_to() into a second model is the way.
  void swap(const ParameterList<T>& model) {
    static_assert(std::is_same_v<T, Accumulator>,
                  "polyak::AveragedModel::swap: a 16-bit model cannot hold the float average without "
                  "rounding it; use copy_to() into a second model instead");
    check_matches(model, "swap");
    for (std::size_t i = 0; i < model.size(); ++i) {
      std::swap_ranges(model[i].data(), model[i].data() + model[i].numel(), averaged_[i].data());
    }
  }

  ///@{
  /// Checkpoints, as PyTorch's AveragedModel.state_dict() names them ("module.<name>", "n_averaged");
  /// defined by the checkpoint layer: see StateIO<AveragedModel> in polyak/checkpoint/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(AveragedModel);
  ///@}

  /// The averaging rule.
  const AvgFn& avg_fn() const noexcept { return avg_fn_; }
  /// Whether buffers are averaged (true) or copied from the last model (false), as PyTorch's.
  bool use_buffers() const noexcept { return use_buffers_; }

 private:
  bool use_threads() const noexcept {
    return is_elementwise_v<AvgFn> && pool_ != nullptr && pool_->size() > 1 &&
           updated_offsets_.back() >= min_scalars_per_thread * static_cast<std::size_t>(pool_->size());
  }

  /// Applies `apply(averaged, current)` (flat arrays) to every updated tensor: on the calling thread,
  /// or cut into one slice a thread of the pool.
  template <class Apply>
  void update_elementwise(const ParameterList<T>& model, const Apply& apply) {
    if (!use_threads()) {
      for (std::size_t k = 0; k < updated_.size(); ++k)
        update_range(model, k, 0, model[updated_[k]].numel(), apply);
      return;
    }
    // The update as one range of scalars over all updated tensors, one slice a thread.
    const std::size_t total = updated_offsets_.back();
    const auto parts = static_cast<std::size_t>(pool_->size());
    pool_->run([&](int part) {
      // Slice edges on whole cache lines (16 floats) where the tensors allow.
      const auto p = static_cast<std::size_t>(part);
      std::size_t begin = total * p / parts / 16 * 16;
      const std::size_t end = p + 1 == parts ? total : total * (p + 1) / parts / 16 * 16;
      auto k =
          static_cast<std::size_t>(std::upper_bound(updated_offsets_.begin(), updated_offsets_.end(), begin) -
                                   updated_offsets_.begin() - 1);
      for (; begin < end; ++k) {
        const std::size_t to = std::min(end, updated_offsets_[k + 1]) - updated_offsets_[k];
        update_range(model, k, begin - updated_offsets_[k], to, apply);
        begin = updated_offsets_[k] + to;
      }
    });
  }

  /// Applies `apply` to scalars [from, to) of the k-th updated tensor.
  template <class Apply>
  void update_range(const ParameterList<T>& model, std::size_t k, std::size_t from, std::size_t to,
                    const Apply& apply) {
    const std::size_t i = updated_[k];
    detail::apply_to_range(apply, averaged_[i].data(), model[i].data(), from, to);
  }

  /// The per-tensor elementwise function: AvgFn itself, or the one a ForEachTensor applies.
  auto& elementwise_fn() {
    if constexpr (is_multi_tensor_v<AvgFn>) {
      return avg_fn_.fn;
    } else {
      return avg_fn_;
    }
  }

  void copy_from(const ParameterList<T>& model, const std::vector<std::size_t>& which) {
    for (const std::size_t i : which) detail::widen(model[i].data(), averaged_[i].data(), model[i].numel());
  }

  ParameterList<Accumulator> select(bool buffers) const {
    ParameterList<Accumulator> out;
    for (const auto& entry : averaged_) {
      if (entry.is_buffer() != buffers) continue;
      if (buffers) {
        out.add_buffer(entry.name(), entry.view());
      } else {
        out.add(entry.name(), entry.view());
      }
    }
    return out;
  }

  /// Throws std::invalid_argument naming the first tensor of `model` that differs from the copy, or
  /// whose storage has moved since its view was made.
  void check_matches(const ParameterList<T>& model, const char* where) const {
    if (const std::string stale = model.stale_view(); !stale.empty()) fail(where, stale);
    const std::string problem = detail::first_mismatch(
        model.size(), [&](std::size_t i) { return detail::spec_of(model[i]); }, "the model", averaged_.size(),
        [&](std::size_t i) { return detail::spec_of(averaged_[i]); }, "the averaged copy");
    if (!problem.empty()) fail(where, problem);
  }

  [[noreturn]] static void fail(const char* where, const std::string& what) {
    throw InvalidArgument(std::string("polyak::AveragedModel::") + where + ": " + what);
  }

  AvgFn avg_fn_;
  bool use_buffers_;
  std::int64_t n_averaged_ = 0;
  std::vector<Accumulator, Eigen::aligned_allocator<Accumulator>> storage_;
  ParameterList<Accumulator> averaged_;       ///< views onto storage_, one per model tensor
  std::vector<std::size_t> updated_;          ///< tensors the averaging function updates
  std::vector<std::size_t> copied_;           ///< buffers copied from the model (use_buffers == false)
  std::vector<std::size_t> updated_offsets_;  ///< where each updated tensor starts in their concatenation
  ThreadPool* pool_ = nullptr;
};

}  // namespace polyak
