// SPDX-License-Identifier: MIT
// A small MLP in plain Eigen: 64 -> Linear -> BatchNorm -> ReLU -> Linear -> 10, with its backward
// pass and SGD with momentum. Only the parts marked "polyak" concern the library.
#pragma once

#include <polyak/polyak.hpp>

#include "digits.hpp"
#include "report.hpp"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

struct Mlp {
  static constexpr float bn_eps = 1e-5f;

  Eigen::MatrixXf fc1_weight, fc2_weight;  // out x in, as torch.nn.Linear
  Eigen::RowVectorXf fc1_bias, bn_weight, bn_bias, fc2_bias;
  polyak::BatchNormStats<float> bn;  // polyak: the layer's running statistics

  Mlp(int hidden, std::mt19937& rng)
      : fc1_weight(hidden, 64),
        fc2_weight(10, hidden),
        fc1_bias(hidden),
        bn_weight(hidden),
        bn_bias(hidden),
        fc2_bias(10),
        bn(hidden) {
    // PyTorch's default Linear initialization: uniform in +-1/sqrt(fan_in).
    auto init = [&rng](auto& tensor, float fan_in) {
      std::uniform_real_distribution<float> uniform(-1.0f / std::sqrt(fan_in), 1.0f / std::sqrt(fan_in));
      for (Eigen::Index i = 0; i < tensor.size(); ++i) tensor.data()[i] = uniform(rng);
    };
    init(fc1_weight, 64);
    init(fc1_bias, 64);
    init(fc2_weight, static_cast<float>(hidden));
    init(fc2_bias, static_cast<float>(hidden));
    bn_weight.setOnes();
    bn_bias.setZero();
  }

  /// polyak: the model as named views, in torch.nn.Module's order (parameters, then buffers).
  polyak::ParameterList<float> tensors() {
    polyak::ParameterList<float> list;
    list.add("fc1.weight", fc1_weight).add("fc1.bias", fc1_bias);
    list.add("bn1.weight", bn_weight).add("bn1.bias", bn_bias);
    list.add("fc2.weight", fc2_weight).add("fc2.bias", fc2_bias);
    list.add_buffer("bn1.running_mean", bn.running_mean).add_buffer("bn1.running_var", bn.running_var);
    return list;
  }

  /// What the forward pass keeps for the backward one.
  struct Activations {
    RowMatrix normalized, hidden, probabilities;
    Eigen::RowVectorXf inv_std;
  };

  /// Class probabilities for a batch (one image a row). In training mode batch norm normalizes with
  /// the batch's moments and updates the running statistics; in evaluation mode it uses them.
  RowMatrix forward(const RowMatrix& x, bool training, Activations* keep = nullptr) {
    const RowMatrix z = (x * fc1_weight.transpose()).rowwise() + fc1_bias;
    Eigen::RowVectorXf mean, var;
    if (training) {
      mean = z.colwise().mean();
      var = (z.rowwise() - mean).array().square().colwise().mean();
      bn.update(mean.transpose(), var.transpose(), z.rows());  // polyak: PyTorch's running-stat rule
    } else {
      mean = bn.running_mean.transpose().matrix();
      var = bn.running_var.transpose().matrix();
    }
    const Eigen::RowVectorXf inv_std = (var.array() + bn_eps).rsqrt().matrix();
    RowMatrix normalized = (z.rowwise() - mean).array().rowwise() * inv_std.array();
    RowMatrix hidden = ((normalized.array().rowwise() * bn_weight.array()).rowwise() + bn_bias.array())
                           .cwiseMax(0.0f)
                           .matrix();
    RowMatrix logits = (hidden * fc2_weight.transpose()).rowwise() + fc2_bias;
    const Eigen::VectorXf row_max = logits.rowwise().maxCoeff();
    RowMatrix probabilities = (logits.colwise() - row_max).array().exp().matrix();
    probabilities.array().colwise() /= probabilities.rowwise().sum().array();
    if (keep) *keep = {std::move(normalized), std::move(hidden), probabilities, inv_std};
    return probabilities;
  }
};

/// Gradients and momentum buffers have the parameters' shapes.
struct MlpGradients {
  Eigen::MatrixXf fc1_weight, fc2_weight;
  Eigen::RowVectorXf fc1_bias, bn_weight, bn_bias, fc2_bias;

  /// polyak: views, so that gradients can be averaged across processes like parameters.
  polyak::ParameterList<float> tensors() {
    polyak::ParameterList<float> list;
    list.add("fc1.weight", fc1_weight).add("fc1.bias", fc1_bias);
    list.add("bn1.weight", bn_weight).add("bn1.bias", bn_bias);
    list.add("fc2.weight", fc2_weight).add("fc2.bias", fc2_bias);
    return list;
  }

  explicit MlpGradients(const Mlp& m)
      : fc1_weight(Eigen::MatrixXf::Zero(m.fc1_weight.rows(), m.fc1_weight.cols())),
        fc2_weight(Eigen::MatrixXf::Zero(m.fc2_weight.rows(), m.fc2_weight.cols())),
        fc1_bias(Eigen::RowVectorXf::Zero(m.fc1_bias.size())),
        bn_weight(Eigen::RowVectorXf::Zero(m.bn_weight.size())),
        bn_bias(Eigen::RowVectorXf::Zero(m.bn_bias.size())),
        fc2_bias(Eigen::RowVectorXf::Zero(m.fc2_bias.size())) {}
};

/// Mean cross-entropy of `probabilities` against `labels`.
inline double cross_entropy(const RowMatrix& probabilities, const std::vector<int>& labels) {
  double loss = 0;
  for (Eigen::Index i = 0; i < probabilities.rows(); ++i) {
    loss -= std::log(std::max(probabilities(i, labels[static_cast<std::size_t>(i)]), 1e-12f));
  }
  return loss / static_cast<double>(probabilities.rows());
}

/// Forward and backward on a batch in training mode: the gradients of the mean cross-entropy, whose
/// value goes to *loss.
inline MlpGradients gradients(Mlp& m, const RowMatrix& x, const std::vector<int>& labels, double* loss) {
  Mlp::Activations a;
  const RowMatrix p = m.forward(x, /*training=*/true, &a);
  *loss = cross_entropy(p, labels);
  const float batch = static_cast<float>(x.rows());

  // Backward: softmax cross-entropy, Linear, ReLU, batch norm, Linear.
  RowMatrix d_logits = p;
  for (Eigen::Index i = 0; i < x.rows(); ++i) d_logits(i, labels[static_cast<std::size_t>(i)]) -= 1.0f;
  d_logits /= batch;
  MlpGradients g(m);
  g.fc2_weight = d_logits.transpose() * a.hidden;
  g.fc2_bias = d_logits.colwise().sum();
  const RowMatrix d_hidden =
      ((d_logits * m.fc2_weight).array() * (a.hidden.array() > 0.0f).cast<float>()).matrix();
  g.bn_weight = (d_hidden.array() * a.normalized.array()).colwise().sum().matrix();
  g.bn_bias = d_hidden.colwise().sum();
  const RowMatrix d_norm = (d_hidden.array().rowwise() * m.bn_weight.array()).matrix();
  const Eigen::RowVectorXf sum_d = d_norm.colwise().sum();
  const Eigen::RowVectorXf sum_d_norm = (d_norm.array() * a.normalized.array()).colwise().sum().matrix();
  const RowMatrix d_z =
      (((d_norm * batch).rowwise() - sum_d).array() - a.normalized.array().rowwise() * sum_d_norm.array())
          .rowwise() *
      (a.inv_std.array() / batch);
  g.fc1_weight = d_z.transpose() * x;
  g.fc1_bias = d_z.colwise().sum();
  return g;
}

/// SGD with momentum and weight decay, PyTorch's torch.optim.SGD rule:
///     g += weight_decay * p;  v = momentum * v + g;  p -= lr * v.
inline void sgd_update(Mlp& m, MlpGradients& velocity, MlpGradients& g, double lr, double momentum,
                       double weight_decay) {
  auto update = [&](auto& param, auto& grad, auto& buf) {
    grad += static_cast<float>(weight_decay) * param;
    buf = static_cast<float>(momentum) * buf + grad;
    param -= static_cast<float>(lr) * buf;
  };
  update(m.fc1_weight, g.fc1_weight, velocity.fc1_weight);
  update(m.fc1_bias, g.fc1_bias, velocity.fc1_bias);
  update(m.bn_weight, g.bn_weight, velocity.bn_weight);
  update(m.bn_bias, g.bn_bias, velocity.bn_bias);
  update(m.fc2_weight, g.fc2_weight, velocity.fc2_weight);
  update(m.fc2_bias, g.fc2_bias, velocity.fc2_bias);
}

/// One SGD step on a batch; returns the batch's loss.
inline double sgd_step(Mlp& m, MlpGradients& velocity, const RowMatrix& x, const std::vector<int>& labels,
                       double lr, double momentum, double weight_decay) {
  double loss = 0;
  MlpGradients g = gradients(m, x, labels, &loss);
  sgd_update(m, velocity, g, lr, momentum, weight_decay);
  return loss;
}

/// Accuracy, mean cross-entropy (NLL) and expected calibration error of predicted probabilities
/// `p` (one row a test image): ECE over 15 equal-width confidence bins, the gap |accuracy -
/// confidence| of each bin weighted by its share of the images (Guo et al., 2017).
inline Score score_of(const RowMatrix& p, const std::vector<int>& labels) {
  constexpr int bins = 15;
  double correct[bins] = {}, confidence[bins] = {}, count[bins] = {};
  Score score;
  for (Eigen::Index i = 0; i < p.rows(); ++i) {
    Eigen::Index predicted;
    const double top = p.row(i).maxCoeff(&predicted);
    const bool right = predicted == labels[static_cast<std::size_t>(i)];
    score.accuracy += right;
    const int bin = std::min(bins - 1, static_cast<int>(top * bins));
    correct[bin] += right;
    confidence[bin] += top;
    ++count[bin];
  }
  const auto n = static_cast<double>(p.rows());
  score.accuracy /= n;
  score.loss = cross_entropy(p, labels);
  for (int b = 0; b < bins; ++b) score.ece += std::abs(correct[b] - confidence[b]) / n;
  return score;
}

/// Test scores in evaluation mode (batch norm with the running statistics).
inline Score evaluate(Mlp& model, const Dataset& test) {
  return score_of(model.forward(test.images, /*training=*/false), test.labels);
}
