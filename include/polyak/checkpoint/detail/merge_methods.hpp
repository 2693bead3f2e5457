// SPDX-License-Identifier: MIT
// The merge methods' arithmetic, one tensor at a time in pieces (polyak/checkpoint/merge.hpp calls
// it): the options' checks, the per-method kernels, and the streamed writer of one merged tensor.
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
#include "polyak/checkpoint/merge_options.hpp"
#include "polyak/checkpoint/state_dict.hpp"

namespace polyak {

namespace detail {

/// Dare's drop probability: 1 - density where density is set, else drop.
inline double dare_drop(const MergeOptions& o) { return o.density < 1 ? 1 - o.density : o.drop; }

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
  const bool has_base = needs_base(o.method);
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
             polyak::detail::shape_string(other->second.second) + " in " + b_name + ", " +
             dtype_name(spec.first) + " " + polyak::detail::shape_string(spec.second) + " in " + a_name;
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

}  // namespace polyak
