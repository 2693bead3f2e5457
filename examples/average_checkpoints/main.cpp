// SPDX-License-Identifier: MIT
// average_checkpoints: averages safetensors checkpoints into one, as fairseq's checkpoint averaging
// and "model soups" do.
//
//   average_checkpoints [--weights W1,W2,...] [--ema DECAY] OUT IN1 IN2 ...
//
// Uniform by default; --weights gives each file a weight (finite, >= 0, not all 0; normalized to sum
// 1); --ema folds the files in order into an exponential moving average (the first file starts it;
// DECAY in [0, 1]); the two exclude each other. Every floating-point tensor is averaged in double and
// rounded once to its own dtype; integer tensors (counters such as n_averaged) are taken from the last
// file. It streams: one tensor of every input at a time, each input read from the file it opened
// first, so memory stays near one checkpoint (the output, written atomically at the end). Inputs that
// differ in tensor names, dtypes or shapes, and any argument it cannot read, are refused with the
// problem named, and no output is written.
#include <polyak/detail/number_text.hpp>
#include <polyak/serialization.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

const char* const usage_text =
    "usage: average_checkpoints [--weights W1,W2,...] [--ema DECAY] OUT IN1 IN2 ...\n"
    "  averages the safetensors checkpoints IN1 IN2 ... into OUT (written only if all goes well)\n"
    "  --weights W1,W2,...  one weight per input (finite, >= 0, not all 0), normalized to sum 1\n"
    "  --ema DECAY          an EMA over the inputs in order, DECAY in [0, 1] (not with --weights)\n"
    "  --                   what follows is file names, even if it starts with '-'\n";

/// A command line that cannot be run: the tool prints the message and its usage, and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Arguments {
  bool help = false;
  std::vector<double> weights;  // empty: uniform
  double ema = -1;              // < 0: no EMA
  std::string out;
  std::vector<std::string> inputs;
};

double finite_number(std::string_view text, const char* what) {
  double value = 0;
  if (!polyak::detail::parse_number(text, value) || !std::isfinite(value)) {
    throw UsageError(std::string(what) + " '" + std::string(text) + "' is not a finite number");
  }
  return value;
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  std::vector<std::string> files;
  bool weights_given = false, ema_given = false, options_done = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (options_done || arg.empty() || arg[0] != '-' || arg == "-") {
      files.push_back(arg);
    } else if (arg == "--") {
      options_done = true;
    } else if (arg == "--help" || arg == "-h") {
      args.help = true;
    } else if (arg == "--weights" || arg == "--ema") {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      const std::string value = argv[++i];
      if (arg == "--weights") {
        if (weights_given) throw UsageError("--weights is given twice");
        weights_given = true;
        std::size_t start = 0;
        for (;;) {  // comma-separated; an empty item ("1,,1", "1,") is refused by finite_number
          const std::size_t comma = value.find(',', start);
          const double w = finite_number(std::string_view(value).substr(start, comma - start), "weight");
          if (w < 0) throw UsageError("weight " + value.substr(start, comma - start) + " is negative");
          args.weights.push_back(w);
          if (comma == std::string::npos) break;
          start = comma + 1;
        }
      } else {
        if (ema_given) throw UsageError("--ema is given twice");
        ema_given = true;
        args.ema = finite_number(value, "--ema decay");
        if (!(args.ema >= 0 && args.ema <= 1))
          throw UsageError("--ema decay " + value + " is outside [0, 1]");
      }
    } else {
      throw UsageError("unknown option '" + arg + "' (a file named so goes after --)");
    }
  }
  if (args.help) return args;
  if (weights_given && ema_given) throw UsageError("--weights and --ema exclude each other");
  if (files.size() < 2) throw UsageError("needs OUT and at least one input");
  args.out = files.front();
  args.inputs.assign(files.begin() + 1, files.end());
  if (weights_given && args.weights.size() != args.inputs.size()) {
    throw UsageError(std::to_string(args.weights.size()) + " weights for " +
                     std::to_string(args.inputs.size()) + " inputs");
  }
  for (const auto& input : args.inputs) {
    std::error_code error;
    if (input == args.out || std::filesystem::equivalent(input, args.out, error)) {
      throw UsageError("OUT '" + args.out + "' is also an input");
    }
  }
  return args;
}

/// The weights, normalized to sum 1. Divided by the largest first, so that no sum overflows
/// (1e308,1e308 is 0.5, 0.5).
std::vector<double> normalized(std::vector<double> weights, std::size_t inputs) {
  if (weights.empty()) weights.assign(inputs, 1.0);
  const double largest = *std::max_element(weights.begin(), weights.end());
  if (!(largest > 0)) throw UsageError("the weights are all 0");
  double total = 0;
  for (double& w : weights) total += (w /= largest);
  for (double& w : weights) w /= total;
  return weights;
}

int run(const Arguments& args) {
  const std::vector<double> weights = normalized(args.weights, args.inputs.size());
  const bool ema = args.ema >= 0;

  // Every input must hold the same tensors as the first: checked before anything is written.
  std::vector<polyak::SafetensorsReader> readers;
  for (const auto& path : args.inputs) readers.emplace_back(path);
  const auto& first = readers.front().index();
  for (std::size_t f = 1; f < readers.size(); ++f) {
    const auto& other = readers[f].index();
    if (other.entries.size() != first.entries.size()) {
      throw std::invalid_argument(args.inputs[f] + " holds " + std::to_string(other.entries.size()) +
                                  " tensors, " + args.inputs[0] + " " + std::to_string(first.entries.size()));
    }
    for (const auto& e : first.entries) {
      const auto match = std::find_if(other.entries.begin(), other.entries.end(),
                                      [&](const auto& candidate) { return candidate.name == e.name; });
      if (match == other.entries.end())
        throw std::invalid_argument(args.inputs[f] + " has no tensor '" + e.name + "'");
      if (match->dtype != e.dtype || match->shape != e.shape) {
        throw std::invalid_argument("tensor '" + e.name + "' is " + polyak::dtype_name(match->dtype) + " " +
                                    polyak::shape_string(match->shape) + " in " + args.inputs[f] + ", " +
                                    polyak::dtype_name(e.dtype) + " " + polyak::shape_string(e.shape) +
                                    " in " + args.inputs[0]);
      }
    }
  }

  polyak::StateDict result;
  result.metadata = first.metadata;
  for (const auto& e : first.entries) {
    if (e.dtype == polyak::DType::I64) {  // counters: the last file's
      result.insert(e.name, readers.back().read(e.name));
      continue;
    }
    polyak::StoredTensor averaged = readers.front().read(e);
    std::vector<double> sum = polyak::to_doubles(averaged);
    for (double& v : sum) v *= ema ? 1.0 : weights[0];
    for (std::size_t f = 1; f < readers.size(); ++f) {
      const std::vector<double> x = polyak::to_doubles(readers[f].read(e.name));
      for (std::size_t i = 0; i < x.size(); ++i) {
        sum[i] = ema ? args.ema * sum[i] + (1 - args.ema) * x[i] : sum[i] + weights[f] * x[i];
      }
    }
    polyak::assign_doubles(averaged, sum);
    result.insert(e.name, std::move(averaged));
  }
  result.metadata["averaged_checkpoints"] = std::to_string(args.inputs.size());
  result.metadata["averaging"] = ema ? "ema " + polyak::detail::number_text(args.ema) : "weighted mean";
  polyak::save_safetensors(args.out, result);
  std::printf("average_checkpoints: %zu tensors from %zu checkpoints into %s\n", result.size(),
              args.inputs.size(), args.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Arguments args = parse(argc, argv);
    if (args.help) {
      std::fputs(usage_text, stdout);
      return 0;
    }
    return run(args);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "average_checkpoints: %s; no output written\n%s", e.what(), usage_text);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "average_checkpoints: %s; no output written\n", e.what());
    return 1;
  }
}
