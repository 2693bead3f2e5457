// SPDX-License-Identifier: MIT
// A small libtorch CNN for the 8x8 digits, and the digits data as libtorch tensors: the model of
// examples/libtorch_swa and of the libtorch parity test (tests/reference/libtorch_swa.py builds the
// same one in Python, where the layers have the same names: "0.weight", "1.running_mean", ...).
#pragma once

#include <torch/torch.h>

#include "digits.hpp"
#include "report.hpp"

/// Conv2d(1, 8, 3, padding 1) - BatchNorm2d - ReLU - MaxPool2d(2) - Flatten - Linear(128, 32) -
/// BatchNorm1d - ReLU - Linear(32, 10).
inline torch::nn::Sequential make_digits_cnn() {
  namespace nn = torch::nn;
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, 8, 3).padding(1)), nn::BatchNorm2d(8), nn::ReLU(),
                        nn::MaxPool2d(2), nn::Flatten(), nn::Linear(128, 32), nn::BatchNorm1d(32), nn::ReLU(),
                        nn::Linear(32, 10));
}

/// The images of `set` as an N x 1 x 8 x 8 float tensor.
inline torch::Tensor images_of(const Dataset& set) {
  const RowMatrix rows = set.images;  // row-major: one image after the other
  return torch::from_blob(const_cast<float*>(rows.data()), {rows.rows(), 1, 8, 8}, torch::kFloat).clone();
}

/// The labels of `set` as an N int64 tensor.
inline torch::Tensor labels_of(const Dataset& set) {
  std::vector<std::int64_t> labels(set.labels.begin(), set.labels.end());
  return torch::tensor(labels, torch::kLong);
}

/// The training images in fixed batches of `size`, in order: update_bn's pass.
inline std::vector<torch::Tensor> batches_of(const torch::Tensor& images, std::int64_t size) {
  std::vector<torch::Tensor> batches;
  for (std::int64_t start = 0; start < images.size(0); start += size)
    batches.push_back(images.slice(0, start, std::min(images.size(0), start + size)));
  return batches;
}

/// Test accuracy and mean cross-entropy of `net` in eval mode on `images`, `labels`.
inline Score evaluate(torch::nn::Sequential& net, const torch::Tensor& images, const torch::Tensor& labels) {
  torch::NoGradGuard no_grad;
  net->eval();
  const torch::Tensor logits = net->forward(images);
  return {logits.argmax(1).eq(labels).to(torch::kDouble).mean().item<double>(),
          torch::nn::functional::cross_entropy(logits, labels).item<double>()};
}
