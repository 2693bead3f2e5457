// SPDX-License-Identifier: MIT
#include "polyak/core/batch_norm.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <iostream>
#include <random>
#include <stdexcept>
#include <vector>

#include "reference_file.hpp"
#include "test_types.hpp"

using polyak::BatchNormStats;
using polyak::BatchNormUpdate;
using polyak::update_bn;

namespace {

/// A batch as PyTorch lays it out: samples x channels x (spatial positions), row-major.
template <class T>
struct Batch {
  std::int64_t samples = 0;
  std::vector<T> values;
};

/// A toy batch-norm layer as a user's model embeds one: in training mode it normalizes with the
/// batch's moments and updates its running statistics.
template <class T>
struct BatchNormLayer {
  BatchNormStats<T> stats;
  Eigen::Index spatial;

  void forward(const Batch<T>& batch) {
    const Eigen::Index channels = stats.num_features();
    Eigen::Array<T, Eigen::Dynamic, 1> mean = Eigen::Array<T, Eigen::Dynamic, 1>::Zero(channels);
    Eigen::Array<T, Eigen::Dynamic, 1> var = Eigen::Array<T, Eigen::Dynamic, 1>::Zero(channels);
    const std::int64_t count = batch.samples * spatial;
    for (Eigen::Index c = 0; c < channels; ++c) {
      double sum = 0, squares = 0;
      for (std::int64_t n = 0; n < batch.samples; ++n) {
        for (Eigen::Index s = 0; s < spatial; ++s) sum += batch.values[(n * channels + c) * spatial + s];
      }
      const double m = sum / count;
      for (std::int64_t n = 0; n < batch.samples; ++n) {
        for (Eigen::Index s = 0; s < spatial; ++s) {
          const double d = batch.values[(n * channels + c) * spatial + s] - m;
          squares += d * d;
        }
      }
      mean[c] = static_cast<T>(m);
      var[c] = static_cast<T>(squares / count);  // biased, as the layer normalizes with
    }
    stats.update(mean, var, count);
  }
};

/// A dynamic-size array: GCC 12 warns falsely (-Warray-bounds) on Eigen's fixed-size float packets.
Eigen::ArrayXf floats_of(std::initializer_list<float> values) {
  return Eigen::Map<const Eigen::ArrayXf>(values.begin(), static_cast<Eigen::Index>(values.size()));
}

template <class T>
void check_reference_case(const std::vector<polyak_test::Record>& records, std::size_t& r, double& worst) {
  const auto& head = records[r];
  const Eigen::Index channels = head.integer(2);
  Eigen::Index spatial = 1;
  for (std::size_t i = 4; i < head.words.size(); ++i) spatial *= head.integer(i);
  INFO("case " << head.words.at(0) << " " << head.words.at(1));

  std::vector<Batch<T>> batches;
  for (++r; records[r].kind == "batch"; ++r) {
    Batch<T> batch;
    batch.samples = records[r].integer(0);
    for (const double v : records[r].numbers(1)) batch.values.push_back(static_cast<T>(v));
    batches.push_back(batch);
  }
  BatchNormLayer<T> layer{BatchNormStats<T>(channels), spatial};
  layer.stats.running_mean.setConstant(5);  // stale, as in the script
  layer.stats.running_var.setConstant(9);
  layer.stats.num_batches_tracked = 17;
  update_bn(batches, [&](const Batch<T>& batch) { layer.forward(batch); }, {&layer.stats});

  const auto expected_mean = records[r++].numbers();
  const auto expected_var = records[r++].numbers();
  CHECK(layer.stats.num_batches_tracked == records[r++].integer(0));
  CHECK(layer.stats.momentum == Approx(records[r++].number(0)));
  for (Eigen::Index c = 0; c < channels; ++c) {
    const double mean_error = std::abs(layer.stats.running_mean[c] - expected_mean[c]);
    const double var_error = std::abs(layer.stats.running_var[c] - expected_var[c]);
    CHECK(mean_error <= 1e-6 * std::max(1.0, std::abs(expected_mean[c])));
    CHECK(var_error <= 1e-6 * std::max(1.0, std::abs(expected_var[c])));
    worst = std::max({worst, mean_error, var_error});
  }
}

}  // namespace

TEST_CASE("update_bn agrees with PyTorch's update_bn on BatchNorm1d and BatchNorm2d",
          "[reference][batch_norm]") {
  // The golden file: tests/reference/batch_norm.py (see its docstring for the cases and the format).
  const auto records = polyak_test::read_records("batch_norm.txt");
  int cases = 0;
  double worst = 0;
  for (std::size_t r = 0; r < records.size(); ++r) {
    if (records[r].kind != "case") continue;
    if (records[r].words.at(1) == "float32") {
      check_reference_case<float>(records, r, worst);
    } else {
      check_reference_case<double>(records, r, worst);
    }
    ++cases;
  }
  CHECK(cases == 4);
  std::cout << "reference update_bn: largest difference in running mean or var " << worst << " over " << cases
            << " cases\n";
}

TEST_CASE("exact mode gives the mean and unbiased variance of the whole data set", "[batch_norm]") {
  std::mt19937 rng(21);
  std::normal_distribution<double> normal;
  const Eigen::Index channels = 3, spatial = 4;
  std::vector<Batch<double>> batches;
  for (const std::int64_t samples : {9, 2, 31, 5, 1}) {  // unequal, and one of a single sample
    Batch<double> batch{samples, {}};
    for (std::int64_t n = 0; n < samples; ++n) {
      for (Eigen::Index c = 0; c < channels; ++c) {
        const double shift = 10.0 * static_cast<double>(c) + static_cast<double>(batches.size());  // drifts
        for (Eigen::Index s = 0; s < spatial; ++s) batch.values.push_back(shift + (1.0 + c) * normal(rng));
      }
    }
    batches.push_back(batch);
  }

  // Two passes over all the values, directly.
  std::vector<double> mean(channels, 0.0), var(channels, 0.0);
  std::int64_t total = 0;
  for (const auto& batch : batches) total += batch.samples * spatial;
  for (Eigen::Index c = 0; c < channels; ++c) {
    for (const auto& batch : batches) {
      for (std::int64_t n = 0; n < batch.samples; ++n) {
        for (Eigen::Index s = 0; s < spatial; ++s) mean[c] += batch.values[(n * channels + c) * spatial + s];
      }
    }
    mean[c] /= total;
    for (const auto& batch : batches) {
      for (std::int64_t n = 0; n < batch.samples; ++n) {
        for (Eigen::Index s = 0; s < spatial; ++s) {
          const double d = batch.values[(n * channels + c) * spatial + s] - mean[c];
          var[c] += d * d;
        }
      }
    }
    var[c] /= total - 1;
  }

  BatchNormLayer<double> layer{BatchNormStats<double>(channels, 0.3), spatial};
  auto forward = [&](const Batch<double>& batch) { layer.forward(batch); };
  update_bn(batches, forward, {&layer.stats}, BatchNormUpdate::Exact);
  for (Eigen::Index c = 0; c < channels; ++c) {
    CHECK(layer.stats.running_mean[c] == Approx(mean[c]).epsilon(1e-12));
    CHECK(layer.stats.running_var[c] == Approx(var[c]).epsilon(1e-12));
  }
  CHECK(layer.stats.momentum == 0.3);  // restored
  CHECK(layer.stats.num_batches_tracked == 5);

  // PyTorch's cumulative mode is not that: it averages per-batch variances, missing the drift.
  update_bn(batches, forward, {&layer.stats}, BatchNormUpdate::Cumulative);
  CHECK(std::abs(layer.stats.running_var[0] - var[0]) > 0.05 * var[0]);

  // After the pass the layer is back to its momentum rule, not pooling.
  const double before = layer.stats.running_mean[0];
  layer.forward(batches[0]);
  const double batch_mean = [&] {
    double sum = 0;
    for (std::int64_t n = 0; n < batches[0].samples; ++n) {
      for (Eigen::Index s = 0; s < spatial; ++s) sum += batches[0].values[(n * channels) * spatial + s];
    }
    return sum / (batches[0].samples * spatial);
  }();
  CHECK(layer.stats.running_mean[0] == Approx(0.7 * before + 0.3 * batch_mean).epsilon(1e-12));
}

TEST_CASE("update_bn restores every momentum when forward throws", "[batch_norm]") {
  BatchNormStats<float> first(2, 0.2), second(2, std::nullopt), third(2, 0.05);
  std::vector<int> batches{1, 2, 3};
  auto forward = [](int batch) {
    if (batch == 2) throw std::runtime_error("out of memory, say");
  };
  std::vector<BatchNormStats<float>*> layers{&first, &second, &third};
  CHECK_THROWS_WITH(update_bn(batches, forward, layers, BatchNormUpdate::Exact), "out of memory, say");
  CHECK(first.momentum == 0.2);
  CHECK_FALSE(second.momentum.has_value());
  CHECK(third.momentum == 0.05);
  // and the layers are back to their momentum rule
  first.update(floats_of({1, 1}), floats_of({1, 1}), 2);
  CHECK(first.running_mean[0] == Approx(0.2));
}

TEST_CASE("update_bn passes the batch whole and takes layers in any range", "[batch_norm]") {
  struct TwoInputs {
    Eigen::Array2d a, b;
  };
  BatchNormStats<double> stats(2);
  std::vector<std::reference_wrapper<BatchNormStats<double>>> layers{stats};
  const std::vector<TwoInputs> batches{{{1, 2}, {3, 4}}, {{5, 6}, {7, 8}}};
  int calls = 0;
  update_bn(
      batches,
      [&](const TwoInputs& batch) {
        ++calls;
        stats.update(batch.a + batch.b, Eigen::Array2d(1, 1), 2);
      },
      layers);
  CHECK(calls == 2);
  CHECK(stats.running_mean[0] == Approx((4.0 + 12.0) / 2));
  CHECK(stats.running_var[0] == Approx(2.0));  // unbiased: 1 * 2 / (2 - 1)

  // No layers: like PyTorch, no pass at all.
  std::vector<BatchNormStats<double>*> none;
  update_bn(
      batches, [&](const TwoInputs&) { ++calls; }, none);
  CHECK(calls == 2);
}

TEST_CASE("BatchNormStats refuses bad input and changes nothing", "[batch_norm]") {
  BatchNormStats<float> stats(3);
  CHECK_THROWS_WITH(stats.update(floats_of({0, 0}), floats_of({1, 1}), 4),
                    Catch::Contains("sizes 2 and 2 for 3 features"));
  CHECK_THROWS_WITH(stats.update(floats_of({0, 0, 0}), floats_of({1, 1, 1}), 1),
                    Catch::Contains("at least 2"));
  CHECK_THROWS_WITH(BatchNormStats<float>(3, 1.5), Catch::Contains("momentum 1.5"));
  stats.momentum = -0.1;
  CHECK_THROWS_WITH(stats.update(floats_of({0, 0, 0}), floats_of({1, 1, 1}), 4), Catch::Contains("momentum"));
  CHECK(stats.num_batches_tracked == 0);
  CHECK((stats.running_mean == 0).all());
  CHECK((stats.running_var == 1).all());
}

// Issue 12, item 9: the same layer listed twice had its momentum restored from the second (already
// emptied) copy, so it came out with none.
TEST_CASE("update_bn takes a layer listed twice once and restores its momentum", "[batch_norm]") {
  BatchNormStats<float> bn(2, 0.3);
  std::vector<int> batches{1, 2};
  int calls = 0;
  update_bn(batches,
            [&](int) {
              ++calls;
              bn.update(floats_of({1, 1}), floats_of({1, 1}), 4);
            },
            {&bn, &bn});
  CHECK(calls == 2);
  REQUIRE(bn.momentum.has_value());
  CHECK(*bn.momentum == 0.3);
  CHECK(bn.num_batches_tracked == 2);  // reset once, then two batches
}

// Issue 12, "promises": update_bn left the batch moments to the user, and a hand-written loop that
// passed an unbiased variance was Bessel-corrected twice. record_batch computes them from the batch.
TEST_CASE("record_batch takes a batch's moments itself: N x C and N x C x spatial", "[batch_norm]") {
  // N x C: 4 samples of 2 channels. Channel 0: 1, 2, 3, 6 (mean 3, biased var 3.5, unbiased 14/3);
  // channel 1: all 5.
  Eigen::MatrixXd batch(4, 2);
  batch << 1, 5, 2, 5, 3, 5, 6, 5;
  BatchNormStats<double> stats(2, 1.0);  // momentum 1: running statistics are this batch's
  const auto moments = stats.record_batch(batch);
  CHECK(moments.count == 4);
  CHECK(moments.mean[0] == 3.0);
  CHECK(moments.var[0] == 3.5);  // biased: what the layer normalizes with
  CHECK(moments.var[1] == 0.0);
  CHECK(stats.running_mean[0] == 3.0);
  CHECK(stats.running_var[0] == Approx(14.0 / 3).epsilon(1e-15));  // unbiased, corrected once
  CHECK(stats.num_batches_tracked == 1);

  // N x C x spatial, row-major (PyTorch's NCHW): 2 samples, 2 channels, 3 positions. Channel 0 holds
  // 0..2 and 6..8 (mean 4; squared deviations 16+9+4+4+9+16 = 58, biased var 58/6 = 29/3),
  // channel 1 holds 3..5 and 9..11 (mean 7).
  std::vector<float> nchw(12);
  for (std::size_t i = 0; i < 12; ++i) nchw[i] = static_cast<float>(i);
  BatchNormStats<float> spatial(2, 1.0);
  const auto m = spatial.record_batch(nchw.data(), 2, 2, 3);
  CHECK(m.count == 6);
  CHECK(m.mean[0] == 4.0f);
  CHECK(m.mean[1] == 7.0f);
  CHECK(m.var[0] == Approx(29.0 / 3));
  CHECK(spatial.running_var[0] == Approx(29.0 / 3 * 6 / 5));  // unbiased: 58 / 5
  CHECK_THROWS_WITH(spatial.record_batch(nchw.data(), 1, 2, 1), Catch::Contains("at least 2"));
  CHECK_THROWS_WITH(stats.record_batch(Eigen::MatrixXd(4, 3)), Catch::Contains("3 channels for 2 features"));
  CHECK(spatial.num_batches_tracked == 1);
}
