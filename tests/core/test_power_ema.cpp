// SPDX-License-Identifier: MIT
// Power-function EMA (EDM2), checked against the closed-form weights of the discrete power EMA,
// w_tau = (tau / t)^(gamma+1) - ((tau - 1) / t)^(gamma+1), applied directly to a stored synthetic
// trajectory (power_ema_trajectory.hpp). Post-hoc EMA: checkpoint/test_post_hoc_ema.cpp.
#include "polyak/core/power_ema.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <vector>

#include "polyak/core/averaged_model.hpp"
#include "power_ema_trajectory.hpp"
#include "test_types.hpp"

using polyak_test::Model;
using polyak_test::scalars;
using polyak_test::Trajectory;

TEST_CASE("sigma_rel and gamma convert both ways, as EDM2 tabulates", "[power_ema]") {
  // EDM2, section 3.1: sigma_rel 0.05 is gamma 16.97, 0.10 is gamma 6.94.
  CHECK(polyak::sigma_rel_to_gamma(0.05) == Approx(16.97).margin(0.005));
  CHECK(polyak::sigma_rel_to_gamma(0.10) == Approx(6.94).margin(0.005));
  for (const double sigma_rel : {0.01, 0.05, 0.08, 0.15, 0.25, 0.3}) {
    const double gamma = polyak::sigma_rel_to_gamma(sigma_rel);
    // A root of gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2), the cubic the relation is.
    const double c = 1 / (sigma_rel * sigma_rel);
    const double cubic = ((gamma + 7) * gamma + 16 - c) * gamma + 12 - c;
    CHECK(std::abs(cubic) < 1e-9 * c * std::max(1.0, gamma));
    CHECK(polyak::gamma_to_sigma_rel(gamma) == Approx(sigma_rel).epsilon(1e-13));
  }
  CHECK(polyak::max_sigma_rel() == Approx(0.3003).margin(1e-4));
  CHECK_THROWS_WITH(polyak::sigma_rel_to_gamma(0.31), Catch::Contains("sigma_rel 0.31"));
  CHECK_THROWS_AS(polyak::sigma_rel_to_gamma(0.0), std::invalid_argument);
  CHECK_THROWS_AS(polyak::sigma_rel_to_gamma(std::nan("")), std::invalid_argument);
  CHECK_THROWS_WITH(polyak::PowerEMA(-1.0), Catch::Contains("greater than -1"));
}

TEST_CASE("PowerEMA equals the direct weighted sum of the trajectory at every step", "[power_ema]") {
  const Trajectory path(300);
  for (const double gamma : {0.0, 6.94, 16.97}) {
    CAPTURE(gamma);
    Model model;
    model.set(path.theta[0]);
    polyak::AveragedModel<double, polyak::PowerEMA> ema(model.params, polyak::PowerEMA{gamma});
    double worst = 0;
    for (std::int64_t t = 1; t <= 300; ++t) {
      model.set(path.theta[static_cast<std::size_t>(t - 1)]);
      ema.update_parameters(model.params);
      for (int j = 0; j < scalars; j += 5) {
        const double expected = path.power_ema(t, gamma, j);
        worst = std::max(
            worst, std::abs(Model::at(ema.tensors(), j) - expected) / std::max(1.0, std::abs(expected)));
      }
    }
    CHECK(worst < 1e-12);
  }
  SECTION("gamma 0 is the running mean (SWA)") {
    const polyak::PowerEMA uniform(0.0);
    CHECK(uniform.decay(4) == Approx(0.75).epsilon(1e-15));
    CHECK(uniform.decay(1) == 0.0);
  }
}

TEMPLATE_TEST_CASE("PowerEMA in every scalar type: the direct weighted sum, and a constant stays constant",
                   "[power_ema]", POLYAK_SCALAR_TYPES) {
  using Acc = polyak::accumulator_t<TestType>;
  using Vector = Eigen::Matrix<TestType, Eigen::Dynamic, 1>;
  const double gamma = polyak::sigma_rel_to_gamma(0.1);
  Vector w = Vector::Zero(8), c = Vector::Constant(8, TestType(0.3f));
  polyak::ParameterList<TestType> list;
  list.add("w", w).add("c", c);
  polyak::AveragedModel<TestType, polyak::PowerEMA> ema(list, polyak::PowerEMA{gamma});
  std::vector<std::vector<double>> seen;  // the values as the model held them, after rounding to T
  const std::int64_t steps = 60;
  for (std::int64_t t = 1; t <= steps; ++t) {
    std::vector<double> row;
    for (Eigen::Index j = 0; j < 8; ++j) {
      w[j] = TestType(static_cast<float>(std::cos(0.1 * static_cast<double>(t) + static_cast<double>(j))));
      row.push_back(static_cast<double>(w[j]));
    }
    seen.push_back(row);
    ema.update_parameters(list);
  }
  for (Eigen::Index j = 0; j < 8; ++j) {
    double expected = 0;
    for (std::int64_t tau = 1; tau <= steps; ++tau)
      expected += Trajectory::weight(tau, steps, gamma) *
                  seen[static_cast<std::size_t>(tau - 1)][static_cast<std::size_t>(j)];
    CHECK(polyak_test::close(static_cast<double>(ema.tensors()[0].data()[j]), expected,
                             64 * polyak_test::tolerance_v<Acc>));
    CHECK(ema.tensors()[1].data()[j] ==
          static_cast<Acc>(c[j]));  // exactly: each step is a lerp between equals
  }
}
