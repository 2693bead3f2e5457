// SPDX-License-Identifier: MIT
// EMA decay schedules, checked against closed forms and against the update loops of diffusers'
// EMAModel and ema-pytorch's EMA, re-enacted here step by step in plain double arithmetic.
#include "polyak/core/ema_schedules.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "polyak/core/averaged_model.hpp"
#include "test_types.hpp"

using polyak::EmaCadence;
using polyak::InverseGammaDecay;
using polyak::ScheduledEMA;
using polyak::WarmupDecay;

namespace {

/// A model of two tensors whose values at call k are a fixed function of k (and of `block`: with
/// block b the values change only every b calls, on calls 1, b+1, 2b+1, ... counting from 0).
struct ScriptedModel {
  Eigen::MatrixXd weight = Eigen::MatrixXd::Zero(3, 2);
  Eigen::VectorXd bias = Eigen::VectorXd::Zero(4);
  polyak::ParameterList<double> params;
  ScriptedModel() {
    params.add("weight", weight);
    params.add("bias", bias);
  }
  /// The value of scalar j at call k.
  static double value(std::int64_t k, int j) {
    return std::sin(0.37 * static_cast<double>(k) + j) + 0.01 * j * k;
  }
  void set(std::int64_t k, std::int64_t block = 1) {
    const std::int64_t shown = (k + block - 1) / block;  // 0 for call 0, then constant over each block
    for (int j = 0; j < 6; ++j) weight.data()[j] = value(shown, j);
    for (int j = 0; j < 4; ++j) bias[j] = value(shown, 6 + j);
  }
  double at(const polyak::ParameterList<double>& averaged, int j) const {
    return j < 6 ? averaged[0].data()[j] : averaged[1].data()[j - 6];
  }
};

/// diffusers' EMAModel.get_decay(optimization_step), re-enacted.
double diffusers_decay(std::int64_t optimization_step, std::int64_t update_after_step, bool use_ema_warmup,
                       double decay, double inv_gamma, double power, double min_decay) {
  const std::int64_t step = std::max<std::int64_t>(0, optimization_step - update_after_step - 1);
  if (step <= 0) return 0.0;
  const double s = static_cast<double>(step);
  double value = use_ema_warmup ? 1 - std::pow(1 + s / inv_gamma, -power) : (1 + s) / (10 + s);
  value = std::min(value, decay);
  return std::max(value, min_decay);
}

}  // namespace

TEST_CASE("WarmupDecay is min(decay, (1 + t) / (10 + t))", "[ema_schedules]") {
  const WarmupDecay schedule(0.99);
  CHECK(schedule(1) == 2.0 / 11.0);
  CHECK(schedule(8) == 0.5);
  CHECK(schedule(80) == 0.9);
  CHECK(schedule(890) == 0.99);     // (1 + t) / (10 + t) = 0.99 exactly here
  CHECK(schedule(100000) == 0.99);  // clamped
  CHECK_THROWS_WITH(WarmupDecay(1.5), Catch::Contains("decay 1.5") && Catch::Contains("[0, 1]"));
  CHECK_THROWS_AS(WarmupDecay(std::nan("")), std::invalid_argument);
}

TEST_CASE("InverseGammaDecay is clamp(1 - (1 + t / inv_gamma)^-power, min_decay, decay)", "[ema_schedules]") {
  // Steps where the power is exact: 8^(-2/3) = 1/4, 27^(-2/3) = 1/9, (1 + 6/2)^-1 = 1/4.
  const InverseGammaDecay defaults(0.9999);
  CHECK(defaults(7) == Approx(0.75).epsilon(1e-15));
  CHECK(defaults(26) == Approx(8.0 / 9.0).epsilon(1e-15));
  CHECK(InverseGammaDecay(0.9999, 2.0, 1.0)(6) == Approx(0.75).epsilon(1e-15));
  // decay 0.999 is reached once (1 + t)^(-2/3) <= 0.001, i.e. 1 + t >= 1000^1.5 = 31622.78
  const InverseGammaDecay capped(0.999);
  CHECK(capped(31620) < 0.999);
  CHECK(capped(31622) == 0.999);
  // min_decay clamps from below: 1 - 2^-1 = 0.5 at t = 1 with power 1 is raised to 0.6
  CHECK(InverseGammaDecay(0.9, 1.0, 1.0, 0.6)(1) == 0.6);
  CHECK(InverseGammaDecay(0.9, 1.0, 1.0, 0.6)(3) == 0.75);
  CHECK_THROWS_WITH(InverseGammaDecay(0.9, 1.0, 1.0, 0.95), Catch::Contains("min_decay"));
  CHECK_THROWS_WITH(InverseGammaDecay(0.9, 0.0), Catch::Contains("inv_gamma"));
  CHECK_THROWS_WITH(InverseGammaDecay(0.9, 1.0, -1.0), Catch::Contains("power"));
}

TEST_CASE("ScheduledEMA follows diffusers' EMAModel.step, step by step", "[ema_schedules]") {
  for (const bool warmup : {false, true}) {
    for (const std::int64_t after : {std::int64_t{0}, std::int64_t{5}}) {
      CAPTURE(warmup, after);
      const double decay = 0.95, inv_gamma = 1.0, power = 0.75, min_decay = 0.1;
      ScriptedModel model;
      model.set(0);
      std::vector<double> shadow(10);  // diffusers: the shadow parameters, copied at construction
      auto run = [&](auto avg_fn) {
        polyak::AveragedModel<double, decltype(avg_fn)> ema(model.params, avg_fn);
        for (int j = 0; j < 10; ++j) shadow[static_cast<std::size_t>(j)] = ScriptedModel::value(0, j);
        double worst = 0;
        for (std::int64_t step = 1; step <= 60; ++step) {
          model.set(step);
          const double d = diffusers_decay(step, after, warmup, decay, inv_gamma, power, min_decay);
          for (int j = 0; j < 10; ++j) {
            auto& s = shadow[static_cast<std::size_t>(j)];
            s -= (1 - d) * (s - ScriptedModel::value(step, j));
          }
          ema.update_parameters(model.params);
          for (int j = 0; j < 10; ++j) {
            const double expected = shadow[static_cast<std::size_t>(j)];
            worst = std::max(
                worst, std::abs(model.at(ema.tensors(), j) - expected) / std::max(1.0, std::abs(expected)));
          }
        }
        return worst;
      };
      // diffusers clamps the plain warm-up to min_decay too: the user's own lambda composes that.
      const double worst =
          warmup
              ? run(ScheduledEMA{InverseGammaDecay{decay, inv_gamma, power, min_decay}, {after}})
              : run(ScheduledEMA{[&](std::int64_t t) { return std::max(WarmupDecay{decay}(t), min_decay); },
                                 EmaCadence{after}});
      CHECK(worst < 1e-12);
    }
  }
}

TEST_CASE("ScheduledEMA with compound = false follows ema-pytorch's EMA.update", "[ema_schedules]") {
  const double beta = 0.99, inv_gamma = 1.0, power = 2.0 / 3.0, min_value = 0.0;
  const std::int64_t update_after_step = 7, update_every = 3;
  ScriptedModel model;
  model.set(0);
  polyak::AveragedModel ema(model.params,
                            ScheduledEMA{InverseGammaDecay{beta, inv_gamma, power, min_value},
                                         {update_after_step, update_every, /*compound=*/false}});
  // ema-pytorch: a step counter from 0; the EMA copy starts as the model's.
  std::vector<double> shadow(10);
  for (int j = 0; j < 10; ++j) shadow[static_cast<std::size_t>(j)] = ScriptedModel::value(0, j);
  std::int64_t counter = 0;
  double worst = 0;
  for (std::int64_t call = 0; call < 80; ++call) {
    model.set(call);
    ema.update_parameters(model.params);
    const std::int64_t step = counter++;
    if (step % update_every == 0) {
      const double epoch = std::max(0.0, static_cast<double>(counter - update_after_step - 1));
      double d = std::clamp(1 - std::pow(1 + epoch / inv_gamma, -power), min_value, beta);
      if (epoch <= 0) d = 0;
      if (step <= update_after_step) d = 0;  // copy_params_from_model_to_ema
      for (int j = 0; j < 10; ++j) {
        auto& s = shadow[static_cast<std::size_t>(j)];
        s = s + (1 - d) * (ScriptedModel::value(call, j) - s);  // lerp_(current, 1 - decay)
      }
    }
    for (int j = 0; j < 10; ++j) {
      const double expected = shadow[static_cast<std::size_t>(j)];
      worst = std::max(worst,
                       std::abs(model.at(ema.tensors(), j) - expected) / std::max(1.0, std::abs(expected)));
    }
  }
  CHECK(worst < 1e-12);
}

TEST_CASE("update_every with compounding equals the every-step EMA when weights change every k steps",
          "[ema_schedules]") {
  const InverseGammaDecay schedule(0.995, 1.0, 0.75);
  for (const std::int64_t k : {std::int64_t{2}, std::int64_t{4}, std::int64_t{7}}) {
    CAPTURE(k);
    ScriptedModel sparse_model, dense_model;
    sparse_model.set(0, k);
    dense_model.set(0, k);
    polyak::AveragedModel sparse(sparse_model.params, ScheduledEMA{schedule, {3, k, true}});
    polyak::AveragedModel dense(dense_model.params, ScheduledEMA{schedule, {3, 1, true}});
    double worst = 0;
    for (std::int64_t call = 0; call <= 20 * k; ++call) {
      sparse_model.set(call, k);
      dense_model.set(call, k);
      sparse.update_parameters(sparse_model.params);
      dense.update_parameters(dense_model.params);
      if (call % k != 0) continue;  // between updates the sparse average lags by design
      for (int j = 0; j < 10; ++j) {
        const double expected = dense_model.at(dense.tensors(), j);
        worst = std::max(worst, std::abs(sparse_model.at(sparse.tensors(), j) - expected));
      }
    }
    CHECK(worst < 1e-12);
  }
  SECTION("without compounding, the memory is k times longer: the two differ") {
    ScriptedModel a, b;
    polyak::AveragedModel compounded(a.params, ScheduledEMA{schedule, {0, 4, true}});
    polyak::AveragedModel plain(b.params, ScheduledEMA{schedule, {0, 4, false}});
    CHECK(compounded.avg_fn().decay_at(400) ==
          Approx(schedule(397) * schedule(398) * schedule(399) * schedule(400)));
    CHECK(plain.avg_fn().decay_at(400) == schedule(400));
    CHECK_FALSE(plain.avg_fn().updates_at(401));
  }
}

TEST_CASE("ScheduledEMA refuses bad settings and a schedule's bad decay, changing nothing",
          "[ema_schedules]") {
  CHECK_THROWS_WITH(ScheduledEMA(WarmupDecay{}, {0, 0}), Catch::Contains("update_every"));
  CHECK_THROWS_WITH(ScheduledEMA(WarmupDecay{}, {-1, 1}), Catch::Contains("update_after_step"));
  ScriptedModel model;
  model.set(0);
  polyak::AveragedModel ema(model.params, ScheduledEMA{[](std::int64_t t) { return t < 3 ? 0.5 : 1.5; }});
  model.set(1);
  ema.update_parameters(model.params);
  model.set(2);
  ema.update_parameters(model.params);
  model.set(3);
  ema.update_parameters(model.params);
  const Eigen::MatrixXd before = Eigen::Map<const Eigen::MatrixXd>(ema.tensors()[0].data(), 3, 2);
  model.set(4);
  CHECK_THROWS_WITH(ema.update_parameters(model.params),
                    Catch::Contains("decay 1.5") && Catch::Contains("step 3"));
  CHECK(Eigen::Map<const Eigen::MatrixXd>(ema.tensors()[0].data(), 3, 2) == before);
  CHECK(ema.n_averaged() == 3);
}

TEMPLATE_TEST_CASE("ScheduledEMA of a constant is that constant, in every scalar type", "[ema_schedules]",
                   POLYAK_SCALAR_TYPES) {
  using Acc = polyak::accumulator_t<TestType>;
  using Vector = Eigen::Matrix<TestType, Eigen::Dynamic, 1>;
  Vector c = Vector::Constant(5, TestType(-1.7f));
  polyak::ParameterList<TestType> list;
  list.add("c", c);
  polyak::AveragedModel ema(list, polyak::ScheduledEMA{polyak::InverseGammaDecay{0.999}, {3, 2}});
  for (int step = 0; step < 40; ++step) ema.update_parameters(list);
  for (Eigen::Index j = 0; j < 5; ++j) CHECK(ema.tensors()[0].data()[j] == static_cast<Acc>(c[j]));
}
