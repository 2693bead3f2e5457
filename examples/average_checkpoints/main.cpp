// SPDX-License-Identifier: MIT
// average_checkpoints: averages safetensors checkpoints into one, as fairseq's checkpoint averaging
// and "model soups" do.
//
//   average_checkpoints [--weights W1,W2,...] [--ema DECAY] OUT IN1 IN2 ...
//
// Uniform by default; --weights gives each file a weight (normalized to sum 1); --ema folds the
// files in order into an exponential moving average (the first file starts it). Every floating-point
// tensor is averaged in double and rounded once to its own dtype; integer tensors (counters such as
// n_averaged) are taken from the last file. It streams: one tensor of every input at a time, so
// memory stays near one checkpoint (the output, written atomically at the end). Inputs that differ
// in tensor names, dtypes or shapes are refused with the first difference named, and no output is
// written.
#include <polyak/serialization.hpp>

#include <cstdio>
#include <exception>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

int usage() {
  std::fprintf(stderr, "usage: average_checkpoints [--weights W1,W2,...] [--ema DECAY] OUT IN1 IN2 ...\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<double> weights;
  double ema = -1;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--weights" && i + 1 < argc) {
      std::stringstream list(argv[++i]);
      for (std::string w; std::getline(list, w, ',');) weights.push_back(std::stod(w));
    } else if (arg == "--ema" && i + 1 < argc) {
      ema = std::stod(argv[++i]);
    } else {
      files.push_back(arg);
    }
  }
  if (files.size() < 2) return usage();
  const std::string out = files.front();
  const std::vector<std::string> inputs(files.begin() + 1, files.end());
  try {
    if (!weights.empty() && weights.size() != inputs.size()) {
      throw std::invalid_argument(std::to_string(weights.size()) + " weights for " +
                                  std::to_string(inputs.size()) + " checkpoints");
    }
    if (ema >= 0 && !(ema <= 1)) throw std::invalid_argument("--ema takes a decay in [0, 1]");
    if (weights.empty()) weights.assign(inputs.size(), 1.0);
    double total = 0;
    for (const double w : weights) {
      if (!(w >= 0)) throw std::invalid_argument("weights must be >= 0");
      total += w;
    }
    if (!(total > 0)) throw std::invalid_argument("the weights sum to 0");

    // Every input must hold the same tensors as the first: checked before anything is written.
    std::vector<polyak::SafetensorsIndex> indexes;
    for (const auto& path : inputs) indexes.push_back(polyak::read_safetensors_index(path));
    const auto& first = indexes.front();
    for (std::size_t f = 1; f < indexes.size(); ++f) {
      if (indexes[f].entries.size() != first.entries.size()) {
        throw std::invalid_argument(inputs[f] + " holds " + std::to_string(indexes[f].entries.size()) +
                                    " tensors, " + inputs[0] + " " + std::to_string(first.entries.size()));
      }
      for (const auto& e : first.entries) {
        const auto* match = [&]() -> const polyak::SafetensorsIndex::Entry* {
          for (const auto& other : indexes[f].entries) {
            if (other.name == e.name) return &other;
          }
          return nullptr;
        }();
        if (!match) throw std::invalid_argument(inputs[f] + " has no tensor '" + e.name + "'");
        if (match->dtype != e.dtype || match->shape != e.shape) {
          throw std::invalid_argument("tensor '" + e.name + "' is " + polyak::dtype_name(match->dtype) + " " +
                                      polyak::shape_string(match->shape) + " in " + inputs[f] + ", " +
                                      polyak::dtype_name(e.dtype) + " " + polyak::shape_string(e.shape) +
                                      " in " + inputs[0]);
        }
      }
    }

    polyak::StateDict result;
    result.metadata = first.metadata;
    for (const auto& e : first.entries) {
      polyak::StoredTensor averaged = polyak::read_safetensors_tensor(inputs[0], first, e);
      if (e.dtype == polyak::DType::I64) {  // counters: the last file's
        const auto& last = indexes.back();
        for (const auto& other : last.entries) {
          if (other.name == e.name) averaged = polyak::read_safetensors_tensor(inputs.back(), last, other);
        }
        result.insert(e.name, std::move(averaged));
        continue;
      }
      std::vector<double> sum = polyak::to_doubles(averaged);
      for (double& v : sum) v *= ema >= 0 ? 1.0 : weights[0] / total;
      for (std::size_t f = 1; f < inputs.size(); ++f) {
        for (const auto& other : indexes[f].entries) {
          if (other.name != e.name) continue;
          const std::vector<double> x =
              polyak::to_doubles(polyak::read_safetensors_tensor(inputs[f], indexes[f], other));
          for (std::size_t i = 0; i < x.size(); ++i) {
            sum[i] = ema >= 0 ? ema * sum[i] + (1 - ema) * x[i] : sum[i] + weights[f] / total * x[i];
          }
        }
      }
      polyak::assign_doubles(averaged, sum);
      result.insert(e.name, std::move(averaged));
    }
    result.metadata["averaged_checkpoints"] = std::to_string(inputs.size());
    result.metadata["averaging"] = ema >= 0 ? "ema " + std::to_string(ema) : "weighted mean";
    polyak::save_safetensors(out, result);
    std::printf("average_checkpoints: %zu tensors from %zu checkpoints into %s\n", result.size(),
                inputs.size(), out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "average_checkpoints: %s; no output written\n", e.what());
    return 1;
  }
}
