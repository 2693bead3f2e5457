// SPDX-License-Identifier: MIT
// polyak-merge: averages or merges checkpoints into one, as fairseq's checkpoint averaging,
// model soups, LAWA and mergekit do, streaming (polyak/checkpoint/merge.hpp).
//
//   polyak-merge [OPTIONS] OUT IN1 IN2 ...
//
// Uniform by default; --weights gives each file a weight (finite, >= 0, not all 0; normalized to sum
// 1); --ema folds the files in training order into an exponential moving average (the earliest
// starts it; DECAY in [0, 1]); --latest K averages the last K (LAWA). Training order is the step
// each file records in its metadata ("step" or "global_step") where every one records one, else the
// natural order of the names (ep2 before ep10), whatever order the command line lists them in; the
// files taken are printed, in that order (polyak/checkpoint/checkpoint_order.hpp), and OUT is laid
// out as the earliest of them. --method
// task_arithmetic|ties|dare|slerp merges instead (ties, dare and task-arithmetic against --base; slerp
// between two inputs), with --scale, --density, --drop, --seed and --t; the weights are then each model's
// lambda. Inputs are safetensors files or Hugging Face sharded checkpoints (an index file or its folder); OUT
// is laid out as the first input (a folder of shards and an index, for a sharded one). Every floating-point
// tensor is computed in double and rounded once to its own dtype; integer tensors (counters such as
// n_averaged) are taken from the last input. Memory: a few pieces of one tensor (the ranked methods: plus a
// key per scalar of the largest tensor, or without --rescale those near the kept window's boundaries;
// dare_ties and dare_linear: every model's task values of a tensor, a
// double each, where they fit 256 MiB; polyak/checkpoint/merge_options.hpp). Inputs that differ in tensor
// names, dtypes or shapes, and any argument it cannot read, are refused with the problem named, and no output
// is written.
#include "../common/number.hpp"
#include <polyak/checkpoint/checkpoint_order.hpp>
#include <polyak/checkpoint/merge_options.hpp>
#include <polyak/checkpoint/merge.hpp>
#include <polyak/checkpoint/safetensors.hpp>

#include <algorithm>
#include <charconv>  // std::from_chars: --seed is any 64-bit value
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

const char* const usage_text =
    "usage: polyak-merge [OPTIONS] OUT IN1 IN2 ...\n"
    "  averages or merges the checkpoints IN1 IN2 ... (safetensors files, or sharded checkpoints:\n"
    "  an index .json or its folder) into OUT (written only if all goes well)\n"
    "  --weights W1,W2,...  one weight per input (finite; >= 0 and not all 0 for an average,\n"
    "                       normalized to sum 1; any sign for the other methods): each\n"
    "                       model's lambda in a merge\n"
    "  --ema DECAY          an EMA over the inputs in training order, DECAY in [0, 1]\n"
    "  --latest K           the uniform average of the last K inputs in training order (LAWA)\n"
    "                       training order: by the step each input records in its metadata\n"
    "                       (\"step\" or \"global_step\") if all do, else by name, digits as\n"
    "                       numbers (ep2 before ep10); the inputs taken are printed\n"
    "  --method M           average (default; mergekit's linear), task_arithmetic (or\n"
    "                       task-arithmetic), ties, dare, dare_linear, dare_ties, breadcrumbs,\n"
    "                       breadcrumbs_ties, della, della_linear, model_stock, nearswap, sce\n"
    "                       (against --base), slerp, nuslerp or multislerp (against --base if\n"
    "                       given), karcher (formulas: polyak/checkpoint/merge_options.hpp)\n"
    "  --base PATH          the base model of every method but average and slerp\n"
    "  --scale S            lambda on the merged task vector (default 1; mergekit's lambda)\n"
    "  --density D          the sparsified methods (ties, dare*, breadcrumbs*, della*): the\n"
    "                       fraction of each task vector kept, in [0, 1] (default 1)\n"
    "  --densities D1,...   one density per input instead\n"
    "  --drop P             dare: the drop probability, in [0, 1) (default 0; or --density)\n"
    "  --gamma G            breadcrumbs*: the fraction of largest magnitudes dropped (default 0.01)\n"
    "  --epsilon E          della*: the spread of keep probabilities (default 0.15)\n"
    "  --normalize BOOL     the task-vector methods: divide by the weights (true or false;\n"
    "                       default: the method's, true for ties and della)\n"
    "  --rescale BOOL       the sparsified methods but dare: keep each task vector's L1 norm\n"
    "                       (default: true for dare_* and della*)\n"
    "  --seed N             dare*, della*: the seed of the draws (default 0)\n"
    "  --t T                slerp: 0 gives IN1, 1 gives IN2 (default 0.5); nearswap: the\n"
    "                       sameness threshold, > 0 (required)\n"
    "  --filter-wise        model_stock: an angle per row\n"
    "  --select-topk F      sce: the fraction of highest-variance scalars kept, in (0, 1]\n"
    "  --nuslerp-flatten B  nuslerp: one angle a tensor (true, the default) or one a row\n"
    "  --nuslerp-row-wise B nuslerp, not flattened: one angle a column\n"
    "  --normalize-weights B multislerp: divide the weights by their sum (default true)\n"
    "  --eps E              multislerp: the guard added to norms, > 0 (default 1e-8)\n"
    "  --max-iter N         karcher: the most steps, in [0, 1000000] (default 10)\n"
    "  --tol T              karcher: the convergence tolerance, >= 0 (default 1e-5)\n"
    "  --num-threads N      the threads that merge a tensor's pieces, in [0, 64] (default 0:\n"
    "                       the machine's, at most 4); the bytes written do not depend on it\n"
    "  --                   what follows is file names, even if it starts with '-'\n"
    "  an option the method does not use is refused\n";

/// A command line that cannot be run: the tool prints the message and its usage, and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Arguments {
  bool help = false;
  std::vector<double> weights;  // empty: uniform
  double ema = -1;              // < 0: no EMA
  std::int64_t latest = 0;      // > 0: LAWA over the last `latest` inputs
  polyak::MergeOptions merge;
  std::string base;
  std::string out;
  std::vector<std::string> inputs;
};

polyak::MergeMethod method_named(const std::string& name) {
  polyak::MergeMethod method = polyak::MergeMethod::Average;
  if (name == "task-arithmetic") return polyak::MergeMethod::TaskArithmetic;  // (the hyphen form too)
  if (polyak::merge_method_named(name, method)) return method;
  std::string names;
  for (const polyak::MergeMethod m : polyak::all_merge_methods)
    names += std::string(names.empty() ? "" : ", ") + polyak::to_string(m);
  throw UsageError("--method '" + polyak::detail::visible(name) + "' is none of linear, " + names);
}

/// Whether `method` uses the command-line option `option`.
bool uses(polyak::MergeMethod method, const std::string& option) {
  using polyak::MergeMethod;
  using polyak::Sparsification;
  const Sparsification sparsify = polyak::sparsification_of(method);
  if (option == "--method" || option == "--num-threads") return true;
  if (option == "--ema" || option == "--latest") return method == MergeMethod::Average;
  if (option == "--weights")
    return method == MergeMethod::Average || polyak::is_task_vector_method(method) ||
           method == MergeMethod::NuSlerp || method == MergeMethod::MultiSlerp;
  if (option == "--normalize-weights" || option == "--eps") return method == MergeMethod::MultiSlerp;
  if (option == "--max-iter" || option == "--tol") return method == MergeMethod::Karcher;
  if (option == "--t") return method == MergeMethod::Slerp || method == MergeMethod::NearSwap;
  if (option == "--base") return polyak::needs_base(method) || polyak::takes_optional_base(method);
  if (option == "--nuslerp-flatten" || option == "--nuslerp-row-wise") return method == MergeMethod::NuSlerp;
  if (option == "--scale" || option == "--normalize") return polyak::is_task_vector_method(method);
  if (option == "--density" || option == "--densities") return sparsify != Sparsification::None;
  if (option == "--rescale") return sparsify != Sparsification::None && method != MergeMethod::Dare;
  if (option == "--gamma") return sparsify == Sparsification::Outliers;
  if (option == "--epsilon") return sparsify == Sparsification::RankSampling;
  if (option == "--seed")
    return sparsify == Sparsification::Random || sparsify == Sparsification::RankSampling;
  if (option == "--filter-wise") return method == MergeMethod::ModelStock;
  if (option == "--select-topk") return method == MergeMethod::Sce;
  return method == MergeMethod::Dare;  // --drop
}

bool truth_value(const std::string& value, const std::string& option) {
  if (value == "true") return true;
  if (value == "false") return false;
  throw UsageError(option + " '" + polyak::detail::visible(value) + "' is neither true nor false");
}

double finite_number(std::string_view text, const char* what) {
  double value = 0;
  if (!polyak_tools::parse_number(text, value) || !std::isfinite(value)) {
    throw UsageError(std::string(what) + " '" + polyak::detail::visible(std::string(text)) +
                     "' is not a finite number");
  }
  return value;
}

/// A whole number in [0, most], written as one ("1e1" and "4.0" are refused, as polyak-mergekit
/// refuses them).
std::int64_t whole_number(const std::string& text, const std::string& what, std::int64_t most) {
  std::int64_t value = 0;
  if (!polyak_tools::parse_count(text, value) || value < 0 || value > most) {
    throw UsageError(what + " '" + polyak::detail::visible(text) + "' is not a whole number in [0, " +
                     std::to_string(most) + "]");
  }
  return value;
}

/// A list of finite numbers, comma-separated; an empty item ("1,,1", "1,") is refused.
std::vector<double> number_list(const std::string& value, const char* what) {
  std::vector<double> numbers;
  std::size_t start = 0;
  for (;;) {
    const std::size_t comma = value.find(',', start);
    numbers.push_back(finite_number(std::string_view(value).substr(start, comma - start), what));
    if (comma == std::string::npos) return numbers;
    start = comma + 1;
  }
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  std::vector<std::string> files;
  bool weights_given = false, ema_given = false, options_done = false;
  std::vector<std::string> seen;  // options given, each at most once
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (options_done || arg.empty() || arg[0] != '-' || arg == "-") {
      files.push_back(arg);
    } else if (arg == "--") {
      options_done = true;
    } else if (arg == "--help" || arg == "-h") {
      args.help = true;
    } else if (arg == "--filter-wise") {
      if (std::find(seen.begin(), seen.end(), arg) != seen.end()) throw UsageError(arg + " is given twice");
      seen.push_back(arg);
      args.merge.filter_wise = true;
    } else if (arg == "--method" || arg == "--base" || arg == "--scale" || arg == "--density" ||
               arg == "--drop" || arg == "--seed" || arg == "--t" || arg == "--latest" || arg == "--gamma" ||
               arg == "--epsilon" || arg == "--normalize" || arg == "--rescale" || arg == "--densities" ||
               arg == "--select-topk" || arg == "--nuslerp-flatten" || arg == "--nuslerp-row-wise" ||
               arg == "--normalize-weights" || arg == "--eps" || arg == "--max-iter" || arg == "--tol" ||
               arg == "--num-threads") {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      if (std::find(seen.begin(), seen.end(), arg) != seen.end()) throw UsageError(arg + " is given twice");
      seen.push_back(arg);
      const std::string value = argv[++i];
      if (arg == "--method") {
        args.merge.method = method_named(value);
      } else if (arg == "--base") {
        args.base = value;
      } else if (arg == "--scale") {
        args.merge.scale = finite_number(value, "--scale");
      } else if (arg == "--density") {
        args.merge.density = finite_number(value, "--density");
      } else if (arg == "--drop") {
        args.merge.drop = finite_number(value, "--drop");
      } else if (arg == "--t") {
        args.merge.t = finite_number(value, "--t");
      } else if (arg == "--gamma") {
        args.merge.gamma = finite_number(value, "--gamma");
      } else if (arg == "--epsilon") {
        args.merge.epsilon = finite_number(value, "--epsilon");
      } else if (arg == "--select-topk") {
        args.merge.select_topk = finite_number(value, "--select-topk");
      } else if (arg == "--normalize") {
        args.merge.normalize = truth_value(value, arg);
      } else if (arg == "--rescale") {
        args.merge.rescale = truth_value(value, arg);
      } else if (arg == "--nuslerp-flatten") {
        args.merge.nuslerp_flatten = truth_value(value, arg);
      } else if (arg == "--nuslerp-row-wise") {
        args.merge.nuslerp_row_wise = truth_value(value, arg);
      } else if (arg == "--normalize-weights") {
        args.merge.normalize_weights = truth_value(value, arg);
      } else if (arg == "--eps") {
        args.merge.eps = finite_number(value, "--eps");
      } else if (arg == "--tol") {
        args.merge.tol = finite_number(value, "--tol");
      } else if (arg == "--max-iter") {
        args.merge.max_iter = static_cast<long long>(whole_number(value, arg, 1000000));
      } else if (arg == "--num-threads") {
        args.merge.threads = static_cast<unsigned>(whole_number(value, arg, 64));
      } else if (arg == "--densities") {
        args.merge.densities = number_list(value, "density");
      } else {
        std::uint64_t n = 0;
        const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), n);
        if (error != std::errc() || end != value.data() + value.size() || value.empty() ||
            (arg == "--latest" &&
             (n < 1 || n > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())))) {
          throw UsageError(arg + " '" + polyak::detail::visible(value) + "' is not a whole number " +
                           (arg == "--seed" ? "in [0, 2^64)" : ">= 1"));
        }
        if (arg == "--seed") {
          args.merge.seed = n;
        } else {
          args.latest = static_cast<std::int64_t>(n);
        }
      }
    } else if (arg == "--weights" || arg == "--ema") {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      const std::string value = argv[++i];
      seen.push_back(arg);
      if (arg == "--weights") {
        if (weights_given) throw UsageError("--weights is given twice");
        weights_given = true;
        args.weights = number_list(value, "weight");
      } else {
        if (ema_given) throw UsageError("--ema is given twice");
        ema_given = true;
        args.ema = finite_number(value, "--ema decay");
        if (!(args.ema >= 0 && args.ema <= 1))
          throw UsageError("--ema decay " + value + " is outside [0, 1]");
      }
    } else {
      throw UsageError("unknown option '" + polyak::detail::visible(arg) +
                       "' (a file named so goes after --)");
    }
  }
  if (args.help) return args;
  const polyak::MergeMethod method = args.merge.method;
  const std::string method_name = polyak::to_string(method);
  for (const auto& option : seen) {  // no option is silently ignored
    if (!uses(method, option)) throw UsageError(option + " is not an option of --method " + method_name);
  }
  if (weights_given && ema_given) throw UsageError("--weights and --ema exclude each other");
  const auto given = [&](const char* option) {
    return std::find(seen.begin(), seen.end(), option) != seen.end();
  };
  if (given("--density") && given("--densities"))
    throw UsageError("--density and --densities exclude each other");
  if (method == polyak::MergeMethod::NearSwap && std::find(seen.begin(), seen.end(), "--t") == seen.end())
    throw UsageError("nearswap needs --t, its sameness threshold (mergekit's required t)");
  const bool average = method == polyak::MergeMethod::Average;
  if (args.latest > 0 && (weights_given || ema_given))
    throw UsageError("--latest takes no --weights or --ema");
  if (files.size() < 2) throw UsageError("needs OUT and at least one input");
  args.out = files.front();
  if (args.out.empty()) throw UsageError("OUT is the empty path");
  args.inputs.assign(files.begin() + 1, files.end());
  if (weights_given && args.weights.size() != args.inputs.size()) {
    throw UsageError(std::to_string(args.weights.size()) + " weights for " +
                     std::to_string(args.inputs.size()) + " inputs");
  }
  if (args.latest > static_cast<std::int64_t>(args.inputs.size())) {
    throw UsageError("--latest " + std::to_string(args.latest) + " of " + std::to_string(args.inputs.size()) +
                     " inputs");
  }
  if (weights_given) args.merge.weights = args.weights;
  std::vector<std::string> read = args.inputs;
  if (!args.base.empty()) read.push_back(args.base);
  for (const auto& input : read) {  // (by name too: an OUT that does not exist yet has no identity)
    if (std::filesystem::path(input).lexically_normal() == std::filesystem::path(args.out).lexically_normal())
      throw UsageError("OUT '" + polyak::detail::visible(args.out) + "' is also an input");
  }
  try {
    polyak::check_output_apart(args.out, read);  // (merge_checkpoints checks every shard of them too)
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string(e.what()).substr(std::string("polyak: ").size()));
  }
  try {
    const std::size_t models = args.latest > 0 ? static_cast<std::size_t>(args.latest) : args.inputs.size();
    args.merge.check(models, !args.base.empty());
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string(e.what()).substr(std::string("polyak::merge: ").size()));
  }
  if (average) args.merge.weights.clear();  // run() makes an average's weights
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

/// An EMA over the inputs in order as the weights of an average: the first weighs decay^(n-1),
/// input i >= 1 (1 - decay) decay^(n-1-i).
std::vector<double> ema_weights(double decay, std::size_t inputs) {
  std::vector<double> weights(inputs);
  for (std::size_t i = 0; i < inputs; ++i) {
    const double later = std::pow(decay, static_cast<double>(inputs - 1 - i));
    weights[i] = i == 0 ? later : (1 - decay) * later;
  }
  return weights;
}

int run(Arguments args) {
  std::vector<std::string> inputs = args.inputs;
  if (args.latest > 0 || args.ema >= 0) {  // the merges whose result depends on the files' order
    polyak::CheckpointOrder order = polyak::order_checkpoints(inputs);
    const std::size_t first = args.latest > 0 ? inputs.size() - static_cast<std::size_t>(args.latest) : 0;
    std::printf("polyak-merge: %s, in order of %s:\n", args.latest > 0 ? "the latest inputs" : "an EMA over",
                order.by_step ? "the steps they record" : "their names (digits as numbers)");
    for (std::size_t i = first; i < order.paths.size(); ++i) {
      const std::string path = polyak::detail::visible(order.paths[i]);
      if (order.by_step) {
        std::printf("  %s (step %llu)\n", path.c_str(), static_cast<unsigned long long>(order.steps[i]));
      } else {
        std::printf("  %s\n", path.c_str());
      }
    }
    std::fflush(stdout);
    // The checkpoints merged are the ones opened and ordered (a file renamed over a path since is not).
    std::vector<polyak::CheckpointReader> taken;
    for (std::size_t i = first; i < order.checkpoints.size(); ++i)
      taken.push_back(std::move(order.checkpoints[i]));
    args.merge.weights =
        args.ema >= 0 ? ema_weights(args.ema, taken.size()) : normalized(args.weights, taken.size());
    const std::size_t count = taken.size();
    polyak::merge_checkpoints(std::move(taken), nullptr, args.merge, args.out);
    std::printf("polyak-merge: %s of %zu checkpoints into %s\n", polyak::to_string(args.merge.method), count,
                polyak::detail::visible(args.out).c_str());
    return 0;
  }
  if (args.merge.method == polyak::MergeMethod::Average)
    args.merge.weights = normalized(args.weights, inputs.size());
  polyak::merge_checkpoints(inputs, args.base, args.merge, args.out);
  std::printf("polyak-merge: %s of %zu checkpoints into %s\n", polyak::to_string(args.merge.method),
              inputs.size(), polyak::detail::visible(args.out).c_str());
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
    std::fprintf(stderr, "polyak-merge: %s; no output written\n%s", e.what(), usage_text);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "polyak-merge: %s; no output written\n", e.what());
    return 1;
  }
}
