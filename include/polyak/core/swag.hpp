// SPDX-License-Identifier: MIT
// SWAG: the SWA-Gaussian posterior over a model's weights (Maddox, Izmailov, Garipov, Vetrov and
// Wilson, "A Simple Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019).
//
//     polyak::SWAG<float> swag(params, /*max_rank=*/20);
//     for (epoch ...) { train_one_epoch(); if (epoch >= swa_start) swag.update_parameters(params); }
//     std::mt19937_64 rng(seed);
//     for (int s = 0; s < 30; ++s) { swag.sample(params, rng); update_bn(...); predict(); }  // BMA
//
// What it keeps, for each parameter tensor (buffers, batch norm's statistics, are the user's
// update_bn's to recompute after each draw): the running mean theta_bar (the SWA average, the same
// arithmetic as polyak::SWA), the diagonal variance, and the last K deviations
// D_i = theta_i - theta_bar_i (theta_bar_i the mean after collecting theta_i, as the reference code
// computes them). Memory: (2 + K) copies of the parameters, in accumulator_t<T>; nothing is
// allocated per step.
//
// The variance is kept as the second central moment, updated by Welford's rule, not as the paper's
// second moment theta^2_bar minus theta_bar^2: in float that difference loses every digit when the
// weights are large next to their spread. The two are equal in exact arithmetic.
//
// Sampling follows the paper (section 3.2): with Sigma_diag = diag(variance) clamped at zero and K'
// the deviations held,
//     full:          theta = theta_bar + sqrt(scale) (Sigma_diag^(1/2) z1 / sqrt(2) + D z2 / sqrt(2 (K' -
//     1))) diagonal_only: theta = theta_bar + sqrt(scale) Sigma_diag^(1/2) z1
// z1 ~ N(0, I_d), z2 ~ N(0, I_K'): covariance scale (Sigma_diag + D D^T / (K' - 1)) / 2, or
// scale Sigma_diag. The reference code (wjmaddox/swa_gaussian) puts the 1/2 into its `scale`
// argument instead and divides by K - 1 for the rank it was built with: its sample(scale=0.5,
// cov=True) is sample(rng, 1.0) here once K deviations are held; its diagonal sample(scale) is
// sample(rng, scale, true).
#pragma once

#include <algorithm>  // std::min, std::max
#include <cmath>      // std::sqrt, std::log, std::cos, std::sin, std::nextafter
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t
#include <limits>
#include <random>  // std::generate_canonical
#include <string>
#include <vector>

#include <Eigen/Core>

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/detail/counter.hpp"
#include "polyak/core/detail/state_io_fwd.hpp"
#include "polyak/core/detail/tensor_spec.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {

namespace detail {

/// Standard normal draws by the Box-Muller transform of two uniforms from `rng`
/// (std::generate_canonical, whose algorithm the standard fixes): the same draws for the same
/// seeded generator on every standard library, unlike std::normal_distribution's.
template <class URBG>
class NormalDraws {
 public:
  explicit NormalDraws(URBG& rng) : rng_(rng) {}

  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = 1.0 - uniform();  // in (0, 1]: log(u1) is finite
    const double u2 = uniform();
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double angle = 6.283185307179586476925286766559 * u2;
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return radius * std::cos(angle);
  }

 private:
  double uniform() {
    const double u = std::generate_canonical<double, std::numeric_limits<double>::digits>(rng_);
    return u < 1.0 ? u : std::nextafter(1.0, 0.0);  // (some libraries can round up to 1)
  }

  URBG& rng_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace detail

/// The SWA-Gaussian posterior of a model's parameters: mean, diagonal variance and the last
/// `max_rank` deviations, collected every `collect_every`-th update_parameters (see the header's
/// comment for the formulas). Every call that takes a model first checks it against the one the
/// SWAG was made for (names, kinds, shapes, storage orders, storage that moved) and throws
/// InvalidArgument naming the first difference, changing nothing.
///
/// Movable, not copyable (its views point into its own storage).
template <class T>
class SWAG {
 public:
  using Scalar = T;                      ///< the model's scalar type
  using Accumulator = accumulator_t<T>;  ///< the moments': float for 16-bit models

  /// The largest max_rank (a draw's z2 lives on the stack).
  static constexpr std::size_t max_rank_limit = 4096;

  /// A SWAG of `model`'s parameters with room for `max_rank` deviations (0: diagonal only).
  SWAG(const ParameterList<T>& model, std::int64_t max_rank, std::int64_t collect_every = 1)
      : max_rank_(max_rank), collect_every_(collect_every) {
    if (max_rank < 0 || static_cast<std::uint64_t>(max_rank) > max_rank_limit) {
      throw InvalidArgument("polyak::SWAG: max_rank " + std::to_string(max_rank) + " outside [0, " +
                            std::to_string(max_rank_limit) + "]");
    }
    if (collect_every < 1)
      throw InvalidArgument("polyak::SWAG: collect_every " + std::to_string(collect_every) + " < 1");
    for (std::size_t i = 0; i < model.size(); ++i) {
      if (!model[i].is_buffer()) parameters_.push_back(i);
    }
    const auto rank = static_cast<std::size_t>(max_rank);
    std::size_t total = 0;
    for (const std::size_t i : parameters_)
      total += 2 * padded(model[i].numel()) + padded(rank * model[i].numel());
    storage_.assign(total, Accumulator(0));
    Accumulator* at = storage_.data();
    for (const std::size_t i : parameters_) {
      const auto& entry = model[i];
      const std::size_t n = padded(entry.numel());
      mean_.add(entry.name(), TensorView<Accumulator>(at, entry.shape(), entry.storage_order()));
      variance_.add(entry.name(), TensorView<Accumulator>(at + n, entry.shape(), entry.storage_order()));
      deviations_.push_back(at + 2 * n);
      at += 2 * n + padded(rank * entry.numel());
    }
    for (const auto& entry : model)
      specs_.push_back({entry.name(), entry.shape(), entry.storage_order(), entry.is_buffer()});
  }

  SWAG(const SWAG&) = delete;
  SWAG& operator=(const SWAG&) = delete;
  /// Movable.
  SWAG(SWAG&&) = default;
  /// Movable.
  SWAG& operator=(SWAG&&) = default;

  /// Counts one step; on every collect_every-th, collects `model`: the mean, the variance and the
  /// newest deviation (the oldest dropped once max_rank are held).
  void update_parameters(const ParameterList<T>& model) {
    check_matches(model, "update_parameters");
    detail::check_can_count(n_updates_, "n_updates", "polyak::SWAG::update_parameters");
    if (++n_updates_ % collect_every_ != 0) return;
    ++n_collected_;
    const auto n = static_cast<Accumulator>(n_collected_);
    for (std::size_t p = 0; p < parameters_.size(); ++p) {
      const auto& current = model[parameters_[p]];
      Accumulator* mean = mean_[p].data();
      Accumulator* variance = variance_[p].data();
      Accumulator* deviation = deviation_row(p, next_deviation_);
      const T* x = current.data();
      for (std::size_t j = 0, size = current.numel(); j < size; ++j) {
        const auto value = static_cast<Accumulator>(x[j]);
        const Accumulator before = mean[j];
        mean[j] = before + (value - before) / n;  // polyak::SWA's step: the mean is the SWA average
        variance[j] += ((value - before) * (value - mean[j]) - variance[j]) / n;  // Welford
        if (max_rank_ > 0) deviation[j] = value - mean[j];
      }
    }
    if (max_rank_ > 0) {
      next_deviation_ = (next_deviation_ + 1) % max_rank_;
      held_ = std::min(held_ + 1, max_rank_);
    }
  }

  /// Writes one draw of the posterior into `model`'s parameters (its buffers are left to update_bn),
  /// rounded to T. `scale` multiplies the covariance; diagonal_only uses Sigma_diag alone. Refused
  /// (InvalidArgument, nothing written): nothing collected yet, a negative or non-finite scale, a
  /// full draw with fewer than two deviations held.
  template <class URBG>
  void sample(const ParameterList<T>& model, URBG& rng, double scale = 1.0,
              bool diagonal_only = false) const {
    check_matches(model, "sample");
    if (n_collected_ == 0) fail("sample", "nothing collected yet");
    if (!(scale >= 0.0) || !std::isfinite(scale))
      fail("sample", "scale " + detail::number_text(scale) + " is not >= 0");
    if (!diagonal_only && held_ < 2) {
      fail("sample", "a full draw needs two deviations, " + std::to_string(held_) +
                         (max_rank_ < 2 ? " fit (max_rank " + std::to_string(max_rank_) + ")" : " are held") +
                         "; diagonal_only draws need one collection");
    }
    detail::NormalDraws<URBG> normal(rng);
    // z2 first (one per deviation), then z1 scalar by scalar, tensor after tensor.
    double z2[max_rank_limit];
    const auto held = static_cast<std::size_t>(held_);  // <= max_rank_limit: the constructor checks
    for (std::size_t k = 0; k < held && !diagonal_only; ++k) z2[k] = normal();
    const double root = std::sqrt(scale);
    const double diagonal = diagonal_only ? root : root / std::sqrt(2.0);
    const double low_rank = diagonal_only ? 0.0 : root / std::sqrt(2.0 * static_cast<double>(held_ - 1));
    for (std::size_t p = 0; p < parameters_.size(); ++p) {
      T* out = model[parameters_[p]].data();
      const Accumulator* mean = mean_[p].data();
      const Accumulator* variance = variance_[p].data();
      for (std::size_t j = 0, size = mean_[p].numel(); j < size; ++j) {
        double draw = static_cast<double>(mean[j]) +
                      diagonal * std::sqrt(std::max(0.0, static_cast<double>(variance[j]))) * normal();
        if (!diagonal_only) {
          double combined = 0;
          for (std::size_t k = 0; k < held; ++k)
            combined += z2[k] * static_cast<double>(deviation_row(p, static_cast<std::int64_t>(k))[j]);
          draw += low_rank * combined;
        }
        out[j] = static_cast<T>(static_cast<Accumulator>(draw));
      }
    }
  }

  /// Writes the mean (the SWA solution) into `model`'s parameters, rounded to T: as
  /// AveragedModel::copy_to writes its average.
  void copy_to(const ParameterList<T>& model) const {
    check_matches(model, "copy_to");
    for (std::size_t p = 0; p < parameters_.size(); ++p)
      model[parameters_[p]].flat() = mean_[p].flat().template cast<T>();
  }

  /// Views onto the mean (the SWA average: AveragedModel::parameters() holds the same), one per
  /// parameter tensor.
  const ParameterList<Accumulator>& parameters() const noexcept { return mean_; }
  /// Views onto the diagonal variance, one per parameter tensor.
  const ParameterList<Accumulator>& variance() const noexcept { return variance_; }

  /// Deviation k (0 <= k < deviations_held(), in storage order, not age order) of parameter p:
  /// numel scalars in the parameter's storage order.
  const Accumulator* deviation(std::size_t p, std::int64_t k) const {
    if (p >= parameters_.size() || k < 0 || k >= held_)
      throw InvalidArgument("polyak::SWAG::deviation: no deviation " + std::to_string(k) + " of parameter " +
                            std::to_string(p));
    return deviation_row(p, k);
  }

  /// How many models were collected (every collect_every-th update).
  std::int64_t n_collected() const noexcept { return n_collected_; }
  /// How many update_parameters calls were counted.
  std::int64_t n_updates() const noexcept { return n_updates_; }
  /// How many deviations are held (at most max_rank).
  std::int64_t deviations_held() const noexcept { return held_; }
  /// The most deviations kept (K, the low-rank part's rank).
  std::int64_t max_rank() const noexcept { return max_rank_; }
  /// Every how many updates a model is collected.
  std::int64_t collect_every() const noexcept { return collect_every_; }

  ///@{
  /// Checkpoints: mean.NAME, variance.NAME, deviations.NAME ([max_rank, shape...], rows in
  /// storage order, not age order) and the counters; defined by the checkpoint layer (state_io.hpp).
  POLYAK_DETAIL_STATE_MEMBERS(SWAG);
  ///@}

 private:
  struct Spec {
    std::string name;
    std::vector<std::int64_t> shape;
    StorageOrder order;
    bool is_buffer;
  };

  /// Each tensor's blocks start on 64-byte boundaries.
  static std::size_t padded(std::size_t numel) {
    constexpr std::size_t align = 64 / sizeof(Accumulator);
    return (numel + align - 1) / align * align;
  }

  Accumulator* deviation_row(std::size_t p, std::int64_t k) const {
    return deviations_[p] + static_cast<std::size_t>(k) * mean_[p].numel();
  }

  void check_matches(const ParameterList<T>& model, const char* where) const {
    if (const std::string stale = model.stale_view(); !stale.empty())
      throw InvalidArgument(std::string("polyak::SWAG::") + where + ": " + stale);
    const std::string problem = detail::first_mismatch(
        model.size(), [&](std::size_t i) { return detail::spec_of(model[i]); }, "the model", specs_.size(),
        [&](std::size_t i) {
          const Spec& s = specs_[i];
          return detail::TensorSpec{
              s.name, s.shape.data(), s.shape.size(), s.order, {}, s.is_buffer ? "buffer" : "parameter"};
        },
        "the SWAG");
    if (!problem.empty()) fail(where, problem);
  }

  [[noreturn]] static void fail(const char* where, const std::string& what) {
    throw InvalidArgument(std::string("polyak::SWAG::") + where + ": " + what);
  }

  std::int64_t max_rank_;
  std::int64_t collect_every_;
  std::int64_t n_updates_ = 0;
  std::int64_t n_collected_ = 0;
  std::int64_t held_ = 0;            ///< deviations held: min(n_collected, max_rank)
  std::int64_t next_deviation_ = 0;  ///< the row the next deviation overwrites (the oldest once full)
  std::vector<Spec> specs_;          ///< the model as constructed: what every call checks against
  std::vector<std::size_t> parameters_;
  std::vector<Accumulator, Eigen::aligned_allocator<Accumulator>> storage_;
  ParameterList<Accumulator> mean_, variance_;  ///< views onto storage_, one per parameter
  std::vector<Accumulator*> deviations_;        ///< each parameter's max_rank rows of numel, contiguous
};

}  // namespace polyak
