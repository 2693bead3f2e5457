// SPDX-License-Identifier: MIT
// EMA decay schedules: the warm-ups, delayed start and sparse updates of the EMA implementations in
// diffusers, timm and ema-pytorch, as an averaging function for AveragedModel.
//
// A decay schedule is any callable `double schedule(std::int64_t t)` giving the decay for the t-th
// averaging step, t >= 1; WarmupDecay and InverseGammaDecay are the two every trainer uses, and a
// user's own lambda works the same. ScheduledEMA wraps one:
//
//     polyak::AveragedModel ema(params, polyak::ScheduledEMA{polyak::InverseGammaDecay{0.9999}});
//
// Steps. AveragedModel's first update_parameters copies the model; the one after it is step t = 1,
// and in general the call with num_averaged = n is step t = n - update_after_step. Steps t <= 0 copy
// the model (decay 0), as diffusers' EMAModel.step and ema-pytorch's EMA.update do: with the same
// update_after_step, the k-th call here is their k-th step.
#pragma once

#include <algorithm>  // std::clamp, std::min
#include <cmath>      // std::pow
#include <cstdint>    // std::int64_t
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::move

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/averaging_functions.hpp"

namespace polyak {

/// decay_t = min(decay, (1 + t) / (10 + t)): short memory while the average is young.
/// TensorFlow's ExponentialMovingAverage(num_updates=t); diffusers' EMAModel with use_ema_warmup=False.
class WarmupDecay {
 public:
  /// `decay` must lie in [0, 1].
  explicit WarmupDecay(double decay = 0.9999) : decay_(decay) {
    if (!detail::in_unit_interval(decay)) {
      throw InvalidArgument("polyak::WarmupDecay: " + detail::unit_interval_problem(decay, "decay"));
    }
  }

  /// The decay at step t: min(decay, (1 + t) / (10 + t)).
  double operator()(std::int64_t t) const {
    const auto x = static_cast<double>(t);
    return std::min(decay_, (1.0 + x) / (10.0 + x));
  }

  /// The largest decay, reached as t grows.
  double decay() const noexcept { return decay_; }

 private:
  double decay_;
};

/// decay_t = clamp(1 - (1 + t / inv_gamma)^(-power), min_decay, decay): Katherine Crowson's EMA warm-up.
/// diffusers' EMAModel with use_ema_warmup=True, timm's ModelEmaV3 with use_warmup=True (warmup_gamma,
/// warmup_power), ema-pytorch's EMA (inv_gamma, power, min_value; beta is `decay`). Their defaults
/// are these: power 2/3 reaches decay 0.999 near step 31.6k and 0.9999 near 1M; power 3/4 suits
/// shorter runs (0.999 at 10k, 0.9999 at 215k).
class InverseGammaDecay {
 public:
  /// Needs 0 <= min_decay <= decay <= 1, inv_gamma > 0 and power > 0 (all finite).
  explicit InverseGammaDecay(double decay = 0.9999, double inv_gamma = 1.0, double power = 2.0 / 3.0,
                             double min_decay = 0.0)
      : decay_(decay), inv_gamma_(inv_gamma), power_(power), min_decay_(min_decay) {
    const auto bad = [](const std::string& what) {
      throw InvalidArgument("polyak::InverseGammaDecay: " + what);
    };
    if (!detail::in_unit_interval(decay)) bad(detail::unit_interval_problem(decay, "decay"));
    if (!(min_decay >= 0.0 && min_decay <= decay))
      bad("min_decay " + detail::number_text(min_decay) + " is outside [0, decay]");
    if (!(inv_gamma > 0.0 && std::isfinite(inv_gamma))) bad("inv_gamma must be positive and finite");
    if (!(power > 0.0 && std::isfinite(power))) bad("power must be positive and finite");
  }

  /// The decay at step t: 1 - (1 + t / inv_gamma)^-power, clamped to [min_decay, decay].
  double operator()(std::int64_t t) const {
    const double value = 1.0 - std::pow(1.0 + static_cast<double>(t) / inv_gamma_, -power_);
    return std::clamp(value, min_decay_, decay_);
  }

  /// The largest decay.
  double decay() const noexcept { return decay_; }
  /// The schedule's inv_gamma.
  double inv_gamma() const noexcept { return inv_gamma_; }
  /// The schedule's power.
  double power() const noexcept { return power_; }
  /// The smallest decay.
  double min_decay() const noexcept { return min_decay_; }

 private:
  double decay_, inv_gamma_, power_, min_decay_;
};

/// When a ScheduledEMA starts averaging and how often.
struct EmaCadence {
  /// Steps before this one copy the model instead of averaging it (diffusers', timm's and
  /// ema-pytorch's update_after_step).
  std::int64_t update_after_step = 0;

  /// Average on every k-th call only; the calls between change nothing (ema-pytorch's update_every).
  std::int64_t update_every = 1;

  /// With update_every = k > 1: true (polyak's default) applies the product of the k decays of the
  /// steps since the last update, d_{t-k+1} * ... * d_t, so the average keeps the memory, in steps, of
  /// an every-step EMA; where the weights change only every k steps (gradient accumulation), the
  /// result equals the every-step EMA up to rounding. false applies d_t alone, as ema-pytorch does:
  /// the memory then grows k-fold.
  bool compound = true;
};

/// An EMA whose decay follows `Schedule` (any callable double(std::int64_t t)), with EmaCadence's
/// delayed start and sparse updates. Each update computes the decay and then rounds as EMA
/// (PyTorch's lerp) does. Checkpoints save the cadence and the settings of polyak's schedules
/// (see polyak/checkpoint/rule_settings.hpp); a user's schedule is kept as constructed when a state is
/// loaded.
template <class Schedule>
class ScheduledEMA {
  static_assert(std::is_invocable_r_v<double, const Schedule&, std::int64_t>,
                "polyak::ScheduledEMA: the schedule must be callable as double(std::int64_t step)");

 public:
  /// Each scalar is averaged on its own (the decay depends on num_averaged alone).
  static constexpr bool is_elementwise = true;

  /// An EMA whose decay at step t is schedule(t), applied as `cadence` says; refused: a negative
  /// update_after_step, an update_every below 1.
  explicit ScheduledEMA(Schedule schedule, EmaCadence cadence = {})
      : schedule_(std::move(schedule)), cadence_(cadence) {
    if (cadence.update_after_step < 0) throw InvalidArgument("polyak::ScheduledEMA: update_after_step < 0");
    if (cadence.update_every < 1) throw InvalidArgument("polyak::ScheduledEMA: update_every < 1");
  }

  /// The decay schedule.
  const Schedule& schedule() const noexcept { return schedule_; }
  /// When updates apply.
  const EmaCadence& cadence() const noexcept { return cadence_; }

  /// Whether the call with `num_averaged` changes the average at all.
  bool updates_at(std::int64_t num_averaged) const noexcept {
    return num_averaged % cadence_.update_every == 0;
  }

  /// The decay applied by the call with `num_averaged` (when updates_at it): 0 copies the model.
  /// A schedule value outside [0, 1] (a user's) is refused with std::invalid_argument.
  double decay_at(std::int64_t num_averaged) const {
    const std::int64_t t = num_averaged - cadence_.update_after_step;
    if (t <= 0) return 0.0;
    if (!cadence_.compound) return checked(t);
    double product = 1.0;
    for (std::int64_t s = t - cadence_.update_every + 1; s <= t; ++s) {
      if (s <= 0) return 0.0;  // a step in the window copied the model: so does the whole window
      product *= checked(s);
    }
    return product;
  }

  /// The step of the call with `num_averaged`: nothing between update_every steps, else a lerp by
  /// 1 - decay_at (the schedule runs here, once an update).
  StepKernel kernel(std::int64_t num_averaged) const {
    if (!updates_at(num_averaged)) return {StepKernel::Kind::Skip, 0.0};
    return {StepKernel::Kind::Lerp, 1.0 - decay_at(num_averaged)};
  }

  template <class Averaged, class Current>
  /// Folds `current` into `averaged` (flat arrays) as the schedule and cadence say.
  void operator()(Averaged&& averaged, const Current& current, std::int64_t num_averaged) const {
    kernel(num_averaged).apply(averaged, current);
  }

 private:
  double checked(std::int64_t t) const {
    const double d = schedule_(t);
    if (!detail::in_unit_interval(d)) {
      throw InvalidArgument("polyak::ScheduledEMA: the schedule gave decay " + detail::number_text(d) +
                            " at step " + std::to_string(t) + ", outside [0, 1]");
    }
    return d;
  }

  Schedule schedule_;
  EmaCadence cadence_;
};

}  // namespace polyak
