// SPDX-License-Identifier: MIT
// What the power-EMA tests share (core/test_power_ema.cpp, checkpoint/test_post_hoc_ema.cpp): a
// stored synthetic trajectory whose every power EMA is computed directly, and a model holding it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <Eigen/Core>

#include "polyak/core/tensor_view.hpp"

namespace polyak_test {

constexpr int scalars = 24;

/// A noisy, drifting trajectory theta_1..theta_steps of `scalars` values, kept whole so that any
/// average of it can be computed directly.
struct Trajectory {
  std::vector<std::vector<double>> theta;  // theta[tau - 1][j]
  explicit Trajectory(int steps) {
    std::mt19937 rng(7);
    std::normal_distribution<double> noise(0.0, 0.3);
    for (int tau = 1; tau <= steps; ++tau) {
      std::vector<double> row(scalars);
      for (int j = 0; j < scalars; ++j) row[j] = std::sin(0.002 * tau * (j + 1)) + noise(rng);
      theta.push_back(row);
    }
  }
  /// The discrete power EMA weight of model tau at step t.
  static double weight(std::int64_t tau, std::int64_t t, double gamma) {
    const double td = static_cast<double>(t);
    return std::pow(static_cast<double>(tau) / td, gamma + 1) -
           std::pow(static_cast<double>(tau - 1) / td, gamma + 1);
  }
  /// sum_tau w_tau theta_tau for scalar j, computed directly.
  double power_ema(std::int64_t t, double gamma, int j) const {
    double sum = 0;
    for (std::int64_t tau = 1; tau <= t; ++tau)
      sum += weight(tau, t, gamma) * theta[static_cast<std::size_t>(tau - 1)][j];
    return sum;
  }
  /// Half the spread of scalar j over the first t models.
  double half_range(std::int64_t t, int j) const {
    double low = theta[0][j], high = theta[0][j];
    for (std::int64_t tau = 1; tau <= t; ++tau) {
      low = std::min(low, theta[static_cast<std::size_t>(tau - 1)][j]);
      high = std::max(high, theta[static_cast<std::size_t>(tau - 1)][j]);
    }
    return (high - low) / 2;
  }
};

/// A model of two tensors (a column-major matrix and a vector) holding `scalars` values.
struct Model {
  Eigen::MatrixXd weight = Eigen::MatrixXd::Zero(4, 5);
  Eigen::VectorXd bias = Eigen::VectorXd::Zero(scalars - 20);
  polyak::ParameterList<double> params;
  Model() {
    params.add("weight", weight);
    params.add("bias", bias);
  }
  void set(const std::vector<double>& values) {
    for (int j = 0; j < 20; ++j) weight.data()[j] = values[static_cast<std::size_t>(j)];
    for (int j = 20; j < scalars; ++j) bias[j - 20] = values[static_cast<std::size_t>(j)];
  }
  static double at(const polyak::ParameterList<double>& tensors, int j) {
    return j < 20 ? tensors[0].data()[j] : tensors[1].data()[j - 20];
  }
};

}  // namespace polyak_test
