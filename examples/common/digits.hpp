// SPDX-License-Identifier: MIT
// The handwritten-digits data (examples/data/README.md): loading and the fixed train/test split.
#pragma once

#include <Eigen/Core>

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

/// A batch: one image a row, as PyTorch lays batches out.
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct Dataset {
  Eigen::MatrixXf images;   // one 64-pixel image a row, scaled to [0, 1]
  std::vector<int> labels;  // the digit of each row
};

struct Digits {
  Dataset train, test;
};

/// Reads digits.csv: 64 pixel values (0..16) and the label on each line. Sample i is a test
/// sample when i % 4 == 3.
inline Digits load_digits(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<std::vector<float>> rows[2];
  std::vector<int> labels[2];
  std::string line;
  for (int i = 0; std::getline(in, line); ++i) {
    std::istringstream fields(line);
    std::vector<float> pixels(64);
    std::string field;
    for (float& pixel : pixels) {
      if (!std::getline(fields, field, ','))
        throw std::runtime_error(path + ": short line " + std::to_string(i + 1));
      pixel = std::stof(field) / 16.0f;
    }
    if (!std::getline(fields, field, ','))
      throw std::runtime_error(path + ": no label on line " + std::to_string(i + 1));
    const int part = i % 4 == 3 ? 1 : 0;
    rows[part].push_back(std::move(pixels));
    labels[part].push_back(std::stoi(field));
  }
  Digits digits;
  for (int part = 0; part < 2; ++part) {
    Dataset& set = part == 0 ? digits.train : digits.test;
    set.images.resize(static_cast<Eigen::Index>(rows[part].size()), 64);
    for (std::size_t r = 0; r < rows[part].size(); ++r) {
      set.images.row(static_cast<Eigen::Index>(r)) =
          Eigen::Map<const Eigen::RowVectorXf>(rows[part][r].data(), 64);
    }
    set.labels = labels[part];
  }
  if (digits.train.labels.size() + digits.test.labels.size() != 1797) {
    throw std::runtime_error(path + ": expected 1797 samples");
  }
  return digits;
}

/// The rows of `set` named by indices[begin, end) as one batch.
inline RowMatrix rows_of(const Dataset& set, const std::vector<int>& indices, std::size_t begin,
                         std::size_t end, std::vector<int>* labels) {
  RowMatrix batch(static_cast<Eigen::Index>(end - begin), 64);
  if (labels) labels->clear();
  for (std::size_t i = begin; i < end; ++i) {
    batch.row(static_cast<Eigen::Index>(i - begin)) = set.images.row(indices[i]);
    if (labels) labels->push_back(set.labels[static_cast<std::size_t>(indices[i])]);
  }
  return batch;
}
