// SPDX-License-Identifier: MIT
// Models laid out as real ones are, for the benchmarks: the tensor sizes of benchmarks/layouts.json
// (see make_layouts.py) scaled to a target count of scalars.
#pragma once

#include <nlohmann/json.hpp>

#include <polyak/core/tensor_view.hpp>

#include <cmath>
#include <cstddef>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

/// Tensor sizes of `layout` scaled to about `target` scalars: max(1, round(size * target / total)).
inline std::vector<std::size_t> scaled_layout(const std::string& layout, double target) {
  static const nlohmann::json layouts = [] {
    std::ifstream in(POLYAK_BENCHMARK_DIR "/layouts.json");
    if (!in) throw std::runtime_error("cannot open layouts.json");
    return nlohmann::json::parse(in);
  }();
  const auto base = layouts.at(layout).get<std::vector<double>>();
  double total = 0;
  for (const double s : base) total += s;
  std::vector<std::size_t> sizes;
  for (const double s : base)
    sizes.push_back(static_cast<std::size_t>(std::max(1.0, std::round(s * target / total))));
  return sizes;
}

/// A model of scalar T: one allocation a tensor, as a framework makes them, filled (pages touched).
template <class T>
struct BenchModel {
  std::vector<std::vector<T>> tensors;
  polyak::ParameterList<T> list;
  std::size_t numel = 0;

  BenchModel(const std::string& layout, double target) {
    const auto sizes = scaled_layout(layout, target);
    tensors.reserve(sizes.size());
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      tensors.emplace_back(sizes[k]);
      for (std::size_t i = 0; i < sizes[k]; ++i)
        tensors[k][i] = T(static_cast<float>((i * 7 + k) % 1000) * 1e-3f);
      list.add("t" + std::to_string(k),
               polyak::TensorView<T>(tensors[k].data(), {static_cast<std::int64_t>(sizes[k])}));
      numel += sizes[k];
    }
  }
};
