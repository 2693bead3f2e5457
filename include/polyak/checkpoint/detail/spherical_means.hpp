// SPDX-License-Identifier: MIT
// Multi-SLERP and the Karcher mean from the models' Gram matrix alone. Every vector either method
// forms (the units, their mean, the tangents, the result) lies in the span of the models' vectors
// v_1..v_n, so each is held as n coefficients on them and each inner product is read from the
// Gram matrix G_ij = <v_i, v_j>: one pass over the tensor computes G, the iterations cost O(n^2) a
// step whatever the tensor's size, and a last pass writes sum_i c_i v_i. The arithmetic is in
// double; a norm computed from G of a vector much shorter than its coefficients (a tangent near
// convergence) is good to about 1e-8 of them, below the float32 mergekit computes in.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/error.hpp"

namespace polyak::detail {

/// A symmetric n x n matrix, row-major.
struct Gram {
  std::size_t n = 0;
  std::vector<double> at;  ///< at[i * n + j] = v_i . v_j

  double operator()(std::size_t i, std::size_t j) const { return at[i * n + j]; }
  /// The inner product of sum_i a_i v_i and sum_j b_j v_j.
  double inner(const std::vector<double>& a, const std::vector<double>& b) const {
    double sum = 0;
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t j = 0; j < n; ++j) sum += a[i] * at[i * n + j] * b[j];
    }
    return sum;
  }
  /// ||sum_i a_i v_i||, 0 where rounding makes the square negative.
  double norm(const std::vector<double>& a) const { return std::sqrt(std::max(0.0, inner(a, a))); }
};

/// mergekit's `multislerp` as coefficients c on the models' vectors v_i (the task vectors where a base
/// is given): the merged tensor is sum_i c_i v_i (plus the base). w: the weights, divided by their sum
/// where `normalize_weights`. Units u_i = v_i / (|v_i| + eps); their weighted mean m = sum_i w_i u_i,
/// refused where |m| < eps for more than two models (for two: the linear w_1 v_1 + w_2 v_2); mergekit
/// then forms the tangent T = sum_i w_i (u_i - u_i . m^ m^) at m^ = m / |m| and returns
/// (cos(|T| + eps) m^ + sin(|T| + eps) / (|T| + eps) T) sum_i w_i |v_i|. But T = m - m . m^ m^ = 0
/// identically, so the result is cos(eps) m^ sum_i w_i |v_i|: computed so here, not from the rounding
/// noise of T (which mergekit's float32 carries, at about 1e-7 of the result). One model: its tensor
/// (c = 1, with or without a base: the caller adds none).
inline std::vector<double> multislerp_coefficients(const Gram& g, std::vector<double> w,
                                                   bool normalize_weights, double eps,
                                                   const std::string& tensor) {
  const std::size_t n = g.n;
  if (n == 1) return {1.0};
  if (normalize_weights) {
    double total = 0;
    for (const double x : w) total += x;
    for (double& x : w) x /= total;  // (a zero sum is refused by MergeOptions::check)
  }
  std::vector<double> norms(n), to_v(n);  // to_v: a unit's coefficient on its v
  for (std::size_t i = 0; i < n; ++i) {
    norms[i] = std::sqrt(std::max(0.0, g(i, i)));
    to_v[i] = 1 / (norms[i] + eps);
  }
  Gram units = g;  // the units' Gram matrix
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) units.at[i * n + j] *= to_v[i] * to_v[j];
  const double mean_norm = units.norm(w);
  if (mean_norm < eps) {
    if (n == 2) return w;  // mergekit's fallback: the linear interpolation
    throw InvalidArgument("polyak::merge: tensor '" + tensor + "': multislerp's weighted mean of the " +
                          "models' directions is zero (|m| = " + number_text(mean_norm) +
                          " < eps): antipodal models whose weights cancel have no spherical mean");
  }
  double radius = 0;
  for (std::size_t i = 0; i < n; ++i) radius += norms[i] * w[i];
  std::vector<double> c(n);
  for (std::size_t i = 0; i < n; ++i) c[i] = std::cos(eps) * w[i] / mean_norm * radius * to_v[i];
  return c;
}

/// mergekit's `karcher` as coefficients c on the models' vectors (the merged tensor: sum_i c_i v_i):
/// the weighted Karcher mean, on the unit sphere, of the directions of the models whose norm exceeds
/// `tol`, all weighted equally, scaled by the mean of all the norms. From the normalized Euclidean
/// mean of the directions (the first direction where that is shorter than tol), at most `max_iter`
/// steps along the exponential map of sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu),
/// stopping once that tangent is shorter than tol; a direction within tol of the mean adds nothing.
/// A direction antipodal to the mean (pi - theta < 1e-6: the mean is not unique there; mergekit
/// divides by sin(pi)) is refused. One model: its tensor; every norm within tol: zero.
inline std::vector<double> karcher_coefficients(const Gram& g, long long max_iter, double tol,
                                                const std::string& tensor) {
  const std::size_t n = g.n;
  if (n == 1) return {1.0};
  std::vector<double> norms(n), to_v(n, 0.0);
  std::vector<std::size_t> valid;
  for (std::size_t i = 0; i < n; ++i) {
    norms[i] = std::sqrt(std::max(0.0, g(i, i)));
    if (norms[i] > tol) {
      valid.push_back(i);
      to_v[i] = 1 / norms[i];
    }
  }
  if (valid.empty()) return std::vector<double>(n, 0.0);
  Gram units = g;
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) units.at[i * n + j] *= to_v[i] * to_v[j];
  const double a = 1.0 / static_cast<double>(valid.size());
  std::vector<double> mean(n, 0.0), tangent(n);
  for (const std::size_t i : valid) mean[i] = a;
  const double mean_norm = units.norm(mean);
  if (mean_norm < tol) {
    std::fill(mean.begin(), mean.end(), 0.0);
    mean[valid.front()] = 1;
  } else {
    for (double& x : mean) x /= mean_norm;
  }
  for (long long step = 0; step < max_iter; ++step) {
    std::fill(tangent.begin(), tangent.end(), 0.0);
    for (const std::size_t i : valid) {
      double dot = 0;
      for (std::size_t j = 0; j < n; ++j) dot += units(i, j) * mean[j];
      dot = std::clamp(dot, -1.0, 1.0);
      const double theta = std::acos(dot);
      if (theta < tol) continue;
      if (std::acos(-1.0) - theta < 1e-6) {
        throw InvalidArgument("polyak::merge: tensor '" + tensor + "': model " + std::to_string(i + 1) +
                              " points opposite the Karcher mean's iterate (angle pi - " +
                              number_text(std::acos(-1.0) - theta) + "): the mean is not unique there");
      }
      const double k = a * theta / std::sin(theta);
      for (std::size_t j = 0; j < n; ++j) tangent[j] -= k * dot * mean[j];
      tangent[i] += k;
    }
    const double length = units.norm(tangent);
    if (length < tol) break;
    for (std::size_t j = 0; j < n; ++j)
      mean[j] = std::cos(length) * mean[j] + std::sin(length) * tangent[j] / length;
    const double renorm = units.norm(mean);
    if (renorm > tol)
      for (double& x : mean) x /= renorm;
  }
  double scale = 0;  // the mean of every norm (those within tol too: mergekit's)
  for (const double r : norms) scale += r / static_cast<double>(n);
  std::vector<double> c(n);
  for (std::size_t i = 0; i < n; ++i) c[i] = scale * mean[i] * to_v[i];
  return c;
}

}  // namespace polyak::detail
