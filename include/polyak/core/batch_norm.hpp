// SPDX-License-Identifier: MIT
// Batch-norm running statistics, and update_bn: recompute them for averaged weights (PyTorch's
// torch.optim.swa_utils.update_bn).
//
// Averaged weights need their own batch-norm statistics: the running mean and variance that the
// last SGD weights produced do not describe the activations of the average. update_bn makes one
// pass over data with the averaged weights and recomputes them.
#pragma once

#include <algorithm>   // std::max
#include <cstddef>     // std::size_t
#include <cstdint>     // std::int64_t
#include <functional>  // std::reference_wrapper
#include <initializer_list>
#include <optional>   // momentum: empty = cumulative average
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::forward
#include <vector>

#include <Eigen/Core>

#include "polyak/core/detail/state_io_fwd.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/detail/number_text.hpp"

namespace polyak {

/// How update_bn combines the batches' moments.
enum class BatchNormUpdate {
  /// PyTorch's: a cumulative average of the per-batch means and of the per-batch unbiased
  /// variances. Not the variance of the whole data set: it leaves out the spread between the batch
  /// means, and weighs a small last batch like a full one.
  Cumulative,
  /// Pools the batches' moments (Chan et al.'s parallel merge): the result is the mean and unbiased
  /// variance over every sample of every batch, whatever the batch sizes.
  Exact,
};

template <class Batches, class Forward, class StatsRange>
void update_bn(Batches&& batches, Forward&& forward, StatsRange&& stats,
               BatchNormUpdate mode = BatchNormUpdate::Cumulative);

/// The running statistics one batch-norm layer keeps, as PyTorch's _BatchNorm keeps them: a layer of
/// the user's code embeds one and, in training mode, calls update() with each batch's moments.
template <class T>
class BatchNormStats {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "polyak::BatchNormStats: running statistics are kept in float or double");

 public:
  using Array = Eigen::Array<T, Eigen::Dynamic, 1>;  ///< one value a channel

  Array running_mean;                    ///< reset to 0
  Array running_var;                     ///< reset to 1; unbiased batch variances go in
  std::int64_t num_batches_tracked = 0;  ///< batches seen since the last reset
  std::optional<double> momentum;        ///< weight of a new batch; empty: 1 / num_batches_tracked

  /// `num_features` >= 0 channels; `initial_momentum` in [0, 1] or empty (PyTorch's momentum=None).
  explicit BatchNormStats(Eigen::Index num_features, std::optional<double> initial_momentum = 0.1)
      : running_mean(Array::Zero(checked_features(num_features))),
        running_var(Array::Ones(num_features)),
        momentum(initial_momentum) {
    check_momentum(momentum);
  }

  /// The channel count.
  Eigen::Index num_features() const noexcept { return running_mean.size(); }

  ///@{
  /// Checkpoints, with PyTorch's names; defined by the checkpoint layer: see StateIO<BatchNormStats>
  /// in polyak/checkpoint/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(BatchNormStats);
  ///@}

  /// Mean 0, variance 1, no batches tracked (PyTorch's reset_running_stats()).
  void reset() {
    running_mean.setZero();
    running_var.setOnes();
    num_batches_tracked = 0;
    if (pooled_count_ >= 0) pooled_count_ = 0;
  }

  /// Folds in one batch: `batch_mean` and `batch_var` are the per-channel mean and biased (population)
  /// variance the layer normalized with, over `batch_count` values per channel (N for 1-d inputs,
  /// N*H*W for 2-d). PyTorch's rule: with f = momentum, or 1 / num_batches_tracked when it is empty,
  ///     running_mean = f * batch_mean + (1 - f) * running_mean,
  ///     running_var  = f * batch_var * n / (n - 1) + (1 - f) * running_var.
  /// Inside update_bn's exact mode it pools the moments instead. Sizes that differ from
  /// num_features(), fewer than two values per channel, or a momentum outside [0, 1] are refused
  /// before anything changes.
  template <class Mean, class Var>
  void update(const Eigen::DenseBase<Mean>& batch_mean, const Eigen::DenseBase<Var>& batch_var,
              std::int64_t batch_count) {
    if (batch_mean.size() != num_features() || batch_var.size() != num_features()) {
      throw InvalidArgument("polyak::BatchNormStats::update: batch moments of sizes " +
                            std::to_string(batch_mean.size()) + " and " + std::to_string(batch_var.size()) +
                            " for " + std::to_string(num_features()) + " features");
    }
    if (batch_count < 2) {
      throw InvalidArgument("polyak::BatchNormStats::update: " + std::to_string(batch_count) +
                            " values per channel; the unbiased variance needs at least 2");
    }
    check_momentum(momentum);
    const auto mean = batch_mean.derived().array().template cast<T>();
    const auto var = batch_var.derived().array().template cast<T>();
    ++num_batches_tracked;
    if (pooled_count_ >= 0) {
      pool(mean, var, batch_count);
      return;
    }
    const T f = momentum ? static_cast<T>(*momentum) : T(1) / static_cast<T>(num_batches_tracked);
    const T bessel = static_cast<T>(batch_count) / static_cast<T>(batch_count - 1);
    running_mean = f * mean + (T(1) - f) * running_mean;
    running_var = f * var * bessel + (T(1) - f) * running_var;
  }

  /// One batch's per-channel moments: what a batch-norm layer normalizes with.
  struct Moments {
    Array mean;              ///< per channel
    Array var;               ///< per channel, biased (divided by count), as the layer normalizes
    std::int64_t count = 0;  ///< values per channel
  };

  /// Computes the per-channel mean and biased variance of `batch` (N x C, one row a sample), folds
  /// them in with update() (which applies Bessel's correction once) and returns them for the layer to
  /// normalize with. The moments are taken in two passes (mean, then squared deviations) in T.
  template <class Batch>
  Moments record_batch(const Eigen::DenseBase<Batch>& batch) {
    if (batch.cols() != num_features()) {
      throw InvalidArgument("polyak::BatchNormStats::record_batch: a batch of " +
                            std::to_string(batch.cols()) + " channels for " + std::to_string(num_features()) +
                            " features");
    }
    const auto x = batch.derived().template cast<T>().array();
    Moments m;
    m.count = static_cast<std::int64_t>(batch.rows());
    m.mean = x.colwise().mean().transpose();
    m.var = (x.rowwise() - m.mean.transpose()).square().colwise().sum().transpose() /
            static_cast<T>(std::max<Eigen::Index>(batch.rows(), 1));
    update(m.mean, m.var, m.count);
    return m;
  }

  /// The same for `n` samples of `channels` x `spatial` values stored contiguously in that order
  /// (PyTorch's NCHW, with H*W = spatial): each channel's moments over its n * spatial values.
  Moments record_batch(const T* data, Eigen::Index n, Eigen::Index channels, Eigen::Index spatial) {
    if (channels != num_features() || n < 0 || spatial < 0) {
      throw InvalidArgument("polyak::BatchNormStats::record_batch: a batch of " + std::to_string(n) + " x " +
                            std::to_string(channels) + " x " + std::to_string(spatial) + " for " +
                            std::to_string(num_features()) + " features");
    }
    // Sample i, channel c: a contiguous run of `spatial` values at (i * channels + c) * spatial.
    const Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic>> runs(data, spatial, n * channels);
    Moments m;
    m.count = static_cast<std::int64_t>(n * spatial);
    m.mean = Array::Zero(channels);
    m.var = Array::Zero(channels);
    const T count = static_cast<T>(std::max<std::int64_t>(m.count, 1));
    for (Eigen::Index i = 0; i < n; ++i)
      m.mean += runs.middleCols(i * channels, channels).colwise().sum().transpose();
    m.mean /= count;
    for (Eigen::Index i = 0; i < n; ++i) {
      m.var += (runs.middleCols(i * channels, channels).rowwise() - m.mean.transpose())
                   .square()
                   .colwise()
                   .sum()
                   .transpose();
    }
    m.var /= count;
    update(m.mean, m.var, m.count);
    return m;
  }

 private:
  template <class Batches, class Forward, class StatsRange>
  friend void update_bn(Batches&& batches, Forward&& forward, StatsRange&& stats, BatchNormUpdate mode);

  static Eigen::Index checked_features(Eigen::Index num_features) {
    if (num_features < 0) {
      throw InvalidArgument("polyak::BatchNormStats: num_features " + std::to_string(num_features) +
                            " is negative");
    }
    return num_features;
  }

  static void check_momentum(const std::optional<double>& momentum) {
    if (momentum && !detail::in_unit_interval(*momentum)) {
      throw InvalidArgument("polyak::BatchNormStats: " +
                            detail::unit_interval_problem(*momentum, "momentum"));
    }
  }

  /// Chan's merge of (pooled_count_ values: running_mean, running_var unbiased) with (n: mean, var
  /// biased): the pooled mean and unbiased variance of all the values.
  template <class Mean, class Var>
  void pool(const Mean& mean, const Var& var, std::int64_t n) {
    const T a = static_cast<T>(pooled_count_);
    const T b = static_cast<T>(n);
    const T total = a + b;
    if (pooled_count_ == 0) {
      running_mean = mean;
      running_var = var * (b / (total - T(1)));
    } else {
      // Sums of squared deviations: the pooled one's from its unbiased variance, the batch's from
      // its biased one, plus the spread between the two means.
      running_var = (running_var * (a - T(1)) + var * b + (mean - running_mean).square() * (a * b / total)) /
                    (total - T(1));
      running_mean += (mean - running_mean) * (b / total);
    }
    pooled_count_ += n;
  }

  std::int64_t pooled_count_ = -1;  ///< values pooled so far in update_bn's exact mode; -1 outside it
};

namespace detail {

template <class X>
struct is_reference_wrapper : std::false_type {};
template <class X>
struct is_reference_wrapper<std::reference_wrapper<X>> : std::true_type {};

/// The layer an entry of update_bn's range stands for: a pointer, a reference_wrapper or the object.
template <class X>
decltype(auto) stats_of(X&& x) {
  using D = std::remove_cv_t<std::remove_reference_t<X>>;
  if constexpr (std::is_pointer_v<D>) {
    return *x;
  } else if constexpr (is_reference_wrapper<D>::value) {
    return x.get();
  } else {
    return (x);
  }
}

}  // namespace detail

/// Recomputes the running statistics of every layer in `stats` (a range of BatchNormStats<T>
/// pointers, reference_wrappers or objects) with one pass over `batches`:
/// resets them, switches them to a cumulative average (momentum empty; in Exact mode, to pooling),
/// calls `forward(batch)` once per batch, and restores each momentum, also when `forward` throws.
///
/// `forward` is the user's: it runs the model (with the averaged weights in it, in training mode) on
/// a batch, so that each batch-norm layer calls its stats' update(). Unlike PyTorch's update_bn,
/// which calls `model(batch[0])`, it takes the batch whole: models with several inputs or a struct
/// work. With no stats, `forward` is not called (as PyTorch returns early).
template <class Batches, class Forward, class StatsRange>
void update_bn(Batches&& batches, Forward&& forward, StatsRange&& stats, BatchNormUpdate mode) {
  // Restores every layer's momentum, and ends pooling, however the pass ends.
  struct Restore {
    StatsRange& stats;
    std::vector<std::optional<double>> momenta;
    ~Restore() {
      std::size_t i = 0;
      for (auto&& entry : stats) {
        if (i == momenta.size()) break;  // forward never ran: the layers after it were not touched
        auto& layer = detail::stats_of(entry);
        layer.momentum = momenta[i++];
        layer.pooled_count_ = -1;
      }
    }
  } restore{stats, {}};

  for (auto&& entry : stats) {
    auto& layer = detail::stats_of(entry);
    // A layer listed twice keeps the momentum saved the first time (it is reset to none below).
    std::optional<double> saved = layer.momentum;
    std::size_t i = 0;
    for (auto&& earlier : stats) {
      if (i++ == restore.momenta.size()) break;
      if (&detail::stats_of(earlier) == &layer) saved = restore.momenta[i - 1];
    }
    restore.momenta.push_back(saved);
    layer.pooled_count_ = mode == BatchNormUpdate::Exact ? 0 : -1;
    layer.reset();
    layer.momentum.reset();
  }
  if (restore.momenta.empty()) return;
  for (auto&& batch : batches) forward(batch);
}

/// update_bn over a braced list of layers: update_bn(batches, forward, {&bn1, &bn2}).
template <class Batches, class Forward, class T>
void update_bn(Batches&& batches, Forward&& forward, std::initializer_list<BatchNormStats<T>*> stats,
               BatchNormUpdate mode = BatchNormUpdate::Cumulative) {
  const std::vector<BatchNormStats<T>*> layers(stats);
  update_bn(std::forward<Batches>(batches), std::forward<Forward>(forward), layers, mode);
}

}  // namespace polyak
