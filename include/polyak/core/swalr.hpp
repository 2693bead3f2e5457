// SPDX-License-Identifier: MIT
// SWALR: the SWA learning-rate schedule (PyTorch's torch.optim.swa_utils.SWALR).
#pragma once

#include <algorithm>  // std::min, std::max
#include <cmath>      // std::cos, std::isfinite
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t
#include <limits>     // the largest step count
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::move
#include <vector>

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/detail/counter.hpp"
#include "polyak/core/detail/state_io_fwd.hpp"
#include "polyak/core/error.hpp"

namespace polyak {

/// How SWALR moves each group's learning rate to its swa_lr: PyTorch's "cos" and "linear".
enum class AnnealStrategy { Cos, Linear };

/// How SWALR reads and writes an optimizer's per-group learning rates. Specialize it for your
/// optimizer type with the three static functions below; polyak provides it for std::vector<double>
/// (one entry per group), in polyak/torch/parameters.hpp for libtorch's optimizers and in
/// polyak/dlib/parameters.hpp for dlib's dnn_trainer. `set` may refuse a rate by throwing.
template <class Optimizer>
struct learning_rates;

template <>
/// The rates of a plain vector, one per group.
struct learning_rates<std::vector<double>> {
  /// How many groups.
  static std::size_t size(const std::vector<double>& lrs) { return lrs.size(); }
  /// Group `group`'s rate.
  static double get(const std::vector<double>& lrs, std::size_t group) { return lrs[group]; }
  /// Sets group `group`'s rate.
  static void set(std::vector<double>& lrs, std::size_t group, double lr) { lrs[group] = lr; }
};

/// Anneals each parameter group's learning rate to its swa_lr over anneal_epochs steps, then holds it.
///
/// Each step reads the group's current rate back, recovers the rate the anneal started from, and
/// writes the next one, exactly as PyTorch's SWALR.get_lr does:
///     t = clamp(step / max(1, anneal_epochs), 0, 1), alpha = anneal(t),
///     lr = swa_lr * alpha + initial_lr * (1 - alpha),
/// with anneal(t) = (1 - cos(pi t)) / 2 for Cos and t for Linear. Because it reads the rate back,
/// it chains with other schedulers that also write it. As PyTorch's scheduler base does, the
/// constructor takes the first step, so with anneal_epochs == 0 the rates are swa_lr at once.
///
/// `Optimizer` is std::vector<double> (the rates, one per group) or any type with a
/// learning_rates<Optimizer> specialization; SWALR keeps a reference to it.
template <class Optimizer = std::vector<double>>
class SWALR {
  using Access = learning_rates<Optimizer>;

 public:
  /// One swa_lr per group. Refused: a count that differs from the groups', a negative or non-finite
  /// swa_lr, a negative anneal_epochs, a last_epoch below -1. `anneal_epochs` is a whole number of
  /// epochs: a fractional one (1.7) does not compile, where PyTorch raises.
  template <class Epochs = std::int64_t>
  SWALR(Optimizer& optimizer, std::vector<double> swa_lrs, Epochs anneal_epochs = 10,
        AnnealStrategy strategy = AnnealStrategy::Cos, std::int64_t last_epoch = -1)
      : optimizer_(optimizer) {
    static_assert(std::is_integral_v<Epochs> && !std::is_same_v<Epochs, bool>,
                  "polyak::SWALR: anneal_epochs is a whole number of epochs (PyTorch raises on 1.7): pass an "
                  "integer");
    if constexpr (std::is_unsigned_v<Epochs>) {
      // (as unsigned long long, so that no narrower type meets a comparison it always passes)
      if (static_cast<unsigned long long>(anneal_epochs) >
          static_cast<unsigned long long>(std::numeric_limits<std::int64_t>::max())) {
        throw InvalidArgument("polyak::SWALR: anneal_epochs must be at most 2^63 - 1, got " +
                              std::to_string(anneal_epochs));
      }
    }
    State state;
    state.swa_lrs = std::move(swa_lrs);
    state.anneal_epochs = static_cast<std::int64_t>(anneal_epochs);
    state.strategy = strategy;
    state.last_epoch = last_epoch;
    const std::string problem = invalid(state, Access::size(optimizer));
    if (!problem.empty()) throw InvalidArgument("polyak::SWALR: " + problem);
    state_ = std::move(state);
    step();
  }

  /// One swa_lr for every group.
  template <class Epochs = std::int64_t>
  SWALR(Optimizer& optimizer, double swa_lr, Epochs anneal_epochs = 10,
        AnnealStrategy strategy = AnnealStrategy::Cos, std::int64_t last_epoch = -1)
      : SWALR(optimizer, std::vector<double>(Access::size(optimizer), swa_lr), anneal_epochs, strategy,
              last_epoch) {}

  /// Advances one epoch and writes the new rates into the optimizer. Where the optimizer refuses a
  /// rate (dlib's trainer takes only positive ones), every group gets its rate back and the
  /// scheduler's state is left as it was.
  void step() {
    detail::check_can_count(state_.step_count, "step_count", "polyak::SWALR::step");
    detail::check_can_count(state_.last_epoch, "last_epoch", "polyak::SWALR::step");
    State next = state_;
    ++next.step_count;
    ++next.last_epoch;
    std::int64_t step = next.step_count - 1;
    if (next.anneal_epochs == 0) step = std::max<std::int64_t>(1, step);
    const double span = static_cast<double>(std::max<std::int64_t>(1, next.anneal_epochs));
    const double prev_alpha = anneal(std::clamp(static_cast<double>(step - 1) / span, 0.0, 1.0));
    const double alpha = anneal(std::clamp(static_cast<double>(step) / span, 0.0, 1.0));

    const std::size_t groups = Access::size(optimizer_);
    if (groups != next.swa_lrs.size()) {
      throw InvalidArgument("polyak::SWALR::step: the optimizer has " + std::to_string(groups) +
                            " parameter groups, the scheduler " + std::to_string(next.swa_lrs.size()));
    }
    next.last_lrs.resize(groups);
    std::vector<double> current(groups);
    for (std::size_t g = 0; g < groups; ++g) {
      const double swa_lr = next.swa_lrs[g];
      current[g] = Access::get(optimizer_, g);
      // The rate this anneal started from, recovered from the current one (PyTorch's _get_initial_lr).
      const double initial =
          prev_alpha >= 1.0 ? swa_lr : (current[g] - prev_alpha * swa_lr) / (1.0 - prev_alpha);
      next.last_lrs[g] = swa_lr * alpha + initial * (1.0 - alpha);
    }
    std::size_t written = 0;
    try {
      for (; written < groups; ++written) Access::set(optimizer_, written, next.last_lrs[written]);
    } catch (...) {  // all groups or none: the ones written take their rates back
      for (std::size_t g = 0; g < written; ++g) Access::set(optimizer_, g, current[g]);
      throw;
    }
    state_ = std::move(next);
  }

  /// The rates the last step wrote.
  const std::vector<double>& get_last_lr() const noexcept { return state_.last_lrs; }

  /// The epoch count, as PyTorch's scheduler.last_epoch.
  std::int64_t last_epoch() const noexcept { return state_.last_epoch; }

  ///@{
  /// Checkpoints, as PyTorch's SWALR.state_dict() names them; defined by the checkpoint layer: see
  /// StateIO<SWALR> in polyak/checkpoint/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(SWALR);
  ///@}

 private:
  double anneal(double t) const {
    constexpr double pi = 3.14159265358979323846;
    return state_.strategy == AnnealStrategy::Cos ? (1.0 - std::cos(pi * t)) / 2.0 : t;
  }

  struct State;

  /// What makes `state` one the constructor refuses, for `groups` parameter groups; "" if nothing.
  static std::string invalid(const State& state, std::size_t groups) {
    if (state.swa_lrs.size() != groups) {
      return "swa_lr has " + std::to_string(state.swa_lrs.size()) + " values for " + std::to_string(groups) +
             " parameter groups";
    }
    for (std::size_t g = 0; g < groups; ++g) {
      if (!(std::isfinite(state.swa_lrs[g]) && state.swa_lrs[g] >= 0)) {
        return "swa_lr " + detail::number_text(state.swa_lrs[g]) + " of group " + std::to_string(g) +
               " is not a finite rate >= 0";
      }
    }
    if (state.anneal_epochs < 0)
      return "anneal_epochs must be >= 0, got " + std::to_string(state.anneal_epochs);
    if (state.last_epoch < -1) return "last_epoch must be >= -1, got " + std::to_string(state.last_epoch);
    return {};
  }

  struct State {
    std::vector<double> swa_lrs;
    std::int64_t anneal_epochs = 10;
    AnnealStrategy strategy = AnnealStrategy::Cos;
    std::int64_t last_epoch = -1;
    std::int64_t step_count = 0;
    std::vector<double> last_lrs;
  };

  Optimizer& optimizer_;
  State state_;
};

}  // namespace polyak
