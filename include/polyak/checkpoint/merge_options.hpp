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

#include <cstdint>
#include <vector>

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

}  // namespace polyak
