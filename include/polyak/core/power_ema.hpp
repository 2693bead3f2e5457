// SPDX-License-Identifier: MIT
// Power-function EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
// Models", CVPR 2024, EDM2): an EMA whose memory grows with training, so that its length is a
// fixed fraction of the run however long the run is.
//
// At step t (t = 1 for the first model seen) the average is updated with decay
//     beta_t = (1 - 1/t)^(gamma + 1),
// which makes it the weighted sum of the models theta_1..theta_t with weights
//     w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1),
// the profile (gamma + 1) tau^gamma / t^(gamma+1) integrated over (tau - 1, tau]. Its relative
// standard deviation, the paper's sigma_rel, is that profile's width over t:
//     sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
// The paper's two defaults are sigma_rel 0.05 (gamma 16.97) and 0.10 (gamma 6.94).
#pragma once

#include <cmath>      // std::pow, std::sqrt, std::log1p, std::exp
#include <cstdint>    // std::int64_t
#include <stdexcept>  // std::invalid_argument
#include <string>

#include "polyak/core/error.hpp"
#include "polyak/core/averaging_functions.hpp"
#include "polyak/core/detail/number_text.hpp"

namespace polyak {

/// sigma_rel of the power-function profile with exponent `gamma` (> -1).
inline double gamma_to_sigma_rel(double gamma) {
  if (!(gamma > -1.0 && std::isfinite(gamma))) {
    throw InvalidArgument("polyak::gamma_to_sigma_rel: gamma " + detail::number_text(gamma) +
                          " must be finite and greater than -1");
  }
  return std::sqrt((gamma + 1) / ((gamma + 2) * (gamma + 2) * (gamma + 3)));
}

/// The largest sigma_rel a power-function profile has (at gamma = (sqrt 5 - 3) / 2), about 0.3003.
inline double max_sigma_rel() { return gamma_to_sigma_rel((std::sqrt(5.0) - 3.0) / 2.0); }

/// The exponent gamma whose profile has relative width `sigma_rel`, in (0, max_sigma_rel()]: the
/// largest root of (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) = sigma_rel^2 (EDM2's choice; the other
/// root, below -0.382, weights early models more than late ones).
inline double sigma_rel_to_gamma(double sigma_rel) {
  const double peak = (std::sqrt(5.0) - 3.0) / 2.0;  // where sigma_rel(gamma) is largest
  if (!(sigma_rel > 0.0 && sigma_rel <= max_sigma_rel())) {
    throw InvalidArgument("polyak::sigma_rel_to_gamma: sigma_rel " + detail::number_text(sigma_rel) +
                          " is outside (0, " + detail::number_text(max_sigma_rel()) + "]");
  }
  // Bisection: sigma_rel(gamma) falls monotonically from the peak on, below sigma_rel by
  // gamma = 1 / sigma_rel (there (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) < 1 / (gamma + 2)^2).
  double low = peak, high = 1.0 / sigma_rel;
  for (int i = 0; i < 200 && low < high; ++i) {
    const double middle = low + (high - low) / 2;
    if (detail::exactly_equal(middle, low) || detail::exactly_equal(middle, high)) break;
    (gamma_to_sigma_rel(middle) > sigma_rel ? low : high) = middle;
  }
  return low + (high - low) / 2;
}

/// The power-function EMA as an averaging function for AveragedModel: the call with num_averaged
/// = n folds in model t = n + 1 with decay beta_t, rounding as EMA does. The first
/// update_parameters copies the model, which is beta_1 = 0.
class PowerEMA {
 public:
  /// Each scalar is averaged on its own.
  static constexpr bool is_elementwise = true;

  /// `gamma` must be finite and greater than -1.
  explicit PowerEMA(double gamma) : gamma_(gamma) { gamma_to_sigma_rel(gamma); }

  /// The profile of relative width `sigma_rel` (see sigma_rel_to_gamma).
  static PowerEMA from_sigma_rel(double sigma_rel) { return PowerEMA{sigma_rel_to_gamma(sigma_rel)}; }

  /// The exponent gamma.
  double gamma() const noexcept { return gamma_; }
  /// The relative width sigma_rel that gamma gives.
  double sigma_rel() const { return gamma_to_sigma_rel(gamma_); }

  /// beta_t = (1 - 1/t)^(gamma + 1), for t >= 1.
  double decay(std::int64_t t) const {
    return std::exp((gamma_ + 1) * std::log1p(-1.0 / static_cast<double>(t)));
  }

  /// The step that folds in model t = num_averaged + 1: a lerp by 1 - beta_t.
  StepKernel kernel(std::int64_t num_averaged) const {
    return {StepKernel::Kind::Lerp, 1.0 - decay(num_averaged + 1)};
  }

  template <class Averaged, class Current>
  /// Folds `current` into `averaged` (flat arrays): kernel(num_averaged) applied.
  void operator()(Averaged&& averaged, const Current& current, std::int64_t num_averaged) const {
    kernel(num_averaged).apply(averaged, current);
  }

 private:
  double gamma_;
};

}  // namespace polyak
