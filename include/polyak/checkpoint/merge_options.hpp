// SPDX-License-Identifier: MIT
// What a merge does: the methods and their settings, MergeOptions; the merges themselves are in
// polyak/checkpoint/merge.hpp.
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

#include <algorithm>  // std::max_element
#include <cmath>      // std::isfinite
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/error.hpp"

namespace polyak {

/// The merge methods (their formulas: the header's comment).
enum class MergeMethod { Average, TaskArithmetic, Ties, Dare, Slerp };

/// What to merge, and how (see the header's comment for the formulas). A method refuses a setting it
/// does not use (check()): a field left at its default is not used.
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

  /// Refuses (InvalidArgument, naming it) options that do not fit `models` models with or without a
  /// base, and a setting the method does not use (away from its default), so that none is silently
  /// ignored. The merges call it before they read anything.
  void check(std::size_t models, bool has_base) const;
};

/// The method's name, as the merged file's "merge_method" metadata and the tools write it.
inline const char* to_string(MergeMethod method) {
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

/// Whether `method` merges task vectors against a base model (task arithmetic, TIES, DARE).
inline bool needs_base(MergeMethod method) {
  return method == MergeMethod::TaskArithmetic || method == MergeMethod::Ties || method == MergeMethod::Dare;
}

inline void MergeOptions::check(std::size_t models, bool has_base) const {
  const MergeOptions& o = *this;
  const auto bad = [](const std::string& why) { throw InvalidArgument("polyak::merge: " + why); };
  const std::string name = to_string(o.method);
  const MergeMethod m = o.method;
  if (models == 0) bad("no models");
  if (needs_base(m) && !has_base) bad(name + " needs a base model");
  if (!needs_base(m) && has_base) bad(name + " takes no base model");
  if (m == MergeMethod::Slerp && models != 2) bad("slerp merges two models, not " + std::to_string(models));
  if (m == MergeMethod::Ties && models > 64)
    bad("ties merges at most 64 models, not " + std::to_string(models));
  const auto unused = [&](bool set, const char* setting) {
    if (set) bad(std::string(setting) + " is not a setting of " + name);
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
  if (!detail::in_unit_interval(o.density)) bad(detail::unit_interval_problem(o.density, "density"));
  if (m == MergeMethod::Dare && !(o.density > 0))
    bad("dare's density must be in (0, 1]: it keeps that fraction");
  if (!(o.drop >= 0 && o.drop < 1)) bad("drop must be in [0, 1)");
  if (!detail::in_unit_interval(o.t)) bad(detail::unit_interval_problem(o.t, "t"));
}

}  // namespace polyak
