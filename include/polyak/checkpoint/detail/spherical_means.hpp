// SPDX-License-Identifier: MIT
// Multi-SLERP and the Karcher mean from the models' norms and the cosines between them. Every vector
// either method forms (the units, their mean, the tangents, the result) lies in the span of the
// models' vectors v_1..v_n, so each is held as n coefficients on their directions and each inner
// product is read from the cosines: one pass over the tensor computes them (merge_methods.hpp: in
// double with compensated sums, product_sums.hpp), the iterations cost O(n^2) a step whatever the
// tensor's size, and a last pass writes sum_i c_i v_i. Norms and cosines, not the Gram matrix
// itself: they stay in double's range whatever the models' scales (a model of norm 1e-155 beside
// one of norm 1). A norm computed from the cosines of a vector much shorter than its coefficients
// loses precision to cancellation (about 1e-8 of them); where multislerp's mean is that short, its
// norm is read from the tensor instead.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/error.hpp"

namespace polyak::detail {

/// The models' vectors v_i as the spherical methods see them.
struct Sphere {
  std::vector<double> norms;    ///< |v_i| (0 for a zero vector)
  std::vector<double> cosines;  ///< n x n, row-major: the directions' inner products (0 beside a zero vector)

  std::size_t size() const { return norms.size(); }
  double cosine(std::size_t i, std::size_t j) const { return cosines[i * norms.size() + j]; }
  /// |sum_i a_i d_i|, d_i the directions (0 where rounding makes its square negative).
  double norm(const std::vector<double>& a) const {
    double sum = 0;
    for (std::size_t i = 0; i < size(); ++i)
      for (std::size_t j = 0; j < size(); ++j) sum += a[i] * cosine(i, j) * a[j];
    return std::sqrt(std::max(0.0, sum));
  }
};

/// |sum_i c_i v_i| read from the tensor itself (a pass over it), for coefficients c on the vectors.
using ExactNorm = std::function<double(const std::vector<double>&)>;

/// mergekit's `multislerp` as coefficients c on the models' vectors v_i (the task vectors where a base
/// is given): the merged tensor is sum_i c_i v_i (plus the base). w: the weights, divided by their sum
/// where `normalize_weights`. Units u_i = v_i / (|v_i| + eps); their weighted mean m = sum_i w_i u_i,
/// refused where |m| < eps for more than two models (for two: the linear w_1 v_1 + w_2 v_2); mergekit
/// then forms the tangent T = sum_i w_i (u_i - (u_i . m^) m^) at m^ = m / |m| and returns
/// (cos(|T| + eps) m^ + sin(|T| + eps) / (|T| + eps) T) sum_i w_i |v_i|. But T = m - (m . m^) m^ = 0
/// identically, so the result is cos(eps) m^ sum_i w_i |v_i|: computed so here, not from the rounding
/// noise of T (which mergekit's float32 carries, at about 1e-7 of the result). |m| is read from the
/// tensor (`exact`) where the cosines would lose it to cancellation (nearly antipodal models). One
/// model: its tensor (c = 1, with or without a base: the caller adds none).
inline std::vector<double> multislerp_coefficients(const Sphere& s, std::vector<double> w,
                                                   bool normalize_weights, double eps, const ExactNorm& exact,
                                                   const std::string& tensor) {
  const std::size_t n = s.size();
  if (n == 1) return {1.0};
  if (normalize_weights) {
    double total = 0;
    for (const double x : w) total += x;
    for (double& x : w) x /= total;  // (a zero sum is refused by MergeOptions::check)
  }
  std::vector<double> along(n), on_v(n, 0.0);  // m's coefficients on the directions, and on the vectors
  double spread = 0;                           // sum_i |along_i|: the scale of the cancellation
  for (std::size_t i = 0; i < n; ++i) {
    along[i] = w[i] * (s.norms[i] / (s.norms[i] + eps));
    if (s.norms[i] > 0) on_v[i] = w[i] / (s.norms[i] + eps);
    spread += std::abs(along[i]);
  }
  double mean_norm = s.norm(along);
  if (mean_norm < 1e-3 * spread) mean_norm = exact(on_v);  // (cancellation: read it from the tensor)
  if (mean_norm < eps) {
    if (n == 2) return w;  // mergekit's fallback: the linear interpolation
    throw InvalidArgument("polyak::merge: tensor '" + tensor + "': multislerp's weighted mean of the " +
                          "models' directions is zero (|m| = " + number_text(mean_norm) +
                          " < eps): antipodal models whose weights cancel have no spherical mean");
  }
  double radius = 0;
  for (std::size_t i = 0; i < n; ++i) radius += s.norms[i] * w[i];
  std::vector<double> c(n);
  for (std::size_t i = 0; i < n; ++i) c[i] = std::cos(eps) * radius * (on_v[i] / mean_norm);
  return c;
}

/// mergekit's `karcher` as coefficients c on the models' vectors (the merged tensor: sum_i c_i v_i):
/// the Karcher mean, on the unit sphere, of the directions of the models whose norm exceeds `tol`, all
/// weighted equally, scaled by the mean of all the norms. From the normalized Euclidean mean of the
/// directions (the first direction where that is no longer than tol), at most `max_iter` steps along
/// the exponential map of sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu), stopping once that
/// tangent is no longer than tol (tol 0: once it is 0); a direction within tol of the mean adds
/// nothing, and so does one antipodal to it (sin(theta) < 1e-6: no direction to it is preferred;
/// mergekit's exactly antipodal term is 0 too, so that two scalars of opposite sign merge). One model:
/// its tensor; every norm within tol: zero.
inline std::vector<double> karcher_coefficients(const Sphere& s, long long max_iter, double tol) {
  const std::size_t n = s.size();
  if (n == 1) return {1.0};
  std::vector<std::size_t> valid;
  for (std::size_t i = 0; i < n; ++i) {
    if (s.norms[i] > tol) valid.push_back(i);
  }
  if (valid.empty()) return std::vector<double>(n, 0.0);
  const double a = 1.0 / static_cast<double>(valid.size());
  std::vector<double> mean(n, 0.0), tangent(n);  // on the directions
  for (const std::size_t i : valid) mean[i] = a;
  const double mean_norm = s.norm(mean);
  if (mean_norm <= tol) {
    std::fill(mean.begin(), mean.end(), 0.0);
    mean[valid.front()] = 1;
  } else {
    for (double& x : mean) x /= mean_norm;
  }
  for (long long step = 0; step < max_iter; ++step) {
    std::fill(tangent.begin(), tangent.end(), 0.0);
    for (const std::size_t i : valid) {
      double dot = 0;
      for (std::size_t j = 0; j < n; ++j) dot += s.cosine(i, j) * mean[j];
      dot = std::clamp(dot, -1.0, 1.0);
      const double theta = std::acos(dot), sine = std::sin(theta);
      if (theta <= tol || sine < 1e-6) continue;
      const double k = a * theta / sine;
      for (std::size_t j = 0; j < n; ++j) tangent[j] -= k * dot * mean[j];
      tangent[i] += k;
    }
    const double length = s.norm(tangent);
    if (!(length > tol)) break;
    for (std::size_t j = 0; j < n; ++j)
      mean[j] = std::cos(length) * mean[j] + std::sin(length) * tangent[j] / length;
    const double renorm = s.norm(mean);
    if (renorm > tol)
      for (double& x : mean) x /= renorm;
  }
  double scale = 0;  // the mean of every norm (those within tol too: mergekit's)
  for (const double r : s.norms) scale += r / static_cast<double>(n);
  std::vector<double> c(n, 0.0);
  for (const std::size_t i : valid) c[i] = scale * (mean[i] / s.norms[i]);
  return c;
}

}  // namespace polyak::detail
