// SPDX-License-Identifier: MIT
// AveragedModel: an owned running average of a model's weights (PyTorch's
// torch.optim.swa_utils.AveragedModel).
#pragma once

#include <algorithm>  // std::swap_ranges
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t
#include <sstream>    // error messages
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::move
#include <vector>

#include <Eigen/Core>  // Eigen::aligned_allocator

#include "polyak/averaging_functions.hpp"
#include "polyak/scalar_type.hpp"
#include "polyak/tensor_view.hpp"

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
/// An AveragedModel is movable, not copyable (its views point into its own storage).
template <class T, class AvgFn = SWA>
class AveragedModel {
 public:
  using Scalar = T;
  using Accumulator = accumulator_t<T>;
  using AveragingFunction = AvgFn;

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
    copy_from(model, updated_);
    copy_from(model, copied_);
  }

  AveragedModel(const AveragedModel&) = delete;
  AveragedModel& operator=(const AveragedModel&) = delete;
  AveragedModel(AveragedModel&&) = default;
  AveragedModel& operator=(AveragedModel&&) = default;

  /// Folds `model` into the average: the first call copies it, later calls apply the averaging
  /// function; then n_averaged() grows by one.
  void update_parameters(const ParameterList<T>& model) {
    check_matches(model, "update_parameters");
    if (n_averaged_ == 0) {
      copy_from(model, updated_);
    } else if constexpr (is_multi_tensor_v<AvgFn>) {
      if (updated_.empty()) return finish_update(model);
      avg_fn_(TensorArrays<Accumulator>(&averaged_[0], updated_.data(), updated_.size()),
              TensorArrays<const T>(&model[0], updated_.data(), updated_.size()), n_averaged_);
    } else {
      for (const std::size_t i : updated_) {
        const ConstArrayMap<T> current(model[i].data(), static_cast<Eigen::Index>(model[i].numel()));
        detail::apply_avg_fn(avg_fn_, averaged_[i].flat(), current, n_averaged_);
      }
    }
    finish_update(model);
  }

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

  const AvgFn& avg_fn() const noexcept { return avg_fn_; }
  bool use_buffers() const noexcept { return use_buffers_; }

 private:
  void finish_update(const ParameterList<T>& model) {
    copy_from(model, copied_);
    ++n_averaged_;
  }

  void copy_from(const ParameterList<T>& model, const std::vector<std::size_t>& which) {
    for (const std::size_t i : which) {
      averaged_[i].flat() = model[i].flat().template cast<Accumulator>();
    }
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

  /// Throws std::invalid_argument naming the first tensor of `model` that differs from the copy.
  void check_matches(const ParameterList<T>& model, const char* where) const {
    const std::size_t common = std::min(model.size(), averaged_.size());
    for (std::size_t i = 0; i < common; ++i) {
      const auto& ours = averaged_[i];
      const auto& theirs = model[i];
      std::string problem;
      if (theirs.name() != ours.name()) {
        problem = "is named '" + theirs.name() + "' where the averaged copy has '" + ours.name() + "'";
      } else if (theirs.is_buffer() != ours.is_buffer()) {
        problem = std::string("is a ") + (theirs.is_buffer() ? "buffer" : "parameter") +
                  " in the model and a " + (ours.is_buffer() ? "buffer" : "parameter") +
                  " in the averaged copy";
      } else if (theirs.shape() != ours.shape()) {
        problem = "has shape " + TensorView<T>::shape_string(theirs.shape()) +
                  " where the averaged copy has " + TensorView<T>::shape_string(ours.shape());
      } else if (theirs.storage_order() != ours.storage_order() && theirs.shape().size() > 1) {
        problem = "has another storage order (row- vs column-major) than the averaged copy";
      }
      if (!problem.empty()) {
        fail(where, "tensor " + std::to_string(i) + " '" + ours.name() + "' " + problem);
      }
    }
    if (model.size() > averaged_.size()) {
      fail(where, "the model has " + std::to_string(model.size()) + " tensors, the averaged copy " +
                      std::to_string(averaged_.size()) + ": the first extra one is '" + model[common].name() +
                      "'");
    }
    if (model.size() < averaged_.size()) {
      fail(where, "the model has " + std::to_string(model.size()) + " tensors, the averaged copy " +
                      std::to_string(averaged_.size()) + ": the first missing one is '" +
                      averaged_[common].name() + "'");
    }
  }

  [[noreturn]] static void fail(const char* where, const std::string& what) {
    throw std::invalid_argument(std::string("polyak::AveragedModel::") + where + ": " + what);
  }

  AvgFn avg_fn_;
  bool use_buffers_;
  std::int64_t n_averaged_ = 0;
  std::vector<Accumulator, Eigen::aligned_allocator<Accumulator>> storage_;
  ParameterList<Accumulator> averaged_;  ///< views onto storage_, one per model tensor
  std::vector<std::size_t> updated_;     ///< tensors the averaging function updates
  std::vector<std::size_t> copied_;      ///< buffers copied from the model (use_buffers == false)
};

}  // namespace polyak
