// SPDX-License-Identifier: MIT
// What the SWAG tests share (core/test_swag.cpp, checkpoint/test_state_io.cpp): a model of two
// parameters and a buffer, and a stream of values for it.
#pragma once

#include <cmath>
#include <vector>

#include <Eigen/Core>

#include "polyak/core/tensor_view.hpp"

namespace polyak_test {

/// A model of a column-major 2 x 3 weight, a bias of 4 and a buffer SWAG leaves alone.
struct SwagModel {
  Eigen::MatrixXd weight = Eigen::MatrixXd::Zero(2, 3);
  Eigen::VectorXd bias = Eigen::VectorXd::Zero(4);
  Eigen::VectorXd running_mean = Eigen::VectorXd::Constant(2, 7.0);
  polyak::ParameterList<double> params;
  SwagModel() { params.add("weight", weight).add("bias", bias).add_buffer("running_mean", running_mean); }
  /// Sets the 10 parameters (weight in storage order, then bias) to row `x`.
  void set(const std::vector<double>& x) {
    for (int j = 0; j < 6; ++j) weight.data()[j] = x[static_cast<std::size_t>(j)];
    for (int j = 0; j < 4; ++j) bias[j] = x[static_cast<std::size_t>(6 + j)];
  }
};

/// `count` rows of the 10 parameters, a smooth drift of order 100.
inline std::vector<std::vector<double>> swag_stream(int count) {
  std::vector<std::vector<double>> xs;
  for (int i = 1; i <= count; ++i) {
    std::vector<double> x;
    for (int j = 0; j < 10; ++j) x.push_back(100.0 + std::sin(1.3 * i + 0.7 * j) + 0.1 * j * i);
    xs.push_back(x);
  }
  return xs;
}

}  // namespace polyak_test
