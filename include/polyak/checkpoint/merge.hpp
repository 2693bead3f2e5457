// SPDX-License-Identifier: MIT
// Model merging, streamed: weighted averages (model soups, fairseq's checkpoint averaging, LAWA),
// task arithmetic, TIES, DARE and SLERP over checkpoints (safetensors files or Hugging Face sharded
// checkpoints) or StateDicts, one piece of one tensor at a time; and greedy soups.
//
// Per tensor, with models x_1..x_n, weights w_i (default 1) and, where a method needs one, a base b
// with task vectors tau_i = x_i - b:
//   Average         sum_i w_i x_i / sum_i w_i
//   TaskArithmetic  b + scale sum_i w_i tau_i                          (Ilharco et al., 2023)
//   Ties            b + scale sum_i w_i m_i tau_i / sum_i w_i m_i      (Yadav et al., 2023)
//                   trim: each tau_i keeps its floor(density numel) largest magnitudes (ties at the
//                   threshold broken by position, first kept), the rest 0; elect: the sign of
//                   sum_i w_i trim(tau_i), + where that sum is 0; m_i = 1 where trim(tau_i) is
//                   nonzero and has the elected sign; where no model agrees, b
//   Dare            b + scale sum_i w_i d_i tau_i / (1 - drop)          (Yu et al., 2024)
//                   drop = 1 - density (mergekit's setting) or `drop` (the paper's p);
//                   d_i = 0 with probability `drop`, else 1, drawn per scalar from `seed`, the
//                   tensor's name and i (so a tensor's draws do not depend on which others exist)
//   Slerp           two models, per tensor: sin((1 - t) theta) / sin(theta) x_1 + sin(t theta) /
//                   sin(theta) x_2, theta the angle between the flattened tensors; where they are
//                   (anti)parallel (|cos theta| > 0.9995, mergekit's threshold) or one is zero, the
//                   linear (1 - t) x_1 + t x_2
// Each scalar is computed in double and rounded once to the tensor's dtype (bf16 and fp16 stay
// bf16 and fp16). Integer tensors (counters) are the last model's. Memory: a 1 MiB block and a
// 16 Ki-scalar piece (in double) per model, two 1 MiB output blocks, and for Ties two doubles per
// scalar of the tensor being merged (its magnitudes, in double so that an F64 checkpoint's values
// that float would round together still rank, and a copy to find the trim threshold).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <future>  // the output blocks written on a second thread
#include <limits>
#include <map>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/checkpoint/sharded_checkpoint.hpp"
#include "polyak/checkpoint/state_dict.hpp"

namespace polyak {

/// The merge methods (their formulas: the header's comment).
enum class MergeMethod { Average, TaskArithmetic, Ties, Dare, Slerp };

/// What to merge, and how (see the header's comment for the formulas). A method refuses a setting it
/// does not use (detail::check_merge_options): a field left at its default is not used.
struct MergeOptions {
  MergeMethod method = MergeMethod::Average;  ///< the method
  std::vector<double> weights;  ///< one a model, finite (> 0 for Ties, >= 0 for Average); empty: all 1
                                ///< (not Slerp)
  double scale = 1.0;           ///< the lambda on the merged task vector (TaskArithmetic, Ties, Dare)
  double density = 1.0;         ///< Ties, Dare: the fraction of each task vector kept, in [0, 1]
                                ///< (mergekit's `density`; Dare drops with probability 1 - density)
  double drop = 0.0;            ///< Dare: the drop probability, in [0, 1) (the paper's p; or density)
  std::uint64_t seed = 0;       ///< Dare's draws
  double t = 0.5;               ///< Slerp: 0 gives the first model, 1 the second
};

namespace detail {

inline const char* merge_method_name(MergeMethod method) {
  switch (method) {
    case MergeMethod::Average:
      return "average";
    case MergeMethod::TaskArithmetic:
      return "task_arithmetic";
    case MergeMethod::Ties:
      return "ties";
    case MergeMethod::Dare:
      return "dare";
    case MergeMethod::Slerp:
      return "slerp";
  }
  return "?";
}

/// Whether `method` needs a base model.
inline bool merge_needs_base(MergeMethod method) {
  return method == MergeMethod::TaskArithmetic || method == MergeMethod::Ties || method == MergeMethod::Dare;
}

/// Dare's drop probability: 1 - density where density is set, else drop.
inline double dare_drop(const MergeOptions& o) { return o.density < 1 ? 1 - o.density : o.drop; }

/// Refuses (InvalidArgument, naming it) options that do not fit `models` models with or without a base,
/// and a setting the method does not use (away from its default), so that none is silently ignored.
inline void check_merge_options(const MergeOptions& o, std::size_t models, bool has_base) {
  const auto bad = [](const std::string& why) { throw InvalidArgument("polyak::merge: " + why); };
  const std::string method = merge_method_name(o.method);
  const MergeMethod m = o.method;
  if (models == 0) bad("no models");
  if (merge_needs_base(m) && !has_base) bad(method + " needs a base model");
  if (!merge_needs_base(m) && has_base) bad(method + " takes no base model");
  if (m == MergeMethod::Slerp && models != 2) bad("slerp merges two models, not " + std::to_string(models));
  if (m == MergeMethod::Ties && models > 64)
    bad("ties merges at most 64 models, not " + std::to_string(models));
  const auto unused = [&](bool set, const char* setting) {
    if (set) bad(std::string(setting) + " is not a setting of " + method);
  };
  const MergeOptions defaults;
  unused(!o.weights.empty() && m == MergeMethod::Slerp, "weights");
  unused(!detail::exactly_equal(o.scale, defaults.scale) &&
             (m == MergeMethod::Average || m == MergeMethod::Slerp),
         "scale");
  unused(
      !detail::exactly_equal(o.density, defaults.density) && m != MergeMethod::Ties && m != MergeMethod::Dare,
      "density");
  unused(!detail::exactly_equal(o.drop, defaults.drop) && m != MergeMethod::Dare, "drop");
  unused(o.seed != defaults.seed && m != MergeMethod::Dare, "seed");
  unused(!detail::exactly_equal(o.t, defaults.t) && m != MergeMethod::Slerp, "t");
  if (m == MergeMethod::Dare && o.density < 1 && o.drop > 0)
    bad("dare takes density (the fraction kept) or drop (its complement), not both");
  if (!o.weights.empty() && o.weights.size() != models)
    bad(std::to_string(o.weights.size()) + " weights for " + std::to_string(models) + " models");
  for (const double w : o.weights) {
    if (!std::isfinite(w)) bad("a weight is not finite");
    if (m == MergeMethod::Average && w < 0) bad("average weights must be >= 0");
    if (m == MergeMethod::Ties && !(w > 0)) bad("ties weights must be > 0");
  }
  if (m == MergeMethod::Average && !o.weights.empty() &&
      *std::max_element(o.weights.begin(), o.weights.end()) <= 0) {
    bad("the weights are all 0");
  }
  if (!std::isfinite(o.scale)) bad("scale is not finite");
  if (!(o.density >= 0 && o.density <= 1)) bad("density must be in [0, 1]");
  if (m == MergeMethod::Dare && !(o.density > 0))
    bad("dare's density must be in (0, 1]: it keeps that fraction");
  if (!(o.drop >= 0 && o.drop < 1)) bad("drop must be in [0, 1)");
  if (!(o.t >= 0 && o.t <= 1)) bad("t must be in [0, 1]");
}

}  // namespace detail

namespace detail {

/// FNV-1a of a name: part of Dare's seed, the same on every platform.
inline std::uint64_t name_hash(const std::string& name) {
  std::uint64_t h = 14695981039346656037ull;
  for (const char c : name)
    h = (h ^ static_cast<std::uint64_t>(static_cast<unsigned char>(c))) * 1099511628211ull;
  return h;
}

/// Where a merge reads one tensor: read(m, begin, count, out) fills out with elements
/// [begin, begin + count) of model m (m == models: the base) as doubles.
using TensorSource =
    std::function<void(std::size_t model, std::size_t begin, std::size_t count, double* out)>;

inline constexpr std::size_t merge_piece = std::size_t{1} << 14;

/// A task value's magnitude as TIES ranks it: NaN ranks above everything (kept, and carried into the
/// result as NaN), so that the ranking is a strict weak order whatever the inputs hold.
inline double ties_magnitude(double tau) {
  return std::isnan(tau) ? std::numeric_limits<double>::infinity() : std::abs(tau);
}

/// The smallest magnitude that rounds to infinity in `dtype` (round to nearest even): max + ulp / 2.
inline double overflow_threshold(DType dtype) {
  if (dtype == DType::F32) return std::ldexp(1.0, 128) - std::ldexp(1.0, 103);
  if (dtype == DType::F16) return 65520.0;
  if (dtype == DType::BF16) return std::ldexp(1.0, 128) - std::ldexp(1.0, 119);
  return std::numeric_limits<double>::infinity();  // F64 (and I64, which is not merged)
}

/// Merges one floating-point tensor of `numel` elements, calling emit(values, count) with the
/// merged doubles piece by piece, in order.
template <class Emit>
void merge_tensor(const MergeOptions& o, std::size_t models, const std::string& name, std::size_t numel,
                  DType dtype, const TensorSource& read, Emit&& emit) {
  // A merged value that overflows its dtype while its inputs are finite (a scale or weights too large)
  // is refused, not written as infinity.
  const double overflow = overflow_threshold(dtype);
  const auto check_range = [&](const std::vector<std::vector<double>>& xs, const std::vector<double>& b,
                               const double* values, std::size_t count) {
    for (std::size_t j = 0; j < count; ++j) {
      if (std::abs(values[j]) < overflow * (1 - 0x1p-20)) continue;  // surely finite once rounded
      std::byte rounded[8];  // else round it as it will be written (F16 and BF16 go through float)
      double back = 0;
      doubles_to_bytes(dtype, values + j, 1, rounded);
      bytes_to_doubles(dtype, rounded, 1, &back);
      if (std::isfinite(back)) continue;
      bool finite_inputs = b.empty() || std::isfinite(b[j]);
      for (const auto& x : xs) finite_inputs = finite_inputs && std::isfinite(x[j]);
      if (finite_inputs) {
        throw InvalidArgument("polyak::merge: tensor '" + name + "': an element merges to " +
                              detail::number_text(values[j]) + ", beyond " + dtype_name(dtype) +
                              "'s range, from finite inputs (is a scale or a weight too large?)");
      }
    }
  };
  const bool has_base = merge_needs_base(o.method);
  std::vector<double> w = o.weights.empty() ? std::vector<double>(models, 1.0) : o.weights;
  if (o.method == MergeMethod::Average) {  // normalized, divided by the largest first: no overflow
    const double largest = *std::max_element(w.begin(), w.end());
    double total = 0;
    for (double& x : w) total += (x /= largest);
    for (double& x : w) x /= total;
  }
  std::vector<std::vector<double>> x(models, std::vector<double>(std::min(numel, merge_piece)));
  std::vector<double> base(has_base ? std::min(numel, merge_piece) : 0), out(std::min(numel, merge_piece));
  const auto read_piece = [&](std::size_t begin, std::size_t count) {
    for (std::size_t m = 0; m < models; ++m) read(m, begin, count, x[m].data());
    if (has_base) read(models, begin, count, base.data());
  };

  // Slerp's angle, and Ties' thresholds: a first pass over the tensor.
  double s0 = 1 - o.t, s1 = o.t;
  std::vector<double> threshold(models, 0.0);
  std::vector<std::size_t> equal_allowed(models, 0), equal_seen(models, 0);
  std::vector<bool> keep_all(models, false);
  if (o.method == MergeMethod::Slerp) {
    double dot = 0, aa = 0, bb = 0;
    for (std::size_t begin = 0; begin < numel; begin += merge_piece) {
      const std::size_t count = std::min(merge_piece, numel - begin);
      read_piece(begin, count);
      for (std::size_t j = 0; j < count; ++j) {
        dot += x[0][j] * x[1][j];
        aa += x[0][j] * x[0][j];
        bb += x[1][j] * x[1][j];
      }
    }
    const double cosine = aa > 0 && bb > 0 ? dot / std::sqrt(aa * bb) : 1.0;  // a zero tensor: linear
    if (std::abs(cosine) <= 0.9995) {
      const double theta = std::acos(cosine), sine = std::sin(theta);
      s0 = std::sin((1 - o.t) * theta) / sine;
      s1 = std::sin(o.t * theta) / sine;
    }
  }
  if (o.method == MergeMethod::Ties) {
    const auto k = static_cast<std::size_t>(std::floor(o.density * static_cast<double>(numel)));
    std::vector<double> magnitude(k < numel && k > 0 ? numel : 0);
    for (std::size_t m = 0; m < models; ++m) {
      if (k >= numel) {
        keep_all[m] = true;
        continue;
      }
      if (k == 0) {  // nothing kept: a threshold above every magnitude
        threshold[m] = std::numeric_limits<double>::infinity();
        continue;
      }
      for (std::size_t begin = 0; begin < numel; begin += merge_piece) {
        const std::size_t count = std::min(merge_piece, numel - begin);
        read(m, begin, count, x[m].data());
        read(models, begin, count, base.data());
        for (std::size_t j = 0; j < count; ++j) magnitude[begin + j] = ties_magnitude(x[m][j] - base[j]);
      }
      std::vector<double> sorted = magnitude;  // (the k-th largest; the order of `magnitude` is kept)
      std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(k - 1), sorted.end(),
                       std::greater<double>());
      threshold[m] = sorted[k - 1];
      const auto greater = static_cast<std::size_t>(
          std::count_if(magnitude.begin(), magnitude.end(), [&](double v) { return v > threshold[m]; }));
      equal_allowed[m] = k - greater;
    }
  }

  std::vector<std::mt19937_64> rngs;
  const double drop = dare_drop(o);
  if (o.method == MergeMethod::Dare) {
    for (std::size_t m = 0; m < models; ++m)
      rngs.emplace_back(o.seed ^ name_hash(name) ^ (0x9e3779b97f4a7c15ull * (m + 1)));
  }
  for (std::size_t begin = 0; begin < numel; begin += merge_piece) {
    const std::size_t count = std::min(merge_piece, numel - begin);
    read_piece(begin, count);
    // The linear methods a model at a time over the piece (loops the compiler vectorizes), the
    // others a scalar at a time.
    if (o.method == MergeMethod::Average || o.method == MergeMethod::TaskArithmetic ||
        o.method == MergeMethod::Slerp) {
      const bool slerp = o.method == MergeMethod::Slerp, arithmetic = o.method == MergeMethod::TaskArithmetic;
      double* result = out.data();
      std::fill(result, result + count, 0.0);
      for (std::size_t m = 0; m < models; ++m) {
        const double weight = slerp ? (m == 0 ? s0 : s1) : arithmetic ? o.scale * w[m] : w[m];
        const double* xm = x[m].data();
        if (arithmetic) {
          const double* b = base.data();
          for (std::size_t j = 0; j < count; ++j) result[j] += weight * (xm[j] - b[j]);
        } else {
          for (std::size_t j = 0; j < count; ++j) result[j] += weight * xm[j];
        }
      }
      if (arithmetic) {
        for (std::size_t j = 0; j < count; ++j) result[j] += base[j];
      }
      check_range(x, base, out.data(), count);
      emit(static_cast<const double*>(out.data()), count);
      continue;
    }
    for (std::size_t j = 0; j < count; ++j) {
      double value = 0;
      switch (o.method) {
        case MergeMethod::Dare: {
          double delta = 0;
          for (std::size_t m = 0; m < models; ++m) {
            const double u = std::generate_canonical<double, std::numeric_limits<double>::digits>(rngs[m]);
            if (u >= drop) delta += w[m] * (x[m][j] - base[j]) / (1 - drop);
          }
          value = base[j] + o.scale * delta;
          break;
        }
        case MergeMethod::Ties: {
          double elect = 0;
          double trimmed[64];  // models <= 64 for Ties: checked by merge_tensors
          bool nan = false;
          for (std::size_t m = 0; m < models; ++m) {
            const double tau = x[m][j] - base[j];
            const double size = ties_magnitude(tau);
            nan = nan || std::isnan(tau);
            bool keep = keep_all[m] || size > threshold[m];
            if (!keep && !(size < threshold[m]) && equal_seen[m] < equal_allowed[m]) {  // (== the threshold)
              keep = true;
              ++equal_seen[m];
            }
            trimmed[m] = keep ? tau : 0.0;
            elect += w[m] * trimmed[m];
          }
          const double sign = elect >= 0 ? 1.0 : -1.0;
          double numerator = 0, denominator = 0;
          for (std::size_t m = 0; m < models; ++m) {
            if ((trimmed[m] > 0 && sign > 0) || (trimmed[m] < 0 && sign < 0)) {
              numerator += w[m] * trimmed[m];
              denominator += w[m];
            }
          }
          value = base[j] + (denominator > 0 ? o.scale * numerator / denominator : 0.0);
          if (nan) value = std::numeric_limits<double>::quiet_NaN();  // as arithmetic would carry it
          break;
        }
        case MergeMethod::Average:  // (the linear methods were merged above)
        case MergeMethod::TaskArithmetic:
        case MergeMethod::Slerp:
          break;
      }
      out[j] = value;
    }
    check_range(x, base, out.data(), count);
    emit(static_cast<const double*>(out.data()), count);
  }
}

/// The first difference between two tensor tables (names, dtypes, shapes), or "".
template <class A, class B>
std::string first_table_difference(const A& a, const std::string& a_name, const B& b,
                                   const std::string& b_name) {
  if (a.size() != b.size()) {
    return b_name + " holds " + std::to_string(b.size()) + " tensors, " + a_name + " " +
           std::to_string(a.size());
  }
  for (const auto& [name, spec] : a) {
    const auto other = b.find(name);
    if (other == b.end()) return b_name + " has no tensor '" + name + "'";
    if (other->second.first != spec.first || other->second.second != spec.second) {
      return "tensor '" + name + "' is " + dtype_name(other->second.first) + " " +
             polyak::shape_string(other->second.second) + " in " + b_name + ", " + dtype_name(spec.first) +
             " " + polyak::shape_string(spec.second) + " in " + a_name;
    }
  }
  return {};
}

using TensorTable = std::map<std::string, std::pair<DType, std::vector<std::int64_t>>>;

inline TensorTable table_of(const CheckpointReader& reader) {
  TensorTable table;
  for (const auto& t : reader.tensors()) table[t.name] = {t.dtype, t.shape};
  return table;
}
inline TensorTable table_of(const StateDict& sd) {
  TensorTable table;
  for (const auto& [name, t] : sd) table[name] = {t.dtype, t.shape};
  return table;
}

}  // namespace detail

namespace detail {

/// Merges one tensor of `readers` (the models, then the base) and writes it to `fd`. Reads and
/// writes go in blocks of 1 MiB, each model's block kept, the arithmetic in pieces of merge_piece:
/// a system call a block, not a piece, which is most of what a merge costs beyond its I/O.
inline void write_merged_tensor(std::vector<CheckpointReader>& readers, const MergeOptions& options,
                                std::size_t models, const CheckpointReader::Tensor& tensor, int fd,
                                const std::string& file) {
  if (tensor.dtype == DType::I64) {  // a counter: the last model's
    auto& last = readers[models - 1];
    const StoredTensor t = last.read(*last.find(tensor.name));
    write_all(fd, t.bytes.data(), t.bytes.size(), file);
    return;
  }
  const std::size_t element = dtype_size(tensor.dtype), numel = tensor.numel();
  const std::size_t block = std::max(merge_piece, (std::size_t{1} << 20) / element);
  struct Cached {
    std::size_t begin = 0, count = 0;
    std::vector<std::byte> bytes;
  };
  std::vector<Cached> cache(readers.size());
  const TensorSource read = [&](std::size_t m, std::size_t begin, std::size_t count, double* values) {
    Cached& c = cache[m];
    if (begin < c.begin || begin + count > c.begin + c.count) {
      c.begin = begin;
      c.count = std::min(block, numel - begin);
      c.bytes.resize(c.count * element);
      readers[m].read_bytes(*readers[m].find(tensor.name), begin * element, c.count * element,
                            c.bytes.data());
    }
    bytes_to_doubles(tensor.dtype, c.bytes.data() + (begin - c.begin) * element, count, values);
  };
  // Two output blocks: one filled here while the other is written on a second thread, so that the
  // kernel's copies into the page cache overlap the reading and arithmetic of the next block.
  std::vector<std::byte> pending(block * element), writing(block * element);
  std::future<void> written;  // (after the buffers: destroyed first, it waits for the write)
  const auto flush = [&](std::size_t bytes) {
    if (written.valid()) written.get();  // the previous block is on its way (its error rethrown here)
    std::swap(pending, writing);
    written = std::async(std::launch::async, [&, bytes] { write_all(fd, writing.data(), bytes, file); });
  };
  std::size_t filled = 0;  // elements in `pending`
  merge_tensor(options, models, tensor.name, numel, tensor.dtype, read,
               [&](const double* values, std::size_t count) {
                 if ((filled + count) * element > pending.size()) {
                   flush(filled * element);
                   filled = 0;
                 }
                 doubles_to_bytes(tensor.dtype, values, count, pending.data() + filled * element);
                 filled += count;
               });
  flush(filled * element);
  written.get();
}

}  // namespace detail

/// Merges checkpoints (paths of safetensors files, sharded checkpoints' index files or folders) into
/// `out`, laid out as the first input (a file, or a folder of shards with an index), streaming.
/// `base` ("" for none) is the base model of the methods that need one. Every input and the base
/// must hold the same tensors (names, dtypes, shapes) as the first: otherwise, as for bad options,
/// nothing is written and InvalidArgument names the difference. Metadata: the first input's (each
/// shard's own, and the index's), plus "merge_method". `out` is written atomically, a folder whole
/// (see detail::write_folder_atomically): a crash or a concurrent merge into the same `out` never
/// leaves a mix of two merges. Refused before anything is written: an `out` that is one of the files
/// the merge reads or a folder holding one (compared by identity, through links), an existing `out`
/// folder holding anything but checkpoint files.
inline void merge_checkpoints(const std::vector<std::string>& inputs, const std::string& base,
                              const MergeOptions& options, const std::string& out) {
  detail::check_merge_options(options, inputs.size(), !base.empty());
  std::vector<CheckpointReader> readers;
  for (const auto& path : inputs) readers.emplace_back(path);
  if (!base.empty()) readers.emplace_back(base);
  const detail::TensorTable first = detail::table_of(readers.front());
  for (std::size_t r = 1; r < readers.size(); ++r) {
    const std::string difference = detail::first_table_difference(
        first, inputs.front(), detail::table_of(readers[r]), readers[r].path());
    if (!difference.empty()) throw InvalidArgument("polyak::merge_checkpoints: " + difference);
  }
  std::vector<std::string> read;  // every file the merge reads, kept apart from what it writes
  for (const auto& reader : readers) {
    for (auto& file : reader.files()) read.push_back(std::move(file));
  }
  detail::check_output_apart("polyak::merge_checkpoints", out, read);
  const std::size_t models = inputs.size();
  detail::write_checkpoint_like(
      readers.front(), out, {{"merge_method", detail::merge_method_name(options.method)}},
      [&](const CheckpointReader::Tensor& tensor) {
        const std::size_t size = tensor.numel() * dtype_size(tensor.dtype);
        return detail::TensorWriter{tensor.name, tensor.dtype, tensor.shape, size,
                                    [&readers, &options, models, tensor](int fd, const std::string& file) {
                                      detail::write_merged_tensor(readers, options, models, tensor, fd, file);
                                    }};
      });
}

/// The same merge over StateDicts in memory: a new StateDict, each entry in the first's dtype.
inline StateDict merge_state_dicts(const std::vector<const StateDict*>& inputs, const StateDict* base,
                                   const MergeOptions& options) {
  detail::check_merge_options(options, inputs.size(), base != nullptr);
  std::vector<const StateDict*> all = inputs;
  if (base) all.push_back(base);
  const detail::TensorTable first = detail::table_of(*all.front());
  for (std::size_t r = 1; r < all.size(); ++r) {
    const std::string difference =
        detail::first_table_difference(first, "model 0", detail::table_of(*all[r]),
                                       r < inputs.size() ? "model " + std::to_string(r) : "the base");
    if (!difference.empty()) throw InvalidArgument("polyak::merge_state_dicts: " + difference);
  }
  StateDict result;
  result.metadata = all.front()->metadata;
  result.metadata["merge_method"] = detail::merge_method_name(options.method);
  for (const auto& entry : *all.front()) {
    const std::string& name = entry.first;  // (not a structured binding: the lambdas below capture it)
    const StoredTensor& tensor = entry.second;
    if (tensor.dtype == DType::I64) {
      result.insert(name, inputs.back()->at(name).owned());
      continue;
    }
    StoredTensor merged;
    merged.dtype = tensor.dtype;
    merged.shape = tensor.shape;
    merged.bytes.resize(tensor.byte_size());
    // Pieces read from each entry's row-major bytes (a borrowed column-major one reordered once).
    const std::size_t element = dtype_size(tensor.dtype);
    std::vector<StoredTensor> reordered(all.size());
    std::vector<const std::byte*> sources;
    for (std::size_t m = 0; m < all.size(); ++m) {
      const StoredTensor& t = all[m]->at(name);
      if (t.contiguous() == nullptr) reordered[m] = t.owned();
      sources.push_back(t.contiguous() != nullptr ? t.contiguous() : reordered[m].bytes.data());
    }
    std::size_t at = 0;
    detail::merge_tensor(
        options, inputs.size(), name, tensor.numel(), tensor.dtype,
        [&](std::size_t m, std::size_t begin, std::size_t count, double* out) {
          detail::bytes_to_doubles(tensor.dtype, sources[m] + begin * element, count, out);
        },
        [&](const double* out, std::size_t count) {
          detail::doubles_to_bytes(tensor.dtype, out, count,
                                   merged.bytes.data() + at * dtype_size(tensor.dtype));
          at += count;
        });
    result.insert(name, std::move(merged));
  }
  return result;
}

/// What greedy_soup returns: the ingredients taken, their average and its score.
struct GreedySoup {
  std::vector<std::size_t> ingredients;  ///< indices into candidates, in the order taken
  StateDict soup;                        ///< their uniform average
  double score = 0;                      ///< evaluate(soup)
};

/// A greedy soup (Wortsman et al., 2022): `candidates` in order of their own held-out score, best
/// first; the soup starts as the first and takes each next one only if the uniform average with it
/// does not score worse under `evaluate(const StateDict&) -> double` (higher is better).
template <class Evaluate>
GreedySoup greedy_soup(const std::vector<std::string>& candidates, Evaluate&& evaluate) {
  if (candidates.empty()) throw InvalidArgument("polyak::greedy_soup: no candidates");
  GreedySoup result;
  result.soup = load_safetensors(candidates.front());
  result.ingredients.push_back(0);
  result.score = evaluate(static_cast<const StateDict&>(result.soup));
  for (std::size_t c = 1; c < candidates.size(); ++c) {
    const StateDict candidate = load_safetensors(candidates[c]);
    MergeOptions add;  // the soup of k, weighted k, with the candidate, weighted 1
    add.weights = {static_cast<double>(result.ingredients.size()), 1.0};
    StateDict tried = merge_state_dicts({&result.soup, &candidate}, nullptr, add);
    const double score = evaluate(static_cast<const StateDict&>(tried));
    if (score >= result.score) {
      result.soup = std::move(tried);
      result.score = score;
      result.ingredients.push_back(c);
    }
  }
  return result;
}

}  // namespace polyak
