// SPDX-License-Identifier: MIT
// Which scalars of one task vector a sparsified merge keeps (magnitude, outliers, random, rank
// sampling; the rules: polyak/checkpoint/merge_options.hpp), as one bit per scalar, and the L1
// rescale that goes with them. Selection by rank is linear time (std::nth_element for the one or
// two boundary values, then a pass in position order), never a sort of the tensor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "polyak/checkpoint/merge_options.hpp"
#include "polyak/core/detail/number_text.hpp"

namespace polyak {

namespace detail {

/// FNV-1a of a name: part of the random methods' seed, the same on every platform.
inline std::uint64_t name_hash(const std::string& name) {
  std::uint64_t h = 14695981039346656037ull;
  for (const char c : name)
    h = (h ^ static_cast<std::uint64_t>(static_cast<unsigned char>(c))) * 1099511628211ull;
  return h;
}

/// The draws of model `m` for the tensor `name`: its own stream, so that a tensor's draws do not
/// depend on which other tensors or models exist.
inline std::mt19937_64 draws_for(std::uint64_t seed, const std::string& name, std::size_t m) {
  return std::mt19937_64(seed ^ name_hash(name) ^ (0x9e3779b97f4a7c15ull * (m + 1)));
}

/// A uniform draw in [0, 1).
inline double uniform_draw(std::mt19937_64& rng) {
  return std::generate_canonical<double, std::numeric_limits<double>::digits>(rng);
}

/// A task value's magnitude as the rank rules order it: NaN above everything (kept, and carried into
/// the result as NaN), so that the order is a strict weak order whatever the inputs hold.
inline double rank_magnitude(double tau) {
  return std::isnan(tau) ? std::numeric_limits<double>::infinity() : std::abs(tau);
}

/// keep[p] = whether scalar p's ascending rank lies in [lo, hi): ranks by `value`, equal values
/// ranked by position, the earlier one higher. `scratch` is working memory (resized).
inline void keep_ranks(const std::vector<double>& value, std::size_t lo, std::size_t hi,
                       std::vector<bool>& keep, std::vector<double>& scratch) {
  const std::size_t n = value.size();
  hi = std::min(hi, n);
  keep.assign(n, false);
  if (lo >= hi) return;
  if (lo == 0 && hi == n) {
    keep.assign(n, true);
    return;
  }
  // The boundary values: the lo-th and (hi - 1)-th smallest (-inf and +inf where there is none).
  double low = -std::numeric_limits<double>::infinity(), high = std::numeric_limits<double>::infinity();
  scratch = value;
  if (lo > 0) {
    std::nth_element(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(lo), scratch.end());
    low = scratch[lo];
  }
  if (hi < n) {
    std::nth_element(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(hi - 1), scratch.end());
    high = scratch[hi - 1];
  }
  std::size_t less_low = 0, equal_low = 0, less_high = 0, equal_high = 0;
  for (const double v : value) {
    less_low += v < low;
    equal_low += exactly_equal(v, low);  // (exact ties are the point)
    less_high += v < high;
    equal_high += exactly_equal(v, high);
  }
  // A value equal to a boundary: its rank is less(v) + equal(v) - 1 - (equal ones at earlier positions).
  std::size_t seen_low = 0, seen_high = 0;
  for (std::size_t p = 0; p < n; ++p) {
    const double v = value[p];
    if (v < low || v > high) continue;
    if (v > low && v < high) {
      keep[p] = true;
      continue;
    }
    const bool at_low = !(v > low);  // (v == low; where low == high, one count serves both)
    const std::size_t rank =
        at_low ? less_low + equal_low - 1 - seen_low++ : less_high + equal_high - 1 - seen_high++;
    keep[p] = rank >= lo && rank < hi;
  }
}

/// The whole-tensor work of sparsifying model m's task vector: its kept scalars and its rescale.
struct KeptScalars {
  std::vector<bool> keep;  ///< one bit a scalar; empty: every scalar is kept
  double rescale = 1.0;    ///< s_i
};

/// The kept scalars of model `m` under `o` (a task-vector method), given `tau_of(begin, count, out)`,
/// which fills out with task values [begin, begin + count) of model m. `shape` gives Della's rows.
template <class TauOf>
KeptScalars kept_scalars(const MergeOptions& o, std::size_t m, const std::string& name,
                         const std::vector<std::int64_t>& shape, std::size_t numel, std::size_t piece,
                         TauOf&& tau_of) {
  KeptScalars result;
  const Sparsification rule = sparsification_of(o.method);
  const double density = o.density_of(m);
  if (rule == Sparsification::None) return result;
  const bool legacy_dare = o.method == MergeMethod::Dare;
  const double drop = legacy_dare && o.densities.empty() && !(o.density < 1) ? o.drop : 1 - density;
  if (legacy_dare) result.rescale = 1 / (1 - drop);
  if (!legacy_dare && density >= 1) return result;  // everything, unrescaled
  std::vector<double> tau(std::min(numel, piece));
  double norm = 0, kept_norm = 0;  // the L1 norms (finite values; a NaN stays at its scalar)
  if (rule == Sparsification::Random) {
    std::mt19937_64 rng = draws_for(o.seed, name, m);
    result.keep.assign(numel, false);
    for (std::size_t begin = 0; begin < numel; begin += piece) {
      const std::size_t count = std::min(piece, numel - begin);
      tau_of(begin, count, tau.data());
      for (std::size_t j = 0; j < count; ++j) {
        const bool keep = uniform_draw(rng) >= drop && density > 0;
        result.keep[begin + j] = keep;
        const double size = std::abs(tau[j]);
        if (std::isfinite(size)) {
          norm += size;
          kept_norm += keep ? size : 0;
        }
      }
    }
  } else {
    std::vector<double> magnitude(numel), scratch;
    for (std::size_t begin = 0; begin < numel; begin += piece) {
      const std::size_t count = std::min(piece, numel - begin);
      tau_of(begin, count, tau.data());
      for (std::size_t j = 0; j < count; ++j) magnitude[begin + j] = rank_magnitude(tau[j]);
    }
    const auto kept_count = static_cast<std::size_t>(std::floor(density * static_cast<double>(numel)));
    if (rule == Sparsification::Magnitude) {
      keep_ranks(magnitude, numel - kept_count, numel, result.keep, scratch);
    } else if (rule == Sparsification::Outliers) {
      std::size_t top = static_cast<std::size_t>(std::floor(o.gamma * static_cast<double>(numel)));
      top = std::min(top, numel - kept_count);  // fewer from the top where both cannot be met
      keep_ranks(magnitude, numel - kept_count - top, numel - top, result.keep, scratch);
    } else {  // rank sampling, row by row
      const std::size_t rows =
          shape.size() >= 2 && shape[0] > 0 ? static_cast<std::size_t>(shape[0]) : std::size_t{1};
      const std::size_t columns = numel / rows;
      std::mt19937_64 rng = draws_for(o.seed, name, m);
      result.keep.assign(numel, false);
      std::vector<std::size_t> order(columns), rank(columns);
      for (std::size_t row = 0; row < rows; ++row) {
        const double* v = magnitude.data() + row * columns;
        for (std::size_t c = 0; c < columns; ++c) order[c] = c;
        std::sort(order.begin(), order.end(),
                  [v](std::size_t a, std::size_t b) { return v[a] < v[b] || (!(v[b] < v[a]) && a > b); });
        for (std::size_t r = 0; r < columns; ++r) rank[order[r]] = r;
        for (std::size_t c = 0; c < columns; ++c) {
          const double spread =
              columns > 1 ? 2 * o.epsilon * static_cast<double>(rank[c]) / static_cast<double>(columns - 1)
                          : o.epsilon;
          const double keep_probability = density - o.epsilon + spread;
          result.keep[row * columns + c] = uniform_draw(rng) >= 1 - keep_probability && density > 0;
        }
      }
    }
    for (std::size_t p = 0; p < numel; ++p) {
      if (std::isfinite(magnitude[p])) {
        norm += magnitude[p];
        kept_norm += result.keep[p] ? magnitude[p] : 0;
      }
    }
  }
  if (!legacy_dare && o.rescale.value_or(rescales_by_default(o.method)) && norm >= 1e-7 && kept_norm >= 1e-7)
    result.rescale = norm / kept_norm;
  return result;
}

}  // namespace detail

}  // namespace polyak
