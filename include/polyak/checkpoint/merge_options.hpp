// SPDX-License-Identifier: MIT
// What a merge does: the methods and their settings, MergeOptions; the merges themselves are in
// polyak/checkpoint/merge.hpp. The methods carry mergekit's names and parameter names.
//
// Per tensor, with models x_1..x_n, weights w_i (default 1) and, where a method needs one, a base b
// with task vectors tau_i = x_i - b:
//   Average (linear)  sum_i w_i x_i / sum_i w_i
//   Slerp             two models, per tensor: sin((1 - t) theta) / sin(theta) x_1 + sin(t theta) /
//                     sin(theta) x_2, theta the angle between the flattened tensors; where they are
//                     (anti)parallel (|cos theta| > 0.9995, mergekit's threshold) or one is zero, the
//                     linear (1 - t) x_1 + t x_2
//
// The task-vector family (mergekit's generalized task arithmetic): each tau_i is sparsified to k_i
// tau_i (k_i in {0, 1} per scalar) and rescaled by s_i, then
//   b + scale sum_i w_i s_i k_i e_i tau_i / D
// with e_i = 1 without sign consensus, else 1 where sign(w_i s_i k_i tau_i) is the elected sign, the
// sign of sum_i w_i s_i k_i tau_i (+ where it is 0; a zero never agrees); D = 1 unless `normalize`:
// then sum_i w_i e_i (1 where that is 0) with consensus, sum_i w_i (1 where |.| < 1e-8) without.
//   method            sparsified by       consensus  normalize  rescale   from
//   TaskArithmetic    -                   -          no         -         Ilharco et al., 2023
//   Ties              magnitude           sign       yes        no        Yadav et al., 2023
//   DareLinear        random              -          no         yes       Yu et al., 2024
//   DareTies          random              sign       no         yes       Yu et al., 2024
//   Breadcrumbs       outliers            -          no         no        Davari & Belilovsky, 2024
//   BreadcrumbsTies   outliers            sign       no         no        (the same, with TIES' signs)
//   Della             rank sampling       sign       yes        yes       Deep et al., 2024
//   DellaLinear       rank sampling       -          no         yes       (the same, without)
//   Dare              random              -          no         1/(1-p)   polyak's first DARE: the
//                                                                         paper's rescale
// (normalize and rescale: each method's default, which `normalize` / `rescale` override.)
// Ranks: by magnitude |tau| (NaN above everything, and carried into the result), equal magnitudes
// ranked by position, the earlier one higher; d_i is model i's density.
//   magnitude      keeps the floor(d_i numel) highest-ranked (none if that is 0; mergekit refuses)
//   outliers       drops the floor(gamma numel) highest-ranked, then the lowest-ranked so that
//                  floor(d_i numel) are kept (fewer dropped from the top where both cannot be met);
//                  d_i = 1 keeps everything (mergekit's), gamma 0 drops none from the top (mergekit's
//                  slice keeps nothing there)
//   random         keeps each scalar with probability d_i: u in [0, 1) drawn per scalar, kept where
//                  u >= 1 - d_i; u is SplitMix64's output at step p + 1 (p the scalar's position)
//                  from a key of `seed`, the tensor's name and i (detail::uniform_draw: a tensor's
//                  draws do not depend on which others exist, nor on the order they are drawn in)
//   rank sampling  within each row (the tensor as shape[0] rows; one row for a vector; mergekit ranks
//                  along dimension 1), the scalar of ascending rank r of c keeps with probability
//                  d_i - epsilon + 2 epsilon r / (c - 1) (d_i for c = 1), drawn as random
//   rescale        s_i = ||tau_i||_1 / ||k_i tau_i||_1 (mergekit's L1 rescale; 1 where either is
//                  below 1e-7); Dare's 1 / (1 - p), p = 1 - density or `drop`
//   d_i >= 1 keeps everything, unrescaled; d_i = 0 keeps nothing.
//
// The others:
//   NuSlerp     two models, t = w_2 / (w_1 + w_2) (0.5 where |w_1 + w_2| < 1e-6): with a base, b +
//               nuslerp(tau_1, tau_2), else nuslerp(x_1, x_2); nuslerp(v_1, v_2) = (sin((1 - t)
//               theta) v_1 + sin(t theta) v_2) / sin(theta), theta the angle between v_1 and v_2
//               (each divided by its norm, taken as at least 1e-7), linear (1 - t) v_1 + t v_2 where
//               |sin theta| < 1e-8; over the flattened tensor (nuslerp_flatten, the default), else per
//               row of the last dimension, or per column (the first dimension: nuslerp_row_wise)
//               (mergekit's `nuslerp`)
//   MultiSlerp  n models, on the sphere about the weighted mean of their directions (of their task
//               vectors where a base is given): units u_i = v_i / (|v_i| + eps), weights w_i (divided
//               by their sum where normalize_weights), m = sum_i w_i u_i; mergekit's exponential map
//               of the tangent sum_i w_i (u_i - <u_i, m^> m^) at m^ = m / |m|, a tangent that is 0
//               identically, leaves cos(eps) m^ sum_i w_i |v_i| (plus the base). |m| < eps: the
//               linear sum_i w_i v_i for two models, refused for more. One model: its tensor
//               (mergekit's `multislerp`)
//   Karcher     n models, weighted equally: the Karcher (Frechet) mean on the unit sphere of the
//               directions of those whose norm exceeds tol, scaled by the mean of all the norms;
//               at most max_iter steps of the exponential map from the normalized Euclidean mean,
//               until the tangent is no longer than tol; a direction antipodal to the iterate (sin
//               theta < 1e-6) adds nothing, as mergekit's exact antipode (two scalars of opposite
//               sign merge). One model: its tensor   (mergekit's `karcher`)
//               Both are computed from the models' norms and cosines (polyak/checkpoint/detail/
//               spherical_means.hpp): one pass to read them, one to write (and, for a multislerp
//               mean so short that the cosines lose it to cancellation, one to read its norm).
//   Passthrough one model's tensor as it is (rounded to the output's dtype; mergekit's layer slices)
//   ModelStock  b + t (mean_i x_i - b) with t = n c / (1 + (n - 1) c), c the mean over pairs i < j
//               of cos(tau_i, tau_j) (|tau_i| |tau_j| taken as at least 1e-6, clamped to [-1, 1]):
//               per tensor, or per row of its last dimension (filter_wise)   (Jang et al., 2024)
//               n >= 2; a c that brings 1 + (n - 1) c within 1e-9 of zero is refused
//   NearSwap    one model x and the base: b + w (x - b), w = min(1, t / |x - b|) (1 where x = b)
//               (mergekit's, after alchemonaut's QuartetAnemoi)
//   Sce         tau_i kept at the floor(select_topk m) scalars of highest variance across the models
//               (population variance; m the count of nonzero variances; position breaks ties, earlier
//               first; select_topk 1 keeps all), weighted by the mean square of each kept tau_i
//               (normalized to sum 1; uniform where all are 0), signs elected from sum_i tau_i as in
//               TIES, b + sum_i w_i e_i tau_i / sum_i w_i e_i   (FuseChat's SCE; mergekit's `sce`)
// Each scalar is computed in double and rounded once to the tensor's dtype (bf16 and fp16 stay
// bf16 and fp16; through a float rounded to odd, so that no value rounds twice). Integer tensors
// (counters) are the last model's. NaN and infinite task values: carried into their own scalar
// (ranked above every finite magnitude, NaN above infinity; left out of the L1 norms, Model Stock's,
// NuSlerp's and the spherical methods' inner products, and SCE's weights). Memory: a 1 MiB block and
// a 16 Ki-scalar piece (in double) per model, a span of 2^19 output scalars in the output's dtype
// (2 MB in float), kept from one tensor to the next; Sce, Della and the ranked methods where they rescale
// add an 8-byte key per scalar of the largest tensor (its magnitudes; the selection copies the boundary's
// bucket of them; the kept scalars are a window of keys, asked as the merge goes). The ranked methods
// without the rescale (TIES's and Breadcrumbs' default), on a tensor of 2^19 scalars or more, keep no
// keys: a sample of 4 or 5 pieces says where the window's boundaries fall, and the pass that counts the
// keys keeps the (key, position) of the scalars in those buckets, 16 bytes each, at most a quarter of a
// thread's scalars (some 6% of normally distributed ones); where the sample misses, they are freed and
// the 8-byte keys held instead (the same window either way). Della also one bit per scalar and model (the
// kept scalars; the random methods draw as they merge and keep none) and, per thread, counts for up to
// 2^14 buckets of a row's keys (33 bytes each) and 48 bytes per scalar of the buckets it ranks exactly
// (few; a whole row where its magnitudes are all equal); Model Stock one double
// per row (filter_wise) and one per pair of models; NuSlerp, not flattened, three long doubles and two
// doubles per row or column. Each thread (MergeOptions::threads, as many as the largest tensor has spans of
// 2^19 scalars) adds its span's output scalars (2 MB in float), two pieces per model and a 1 MiB block per
// input. The random methods that rescale (dare_ties, dare_linear) hold every model's task values, 8 bytes
// per scalar and model, where that fits 256 MiB: the pass that sums their L1 norms forms them, and the
// last pass reads the base alone, not every input again.
#pragma once

#include <algorithm>  // std::max_element
#include <cmath>      // std::isfinite
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/error.hpp"

namespace polyak {

/// The merge methods (their formulas: the header's comment; their names: to_string).
enum class MergeMethod {
  Average,          ///< "linear": the weighted mean
  TaskArithmetic,   ///< "task_arithmetic"
  Ties,             ///< "ties"
  Dare,             ///< "dare": random drops rescaled by 1 / (1 - p), as the DARE paper
  Slerp,            ///< "slerp"
  DareLinear,       ///< "dare_linear": random drops, mergekit's L1 rescale
  DareTies,         ///< "dare_ties"
  Breadcrumbs,      ///< "breadcrumbs"
  BreadcrumbsTies,  ///< "breadcrumbs_ties"
  Della,            ///< "della"
  DellaLinear,      ///< "della_linear"
  ModelStock,       ///< "model_stock"
  NearSwap,         ///< "nearswap"
  Sce,              ///< "sce"
  Passthrough,      ///< "passthrough": one model's tensor as it is (mergekit's, for layer slices)
  NuSlerp,          ///< "nuslerp": slerp by weights, of models or of task vectors, per tensor or row
  MultiSlerp,       ///< "multislerp": spherical barycentric interpolation of n models
  Karcher,          ///< "karcher": the Karcher mean of the models' directions, scaled by their norms
};

/// Every method, in declaration order (for tools that list them).
inline constexpr MergeMethod all_merge_methods[] = {MergeMethod::Average,
                                                    MergeMethod::TaskArithmetic,
                                                    MergeMethod::Ties,
                                                    MergeMethod::Dare,
                                                    MergeMethod::Slerp,
                                                    MergeMethod::DareLinear,
                                                    MergeMethod::DareTies,
                                                    MergeMethod::Breadcrumbs,
                                                    MergeMethod::BreadcrumbsTies,
                                                    MergeMethod::Della,
                                                    MergeMethod::DellaLinear,
                                                    MergeMethod::ModelStock,
                                                    MergeMethod::NearSwap,
                                                    MergeMethod::Sce,
                                                    MergeMethod::Passthrough,
                                                    MergeMethod::NuSlerp,
                                                    MergeMethod::MultiSlerp,
                                                    MergeMethod::Karcher};

/// What to merge, and how (see the header's comment for the formulas). A method refuses a setting it
/// does not use (check()): a field left at its default is not used.
struct MergeOptions {
  MergeMethod method = MergeMethod::Average;  ///< the method
  std::vector<double> weights;                ///< one a model, finite (>= 0 for Average; any sign else, the
                                ///< sign consensus electing from the weighted values); empty: all 1
                                ///< (not Slerp, ModelStock, NearSwap, Sce, Passthrough, Karcher)
  double scale = 1.0;             ///< the lambda on the merged task vector (the task-vector family;
                                  ///< mergekit's `lambda`)
  double density = 1.0;           ///< the sparsified methods: the fraction of each task vector kept, in
                                  ///< [0, 1] (Dare drops with probability 1 - density)
  std::vector<double> densities;  ///< one density a model, overriding `density` (empty: `density`)
  double drop = 0.0;              ///< Dare: the drop probability, in [0, 1) (the paper's p; or density)
  double gamma = 0.01;            ///< Breadcrumbs*: the fraction of largest magnitudes dropped, in [0, 1]
  double epsilon = 0.15;          ///< Della*: the spread of keep probabilities around the density, with
                                  ///< 0 < density - epsilon and density + epsilon < 1 where density < 1
  std::optional<bool> normalize;  ///< the task-vector family: divide by the weights (unset: the
                                  ///< method's default, see the header)
  std::optional<bool> rescale;    ///< the random and rank-sampled methods, Breadcrumbs*, Ties: mergekit's
                                  ///< L1 rescale (unset: the method's default)
  std::uint64_t seed = 0;         ///< the random draws (Dare*, Della*)
  double t = 0.5;                 ///< Slerp: 0 gives the first model, 1 the second; NearSwap: the
                                  ///< sameness threshold, finite and > 0 (the tools require it given)
  bool filter_wise = false;       ///< ModelStock: an angle per row of the last dimension
  double select_topk = 1.0;       ///< Sce: the fraction of highest-variance scalars kept, in (0, 1]
  bool nuslerp_flatten = true;    ///< NuSlerp: one angle for the whole tensor (else per row or column)
  bool nuslerp_row_wise = false;  ///< NuSlerp, not flattened: vectors along the first dimension
  bool normalize_weights = true;  ///< MultiSlerp: divide the weights by their sum (which must not be 0)
  double eps = 1e-8;              ///< MultiSlerp: the guard added to norms, finite and > 0
  long long max_iter = 10;        ///< Karcher: the most steps, in [0, 1e6]
  double tol = 1e-5;              ///< Karcher: the convergence tolerance (on angles, norms), finite, >= 0
  unsigned threads = 0;           ///< the threads that merge a tensor's pieces, at most 64: 0 (the
                                  ///< default) the machine's hardware threads, at most 4; 1 merges on
                                  ///< the calling thread alone; never more than a tensor has spans
                                  ///< of 2^19 scalars, and fewer where the system starts no more.
                                  ///< Each holds a span of output (2 MB in float), and 1 MiB and two
                                  ///< pieces an input. The bytes written do not depend on it.

  /// Model m's density: densities[m] where given, else density.
  double density_of(std::size_t m) const { return densities.empty() ? density : densities[m]; }

  /// Refuses (InvalidArgument, naming it) options that do not fit `models` models with or without a
  /// base, and a setting the method does not use (away from its default), so that none is silently
  /// ignored. The merges call it before they read anything.
  void check(std::size_t models, bool has_base) const;
};

/// The method's name, mergekit's, as the merged file's "merge_method" metadata and the tools write
/// it ("average" for Average, which mergekit calls "linear", and "dare" for polyak's first DARE).
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
    case MergeMethod::DareLinear:
      return "dare_linear";
    case MergeMethod::DareTies:
      return "dare_ties";
    case MergeMethod::Breadcrumbs:
      return "breadcrumbs";
    case MergeMethod::BreadcrumbsTies:
      return "breadcrumbs_ties";
    case MergeMethod::Della:
      return "della";
    case MergeMethod::DellaLinear:
      return "della_linear";
    case MergeMethod::ModelStock:
      return "model_stock";
    case MergeMethod::NearSwap:
      return "nearswap";
    case MergeMethod::Sce:
      return "sce";
    case MergeMethod::Passthrough:
      return "passthrough";
    case MergeMethod::NuSlerp:
      return "nuslerp";
    case MergeMethod::MultiSlerp:
      return "multislerp";
    case MergeMethod::Karcher:
      return "karcher";
  }
  return "?";
}

/// The method named `name` (to_string's names, and mergekit's "linear" for Average); false if none.
inline bool merge_method_named(const std::string& name, MergeMethod& method) {
  if (name == "linear") {
    method = MergeMethod::Average;
    return true;
  }
  for (const MergeMethod m : all_merge_methods) {
    if (name == to_string(m)) {
      method = m;
      return true;
    }
  }
  return false;
}

/// How a task-vector method sparsifies each task vector.
enum class Sparsification { None, Magnitude, Random, Outliers, RankSampling };

/// Whether `method` merges task vectors (mergekit's generalized task arithmetic, and Dare).
inline bool is_task_vector_method(MergeMethod method) {
  return method == MergeMethod::TaskArithmetic || method == MergeMethod::Ties ||
         method == MergeMethod::Dare || method == MergeMethod::DareLinear ||
         method == MergeMethod::DareTies || method == MergeMethod::Breadcrumbs ||
         method == MergeMethod::BreadcrumbsTies || method == MergeMethod::Della ||
         method == MergeMethod::DellaLinear;
}

/// How `method` (of the task-vector family) sparsifies.
inline Sparsification sparsification_of(MergeMethod method) {
  if (method == MergeMethod::Ties) return Sparsification::Magnitude;
  if (method == MergeMethod::Dare || method == MergeMethod::DareLinear || method == MergeMethod::DareTies)
    return Sparsification::Random;
  if (method == MergeMethod::Breadcrumbs || method == MergeMethod::BreadcrumbsTies)
    return Sparsification::Outliers;
  if (method == MergeMethod::Della || method == MergeMethod::DellaLinear) return Sparsification::RankSampling;
  return Sparsification::None;
}

/// Whether `method` elects a sign per scalar and merges only the task values that agree with it.
inline bool uses_sign_consensus(MergeMethod method) {
  return method == MergeMethod::Ties || method == MergeMethod::DareTies ||
         method == MergeMethod::BreadcrumbsTies || method == MergeMethod::Della;
}

/// Whether `method` (of the task-vector family) divides by the weights unless told otherwise.
inline bool normalizes_by_default(MergeMethod method) {
  return method == MergeMethod::Ties || method == MergeMethod::Della;
}

/// Whether `method` (of the task-vector family) applies mergekit's L1 rescale unless told otherwise.
inline bool rescales_by_default(MergeMethod method) {
  return method == MergeMethod::DareLinear || method == MergeMethod::DareTies ||
         method == MergeMethod::Della || method == MergeMethod::DellaLinear;
}

/// Whether `method` merges against a base model.
inline bool needs_base(MergeMethod method) {
  return is_task_vector_method(method) || method == MergeMethod::ModelStock ||
         method == MergeMethod::NearSwap || method == MergeMethod::Sce;
}

/// Whether `method` takes a base model if one is given (merging its task vectors) but needs none.
inline bool takes_optional_base(MergeMethod method) {
  return method == MergeMethod::NuSlerp || method == MergeMethod::MultiSlerp;
}

inline void MergeOptions::check(std::size_t models, bool has_base) const {
  const MergeOptions& o = *this;
  const auto bad = [](const std::string& why) { throw InvalidArgument("polyak::merge: " + why); };
  const std::string name = to_string(o.method);
  const MergeMethod m = o.method;
  const Sparsification sparsify = sparsification_of(m);
  if (models == 0) bad("no models");
  if (needs_base(m) && !has_base) bad(name + " needs a base model");
  if (!needs_base(m) && !takes_optional_base(m) && has_base) bad(name + " takes no base model");
  if (m == MergeMethod::NuSlerp && models != 2)
    bad("nuslerp merges two models (and a base, if given), not " + std::to_string(models));
  if (m == MergeMethod::Slerp && models != 2) bad("slerp merges two models, not " + std::to_string(models));
  if (m == MergeMethod::Passthrough && models != 1)
    bad("passthrough copies one model's tensor, not " + std::to_string(models));
  if (m == MergeMethod::NearSwap && models != 1)
    bad("nearswap merges one model with the base, not " + std::to_string(models));
  if (m == MergeMethod::ModelStock && models < 2)
    bad("model_stock merges at least two models with the base, not " + std::to_string(models));
  const auto unused = [&](bool set, const char* setting) {
    if (set) bad(std::string(setting) + " is not a setting of " + name);
  };
  const MergeOptions defaults;
  const bool weighted = m == MergeMethod::Average || is_task_vector_method(m) || m == MergeMethod::NuSlerp ||
                        m == MergeMethod::MultiSlerp;
  unused(!o.weights.empty() && !weighted, "weights");
  unused(!detail::exactly_equal(o.scale, defaults.scale) && !is_task_vector_method(m), "scale");
  unused(!detail::exactly_equal(o.density, defaults.density) && sparsify == Sparsification::None, "density");
  unused(!o.densities.empty() && sparsify == Sparsification::None, "densities");
  unused(!detail::exactly_equal(o.drop, defaults.drop) && m != MergeMethod::Dare, "drop");
  unused(!detail::exactly_equal(o.gamma, defaults.gamma) && sparsify != Sparsification::Outliers, "gamma");
  unused(!detail::exactly_equal(o.epsilon, defaults.epsilon) && sparsify != Sparsification::RankSampling,
         "epsilon");
  unused(o.normalize.has_value() && !is_task_vector_method(m), "normalize");
  unused(o.rescale.has_value() && (sparsify == Sparsification::None || m == MergeMethod::Dare), "rescale");
  unused(o.seed != defaults.seed && sparsify != Sparsification::Random &&
             sparsify != Sparsification::RankSampling,
         "seed");
  unused(!detail::exactly_equal(o.t, defaults.t) && m != MergeMethod::Slerp && m != MergeMethod::NearSwap,
         "t");
  unused(o.filter_wise && m != MergeMethod::ModelStock, "filter_wise");
  unused(!detail::exactly_equal(o.select_topk, defaults.select_topk) && m != MergeMethod::Sce, "select_topk");
  unused(!o.nuslerp_flatten && m != MergeMethod::NuSlerp, "nuslerp_flatten");
  unused(o.nuslerp_row_wise && m != MergeMethod::NuSlerp, "nuslerp_row_wise");
  if (o.nuslerp_row_wise && o.nuslerp_flatten) bad("nuslerp_row_wise takes nuslerp_flatten false");
  unused(!o.normalize_weights && m != MergeMethod::MultiSlerp, "normalize_weights");
  unused(!detail::exactly_equal(o.eps, defaults.eps) && m != MergeMethod::MultiSlerp, "eps");
  unused(o.max_iter != defaults.max_iter && m != MergeMethod::Karcher, "max_iter");
  unused(!detail::exactly_equal(o.tol, defaults.tol) && m != MergeMethod::Karcher, "tol");
  if (!(o.eps > 0) || !std::isfinite(o.eps)) bad("eps must be finite and > 0");
  if (o.max_iter < 0 || o.max_iter > 1000000) bad("max_iter must be in [0, 1000000]");
  if (!(o.tol >= 0) || !std::isfinite(o.tol)) bad("tol must be finite and >= 0");
  if (m == MergeMethod::Dare && (o.density < 1 || !o.densities.empty()) && o.drop > 0)
    bad("dare takes density (the fraction kept) or drop (its complement), not both");
  if (!o.densities.empty() && !detail::exactly_equal(o.density, defaults.density))
    bad("density and densities exclude each other");
  if (!o.weights.empty() && o.weights.size() != models)
    bad(std::to_string(o.weights.size()) + " weights for " + std::to_string(models) + " models");
  if (!o.densities.empty() && o.densities.size() != models)
    bad(std::to_string(o.densities.size()) + " densities for " + std::to_string(models) + " models");
  for (const double w : o.weights) {
    if (!std::isfinite(w)) bad("a weight is not finite");
    if (m == MergeMethod::Average && w < 0) bad("average weights must be >= 0");
  }
  if (m == MergeMethod::Average && !o.weights.empty() &&
      *std::max_element(o.weights.begin(), o.weights.end()) <= 0) {
    bad("the weights are all 0");
  }
  if (m == MergeMethod::MultiSlerp && o.normalize_weights && !o.weights.empty() && models > 1) {
    double total = 0;
    for (const double w : o.weights) total += w;
    if (!(std::abs(total) > 0) || !std::isfinite(total))
      bad("multislerp's weights sum to " + detail::number_text(total) + ": normalize_weights divides by it");
  }
  if (!std::isfinite(o.scale)) bad("scale is not finite");
  for (std::size_t i = 0; i < (o.densities.empty() ? 1 : o.densities.size()); ++i) {
    const double d = o.densities.empty() ? o.density : o.densities[i];
    if (!detail::in_unit_interval(d)) bad(detail::unit_interval_problem(d, "density"));
    if (m == MergeMethod::Dare && !(d > 0)) bad("dare's density must be in (0, 1]: it keeps that fraction");
    if (sparsify == Sparsification::RankSampling && d > 0 && d < 1 &&
        !(d - o.epsilon > 0 && d + o.epsilon < 1)) {
      bad("density " + detail::number_text(d) + " and epsilon " + detail::number_text(o.epsilon) +
          ": density - epsilon and density + epsilon must lie in (0, 1)");
    }
  }
  if (!(o.drop >= 0 && o.drop < 1)) bad("drop must be in [0, 1)");
  if (!detail::in_unit_interval(o.gamma)) bad(detail::unit_interval_problem(o.gamma, "gamma"));
  if (!(o.epsilon >= 0 && o.epsilon < 0.5)) bad("epsilon must be in [0, 0.5)");
  if (m == MergeMethod::NearSwap) {
    if (!(o.t > 0) || !std::isfinite(o.t))
      bad("nearswap's t (the sameness threshold) must be finite and > 0");
  } else if (!detail::in_unit_interval(o.t)) {
    bad(detail::unit_interval_problem(o.t, "t"));
  }
  if (!(o.select_topk > 0 && o.select_topk <= 1)) bad("select_topk must be in (0, 1]");
  if (o.threads > 64) bad("threads must be in [0, 64] (0: the machine's, at most 4)");
}

}  // namespace polyak
