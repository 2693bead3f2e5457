// SPDX-License-Identifier: MIT
// The merge methods' arithmetic, one tensor at a time in pieces (polyak/checkpoint/merge.hpp calls
// it): the options' checks, the per-method kernels, and the streamed writer of one merged tensor.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <exception>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <future>  // the lanes after the first, each on a thread of its own
#include <limits>
#include <map>
#include <mutex>
#include <new>  // std::bad_alloc
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/types.h>  // off_t
#include <unistd.h>     // lseek

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/detail/start_or_defer.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/checkpoint/safetensors.hpp"
#include "polyak/checkpoint/sharded_checkpoint.hpp"
#include "polyak/checkpoint/merge_options.hpp"
#include "polyak/checkpoint/detail/product_sums.hpp"
#include "polyak/checkpoint/detail/sparsify.hpp"
#include "polyak/checkpoint/detail/spherical_means.hpp"
#include "polyak/checkpoint/state_dict.hpp"

namespace polyak {

namespace detail {

/// Where a merge reads one tensor: read(lane, m, begin, count, out) fills out with elements
/// [begin, begin + count) of model m (m == models: the base) as doubles, for `lane` (< merge_lanes()):
/// calls for different lanes come from different threads at once.
using TensorSource = std::function<void(std::size_t lane, std::size_t model, std::size_t begin,
                                        std::size_t count, double* out)>;

/// Where a merge puts one tensor's merged scalars: store(bytes, begin, count) takes elements [begin,
/// begin + count), already in the output's dtype, from any lane's thread, at once with the others.
/// (A std::function, not a template parameter: merge_tensor is compiled once a translation unit,
/// not once a caller's lambda; it is called once a span of merge_lane_span scalars.)
using TensorSink = std::function<void(const std::byte* bytes, std::size_t begin, std::size_t count)>;

/// The scalars one thread merges at a time (several pieces: a thread is started a span, and a 1 MiB
/// block of every input dtype but F64 lies within one span of one lane).
inline constexpr std::size_t merge_lane_span = std::size_t{1} << 19;

/// How many threads (lanes) merge a tensor of `numel` scalars under `o`: o.threads, or where it is 0
/// the machine's hardware threads, at most 4 (at least 1); never more than the tensor has spans of
/// merge_lane_span (no buffers for lanes left idle). The one rule for it: merge_tensor's lanes and
/// a streamed source's per-lane blocks must agree.
inline std::size_t merge_lanes(const MergeOptions& o, std::size_t numel) {
  const std::size_t threads =
      o.threads > 0 ? o.threads : std::clamp<std::size_t>(std::thread::hardware_concurrency(), 1, 4);
  const std::size_t spans = numel == 0 ? 1 : (numel + merge_lane_span - 1) / merge_lane_span;
  return std::min(threads, spans);
}

/// The smallest magnitude that rounds to infinity in `dtype` (round to nearest even): max + ulp / 2.
inline double overflow_threshold(DType dtype) {
  if (dtype == DType::F32) return std::ldexp(1.0, 128) - std::ldexp(1.0, 103);
  if (dtype == DType::F16) return 65520.0;
  if (dtype == DType::BF16) return std::ldexp(1.0, 128) - std::ldexp(1.0, 119);
  return std::numeric_limits<double>::infinity();  // F64 (and I64, which is not merged)
}

/// Whether a consensus-elected sign `sign` (+1 or -1) agrees with `value` (a zero never agrees).
inline bool agrees(double value, double sign) { return (value > 0 && sign > 0) || (value < 0 && sign < 0); }

/// Merges one floating-point tensor of `numel` elements and shape `shape`, calling store(bytes,
/// begin, count) with its scalars [begin, begin + count) merged and rounded once to `dtype`
/// (doubles_to_bytes), each scalar once, in spans of at most merge_lane_span: from
/// merge_lanes(o, numel) threads at once (this one among them), in no order between threads. `with_base`:
/// read(lane, models, ...) reads a base model (needed by needs_base methods, optional for takes_optional_base
/// ones).
inline void merge_tensor(const MergeOptions& o, std::size_t models, const std::string& name,
                         const std::vector<std::int64_t>& shape, std::size_t numel, DType dtype,
                         bool with_base, const TensorSource& read, const TensorSink& store,
                         MergeWorkspace& work) {
  // A merged value that overflows its dtype while its inputs are finite (a scale or weights too large)
  // is refused, not written as infinity.
  const double overflow = overflow_threshold(dtype);
  // (read_inputs() first puts the inputs into xs and b, where the pass has not read them all.)
  const auto check_range = [&](const std::vector<std::vector<double>>& xs, const std::vector<double>& b,
                               const double* values, std::size_t count, auto&& read_inputs) {
    const double surely_finite = overflow * (1 - 0x1p-20);  // (below it, finite once rounded)
    std::size_t near_or_beyond = 0;                         // (a count first: a loop the compiler vectorizes)
    for (std::size_t j = 0; j < count; ++j) near_or_beyond += !(std::abs(values[j]) < surely_finite);
    if (near_or_beyond == 0) return;
    read_inputs();
    for (std::size_t j = 0; j < count; ++j) {
      if (std::abs(values[j]) < surely_finite) continue;
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
  const MergeMethod method = o.method;
  const bool has_base = needs_base(method) || (takes_optional_base(method) && with_base);
  std::vector<double> w = o.weights.empty() ? std::vector<double>(models, 1.0) : o.weights;
  if (method == MergeMethod::Average) {  // normalized, divided by the largest first: no overflow
    const double largest = *std::max_element(w.begin(), w.end());
    double total = 0;
    for (double& x : w) total += (x /= largest);
    for (double& x : w) x /= total;
  }
  // Each lane's buffers (lane 0's serve the first passes too), kept in `work` from one tensor to the
  // next. A tensor of one span or less is merged by one thread.
  const std::size_t piece = std::min(numel, merge_piece), lane_span = std::min(numel, merge_lane_span);
  const std::size_t lane_count = merge_lanes(o, numel);
  std::vector<MergeLane>& lanes = work.lanes;
  if (lanes.size() < lane_count) lanes.resize(lane_count);
  for (std::size_t l = 0; l < lane_count; ++l) {
    lanes[l].x.resize(models);
    for (auto& piece_of_model : lanes[l].x) piece_of_model.resize(piece);
    lanes[l].base.resize(has_base ? piece : 0);
    lanes[l].out.resize(piece);
    lanes[l].out_bytes.resize(lane_span * dtype_size(dtype));
    lanes[l].v.resize(models * piece);  // (a piece a model: the task-vector methods' kept values)
    for (auto* scratch : {&lanes[l].elect, &lanes[l].sum, &lanes[l].divisor}) scratch->resize(piece);
    lanes[l].nan.resize(piece);
    lanes[l].kept.resize(method == MergeMethod::Sce ? piece : 0);
  }
  std::vector<std::vector<double>>& x = lanes[0].x;
  std::vector<double>& base = lanes[0].base;
  // Every model's piece [begin, begin + count), and the base's, into lane l's buffers.
  const auto read_lane = [&](std::size_t l, std::size_t begin, std::size_t count) {
    for (std::size_t m = 0; m < models; ++m) read(l, m, begin, count, lanes[l].x[m].data());
    if (has_base) read(l, models, begin, count, lanes[l].base.data());
  };
  const auto for_each_piece = [&](auto&& body) {  // (serial, in lane 0's buffers: x and base)
    for (std::size_t begin = 0; begin < numel; begin += merge_piece) {
      const std::size_t count = std::min(merge_piece, numel - begin);
      read_lane(0, begin, count);
      body(begin, count);
    }
  };
  // The elementwise passes in spans of lane_span scalars: span_body(l, begin, end) for each, lane l
  // taking spans l, l + lane_count, ... in order, lane 0 on this thread and the others each on a
  // thread of its own (or, where the system starts no more threads, on this one after lane 0). A
  // lane stops at its first error, and before any span past another lane's error; the earliest
  // span's error is rethrown here once every lane has stopped (the same error whatever the timing:
  // the lane of the earliest failing span reaches it).
  const auto in_lanes = [&](auto&& span_body) {
    std::atomic<std::size_t> failed_at{numel};  // the first scalar of the earliest span that threw
    std::vector<std::exception_ptr> errors(lane_count);
    std::vector<std::size_t> error_at(lane_count, numel);
    const auto run_lane = [&](std::size_t l) {
      for (std::size_t begin = l * lane_span; begin < numel; begin += lane_count * lane_span) {
        if (begin > failed_at.load()) return;
        try {
          span_body(l, begin, std::min(begin + lane_span, numel));
        } catch (...) {
          errors[l] = std::current_exception();
          error_at[l] = begin;
          std::size_t seen = failed_at.load();
          while (begin < seen && !failed_at.compare_exchange_weak(seen, begin)) {
          }
          return;
        }
      }
    };
    std::vector<std::future<void>> helpers;
    for (std::size_t l = 1; l < lane_count; ++l)
      helpers.push_back(start_or_defer([&run_lane, l] { run_lane(l); }));
    run_lane(0);
    for (auto& helper : helpers) helper.get();  // (a deferred one runs here, on this thread)
    std::size_t first = lane_count;
    for (std::size_t l = 0; l < lane_count; ++l) {
      if (errors[l] && (first == lane_count || error_at[l] < error_at[first])) first = l;
    }
    if (first < lane_count) std::rethrow_exception(errors[first]);
  };
  // body(l, begin, count) for every piece, spread over the lanes (in no order between spans).
  const auto for_each_piece_in_lanes = [&](auto&& body) {
    in_lanes([&](std::size_t l, std::size_t begin, std::size_t end) {
      for (std::size_t at = begin; at < end; at += merge_piece) body(l, at, std::min(merge_piece, end - at));
    });
  };

  // The sums of a whole-tensor pass, on the lanes and independent of their number: each span of
  // lane_span scalars sums its own part from zero, partial(lane, begin, end, part), and the parts
  // are added in span order here, add(total, part), from `zero`. A tensor of one span sums in scalar
  // order, as one accumulator does (0 + a sum taken from 0 is that sum: such a sum is never -0).
  const auto sum_in_spans = [&](auto zero, auto&& partial, auto&& add) {
    using Part = decltype(zero);
    std::vector<Part> parts(numel == 0 ? 0 : (numel + lane_span - 1) / lane_span, zero);
    in_lanes([&](std::size_t l, std::size_t begin, std::size_t end) {
      Part part = zero;  // (summed on this thread's stack: the parts of two lanes share cache lines)
      partial(l, begin, end, part);
      parts[begin / lane_span] = std::move(part);
    });
    Part total = zero;
    for (const Part& part : parts) add(total, part);
    return total;
  };
  // body(lane, begin, count) for every piece of [begin, end), read into lane l's buffers.
  const auto read_pieces = [&](std::size_t l, std::size_t begin, std::size_t end, auto&& body) {
    for (std::size_t at = begin; at < end; at += merge_piece) {
      const std::size_t count = std::min(merge_piece, end - at);
      read_lane(l, at, count);
      body(lanes[l], at, count);
    }
  };

  // The random methods that rescale (DARE-TIES, DARE-linear) read every model's task values for
  // their L1 norms before the last pass: they hold them (work.held) where they fit
  // work.held_limit, from a merge's second such tensor on, formed in that pass, so that the last
  // reads the base alone. The same subtraction either way: the same bytes. (Holding them cost the
  // ranked methods and Sce more than it saved: writing doubles where they read float32 again;
  // docs/merging.md.)
  bool drawn_rescale = false;  // whether drawn_norms reads them
  for (std::size_t m = 0; m < models && sparsification_of(method) == Sparsification::Random; ++m)
    drawn_rescale = drawn_rescale || rescales_l1(o, m);
  const bool fits =
      has_base && drawn_rescale && numel > 0 && models <= work.held_limit / sizeof(double) / numel;
  bool hold = fits && work.held_wanted;
  work.held_wanted = work.held_wanted || fits;
  if (hold && work.held_capacity < models * numel) {
    work.held.reset();  // (freed before the larger block is taken: never both)
    work.held_capacity = 0;
    try {
      work.held.reset(new double[models * numel]);
      work.held_capacity = models * numel;
    } catch (const std::bad_alloc&) {  // (an address-space limit: read the inputs again, as before)
      hold = false;
    }
  }
  const auto held_of = [&](std::size_t m, std::size_t begin) { return work.held.get() + m * numel + begin; };
  // Model m's task values of the piece read into `lane`, into `tau` (which may be the model's piece).
  const auto subtract_base = [](const MergeLane& lane, std::size_t m, std::size_t count, double* tau) {
    const double *xm = lane.x[m].data(), *b = lane.base.data();
    for (std::size_t j = 0; j < count; ++j) tau[j] = xm[j] - b[j];
  };
  // body(tau_at), tau_at(j) model m's task value at scalar j of the piece [begin, ...) in `lane`: held,
  // or formed from the lane's pieces (the loop body writes a loop each, which the compiler vectorizes).
  const auto with_task_values = [&](const MergeLane& lane, std::size_t m, std::size_t begin, auto&& body) {
    if (hold) {
      const double* held_m = held_of(m, begin);
      body([held_m](std::size_t j) { return held_m[j]; });
    } else {
      const double *xm = lane.x[m].data(), *b = lane.base.data();
      body([xm, b](std::size_t j) { return xm[j] - b[j]; });
    }
  };
  // body(lane, tau, at, count) for every piece of [begin, end), read in lane l, tau[m] pointing at
  // model m's task values of the piece: formed into work.held where held (drawn_norms' pass), else
  // in place in the lane's pieces.
  const auto task_pieces = [&](std::size_t l, std::size_t begin, std::size_t end, auto&& body) {
    std::vector<const double*> tau(models);
    read_pieces(l, begin, end, [&](MergeLane& lane, std::size_t at, std::size_t count) {
      for (std::size_t m = 0; m < models; ++m) {
        double* into = hold ? held_of(m, at) : lane.x[m].data();
        subtract_base(lane, m, count, into);
        tau[m] = into;
      }
      body(lane, static_cast<const double* const*>(tau.data()), at, count);
    });
  };

  // The Gram matrix (n x n, row-major, long double) of the models' vectors over scalars [begin, end),
  // read in lane l: their task vectors where `minus_base`, a non-finite value left out (as 0). The
  // products in double with compensated sums (product_sums.hpp), added to `part`; in long double by
  // add_gram_in_long_double where a vector's magnitudes leave the range those hold (F64 values).
  const auto add_gram = [&](std::size_t l, std::size_t begin, std::size_t end, bool minus_base,
                            ProductSums& part) {
    std::vector<const double*> v(models);
    read_pieces(l, begin, end, [&](MergeLane& lane, std::size_t, std::size_t count) {
      for (std::size_t a = 0; a < models; ++a) {
        double* xa = lane.x[a].data();  // (the vector formed in place)
        for (std::size_t j = 0; j < count; ++j) {
          const double value = minus_base ? xa[j] - lane.base[j] : xa[j];
          xa[j] = std::isfinite(value) ? value : 0.0;
        }
        v[a] = xa;
      }
      part.add(v.data(), count);
    });
  };
  // Model a's vector at scalar j of a lane's piece, in long double (as add_gram forms it).
  const auto vector_at = [](const MergeLane& lane, std::size_t a, std::size_t j, bool minus_base) {
    const double value = minus_base ? lane.x[a][j] - lane.base[j] : lane.x[a][j];
    return std::isfinite(value) ? static_cast<long double>(value) : 0.0L;
  };
  const auto add_gram_in_long_double = [&](std::size_t l, std::size_t begin, std::size_t end, bool minus_base,
                                           std::vector<long double>& part) {
    std::vector<long double> v(models);
    read_pieces(l, begin, end, [&](const MergeLane& lane, std::size_t, std::size_t count) {
      for (std::size_t j = 0; j < count; ++j) {
        for (std::size_t a = 0; a < models; ++a) v[a] = vector_at(lane, a, j, minus_base);
        for (std::size_t a = 0; a < models; ++a)
          for (std::size_t b = a; b < models; ++b) part[a * models + b] += v[a] * v[b];
      }
    });
    for (std::size_t a = 0; a < models; ++a)
      for (std::size_t b = 0; b < a; ++b) part[a * models + b] = part[b * models + a];
  };
  // The Gram matrix over the whole tensor, summed in spans on the lanes.
  const auto whole_gram = [&](bool minus_base) {
    const ProductSums sums = sum_in_spans(
        ProductSums(models),
        [&](std::size_t l, std::size_t begin, std::size_t end, ProductSums& part) {
          add_gram(l, begin, end, minus_base, part);
        },
        [](ProductSums& total, const ProductSums& part) { total.add(part); });
    if (sums.in_range()) return sums.gram();
    return sum_in_spans(
        std::vector<long double>(models * models, 0.0L),
        [&](std::size_t l, std::size_t begin, std::size_t end, std::vector<long double>& part) {
          add_gram_in_long_double(l, begin, end, minus_base, part);
        },
        [](std::vector<long double>& total, const std::vector<long double>& part) {
          for (std::size_t i = 0; i < total.size(); ++i) total[i] += part[i];
        });
  };

  // The Gram matrix over scalars [begin, end) alone (a row), on lane l, into `gram` (`sums`: memory
  // reused from one row to the next).
  const auto range_gram = [&](std::size_t l, std::size_t begin, std::size_t end, bool minus_base,
                              ProductSums& sums, std::vector<long double>& gram) {
    sums.clear();
    add_gram(l, begin, end, minus_base, sums);
    if (sums.in_range()) {
      gram = sums.gram();
    } else {
      gram.assign(models * models, 0.0L);
      add_gram_in_long_double(l, begin, end, minus_base, gram);
    }
  };

  // First passes over the whole tensor: what each method needs to know before it writes.
  double s0 = 1 - o.t, s1 = o.t;  // Slerp's coefficients
  if (method == MergeMethod::Slerp) {
    struct Dots {
      double dot = 0, aa = 0, bb = 0;
    };
    const Dots sums = sum_in_spans(
        Dots{},
        [&](std::size_t l, std::size_t begin, std::size_t end, Dots& part) {
          double dot = 0, aa = 0, bb = 0;  // (in registers)
          read_pieces(l, begin, end, [&](const MergeLane& lane, std::size_t, std::size_t count) {
            const double *x0 = lane.x[0].data(), *x1 = lane.x[1].data();
            for (std::size_t j = 0; j < count; ++j) {
              dot += x0[j] * x1[j];
              aa += x0[j] * x0[j];
              bb += x1[j] * x1[j];
            }
          });
          part = {dot, aa, bb};
        },
        [](Dots& total, const Dots& part) {
          total.dot += part.dot;
          total.aa += part.aa;
          total.bb += part.bb;
        });
    const double dot = sums.dot, aa = sums.aa, bb = sums.bb;
    const double cosine = aa > 0 && bb > 0 ? dot / std::sqrt(aa * bb) : 1.0;  // a zero tensor: linear
    if (std::abs(cosine) <= 0.9995) {
      const double theta = std::acos(cosine), sine = std::sin(theta);
      s0 = std::sin((1 - o.t) * theta) / sine;
      s1 = std::sin(o.t * theta) / sine;
    }
  }
  // NuSlerp: per group of scalars (the tensor; each row of the last dimension; each column of the
  // first, row-wise), the two coefficients of its vectors (task vectors where a base is given).
  std::vector<double> nu_s0, nu_s1;
  std::size_t nu_groups = 1, nu_inner = 0;  // group of scalar i: i / last (rows), i % inner (columns)
  const auto nu_group = [&](std::size_t i) {
    if (o.nuslerp_flatten || nu_groups == 1) return std::size_t{0};
    return o.nuslerp_row_wise ? i % nu_inner : i / nu_inner;
  };
  if (method == MergeMethod::NuSlerp) {
    double total = w[0] + w[1], second = w[1];
    if (!std::isfinite(total)) {  // (weights near 1e308: their ratio, from the weights halved)
      total = w[0] / 2 + w[1] / 2;
      second = w[1] / 2;
    }
    const double t = std::abs(total) < 1e-6 ? 0.5 : second / total;
    if (!o.nuslerp_flatten && shape.size() >= 2 && numel > 0) {
      nu_inner = o.nuslerp_row_wise ? numel / static_cast<std::size_t>(shape.front())
                                    : static_cast<std::size_t>(shape.back());
      nu_groups = o.nuslerp_row_wise ? nu_inner : numel / nu_inner;
    }
    // The sums in long double, not add_gram's double: where the two vectors are antipodal, one
    // rounding of a product in double leaves the cosine 2^-53 from -1, sin(theta) 1.5e-8, past the
    // colinear guard below (1e-8), and the coefficients near 1 / (2 cos(theta / 2)), some 10^7
    // (long double's products keep the cosine at -1). No overflow from F64 values near 1e300; a
    // non-finite value is left out (carried into its own scalar), as Model Stock's and the
    // spherical methods'. One group (the tensor flattened) is summed in spans on the lanes; rows
    // each on the lane whose span they start in, in scalar order; columns (row-wise) on this
    // thread, in scalar order.
    std::vector<long double> dot(nu_groups, 0.0L), aa(nu_groups, 0.0L), bb(nu_groups, 0.0L);
    using Sums = std::array<long double, 3>;  // dot, aa, bb
    const auto add = [](Sums& sums, long double v0, long double v1) {
      if (!std::isfinite(v0)) v0 = 0;
      if (!std::isfinite(v1)) v1 = 0;
      sums[0] += v0 * v1;
      sums[1] += v0 * v0;
      sums[2] += v1 * v1;
    };
    // Adds the pairs of scalars [begin, end) to `sums`, read in lane l (summed in a local: in
    // registers, not through the caller's memory).
    const auto add_range = [&](std::size_t l, std::size_t begin, std::size_t end, Sums& sums) {
      Sums local = sums;
      read_pieces(l, begin, end, [&](const MergeLane& lane, std::size_t, std::size_t count) {
        for (std::size_t j = 0; j < count; ++j) {
          const double b = has_base ? lane.base[j] : 0.0;
          add(local, static_cast<long double>(lane.x[0][j] - b), static_cast<long double>(lane.x[1][j] - b));
        }
      });
      sums = local;
    };
    if (nu_groups == 1) {  // (flattened, or one row)
      const Sums sums = sum_in_spans(
          Sums{0.0L, 0.0L, 0.0L},
          [&](std::size_t l, std::size_t begin, std::size_t end, Sums& part) {
            add_range(l, begin, end, part);
          },
          [](Sums& sum, const Sums& part) {
            for (std::size_t k = 0; k < 3; ++k) sum[k] += part[k];
          });
      dot[0] = sums[0];
      aa[0] = sums[1];
      bb[0] = sums[2];
    } else if (!o.nuslerp_row_wise) {
      in_lanes([&](std::size_t l, std::size_t begin, std::size_t end) {
        for (std::size_t g = (begin + nu_inner - 1) / nu_inner; g < nu_groups && g * nu_inner < end; ++g) {
          Sums sums{0.0L, 0.0L, 0.0L};
          add_range(l, g * nu_inner, (g + 1) * nu_inner, sums);
          dot[g] = sums[0];
          aa[g] = sums[1];
          bb[g] = sums[2];
        }
      });
    } else {
      for_each_piece([&](std::size_t begin, std::size_t count) {
        for (std::size_t j = 0; j < count; ++j) {
          const double b = has_base ? base[j] : 0.0;
          const std::size_t g = nu_group(begin + j);
          Sums sums{dot[g], aa[g], bb[g]};
          add(sums, static_cast<long double>(x[0][j] - b), static_cast<long double>(x[1][j] - b));
          dot[g] = sums[0];
          aa[g] = sums[1];
          bb[g] = sums[2];
        }
      });
    }
    nu_s0.assign(nu_groups, 1 - t);
    nu_s1.assign(nu_groups, t);
    for (std::size_t g = 0; g < nu_groups; ++g) {
      const double cosine = std::clamp(static_cast<double>(dot[g] / (std::max(std::sqrt(aa[g]), 1e-7L) *
                                                                     std::max(std::sqrt(bb[g]), 1e-7L))),
                                       -1.0, 1.0);
      const double theta = std::acos(cosine), sine = std::sin(theta);
      if (std::abs(sine) < 1e-8) continue;  // (nearly) colinear: linear
      nu_s0[g] = std::sin((1 - t) * theta) / sine;
      nu_s1[g] = std::sin(t * theta) / sine;
    }
  }
  // MultiSlerp, Karcher: the models' norms and cosines (of their task vectors where a base is given,
  // and more than one model), then the coefficients on them. The inner products in double with
  // compensated sums, or in long double where F64 magnitudes leave double's range for them (near
  // 1e160); a non-finite value is left out (carried into its scalar).
  std::vector<double> span;  // the merged tensor: (base +) sum_i span[i] (x_i - base)
  const bool spherical = method == MergeMethod::MultiSlerp || method == MergeMethod::Karcher;
  const bool span_base = has_base && models > 1;
  if (spherical && models == 1) span = {1.0};
  if (spherical && models > 1) {
    const std::vector<long double> gram = whole_gram(span_base);
    // Both methods are homogeneous of degree 1 in the vectors, so coefficients computed on the
    // vectors scaled by a power of two apply to them unscaled: where the largest norm leaves
    // double's comfortable range (F64 values beyond 1e300 or below 1e-300), the norms are scaled
    // into it (eps and tol then act at that scale).
    std::vector<long double> norms(models);
    long double largest = 0;
    for (std::size_t a = 0; a < models; ++a)
      largest = std::max(largest, norms[a] = std::sqrt(gram[a * models + a]));
    int exponent = 0;
    if (largest > 0x1p1000L || (largest > 0 && largest < 0x1p-1000L)) std::frexp(largest, &exponent);
    Sphere sphere{std::vector<double>(models), std::vector<double>(models * models, 0.0)};
    for (std::size_t a = 0; a < models; ++a) {
      sphere.norms[a] = static_cast<double>(std::ldexp(norms[a], -exponent));
      for (std::size_t b = a; b < models; ++b) {
        const long double product = norms[a] * norms[b];
        const double cosine =
            product > 0 ? std::clamp(static_cast<double>(gram[a * models + b] / product), -1.0, 1.0) : 0.0;
        sphere.cosines[a * models + b] = sphere.cosines[b * models + a] = cosine;
      }
    }
    const ExactNorm exact = [&](const std::vector<double>& c) {  // |sum_i c_i v_i|, at the norms' scale
      const long double sum = sum_in_spans(
          0.0L,
          [&](std::size_t l, std::size_t begin, std::size_t end, long double& part) {
            long double squares = 0;  // (in a register)
            read_pieces(l, begin, end, [&](const MergeLane& lane, std::size_t, std::size_t count) {
              for (std::size_t j = 0; j < count; ++j) {
                long double value = 0;
                for (std::size_t a = 0; a < models; ++a)
                  value += static_cast<long double>(c[a]) * vector_at(lane, a, j, span_base);
                squares += value * value;
              }
            });
            part = squares;
          },
          [](long double& total, long double part) { total += part; });
      return static_cast<double>(std::ldexp(std::sqrt(sum), -exponent));
    };
    span = method == MergeMethod::MultiSlerp
               ? multislerp_coefficients(sphere, w, o.normalize_weights, o.eps, exact, name)
               : karcher_coefficients(sphere, o.max_iter, o.tol);
  }
  std::vector<KeptScalars>& kept = work.kept;
  kept.resize(is_task_vector_method(method) ? models : 0);
  const std::vector<std::pair<double, double>> norms_drawn =
      sparsification_of(method) == Sparsification::Random
          ? drawn_norms(o, name, models, task_pieces, sum_in_spans)
          : std::vector<std::pair<double, double>>(models, {0.0, 0.0});
  for (std::size_t m = 0; m < kept.size(); ++m) {
    kept_scalars(
        o, m, name, shape, numel,
        [&](std::size_t l, std::size_t begin, std::size_t count) {  // model m's task values, in lane l
          double* tau = lanes[l].x[m].data();
          read(l, m, begin, count, tau);
          read(l, models, begin, count, lanes[l].base.data());
          subtract_base(lanes[l], m, count, tau);  // (in place)
          return static_cast<const double*>(tau);
        },
        for_each_piece_in_lanes, sum_in_spans, lane_count, lane_span, in_lanes, work, norms_drawn[m],
        kept[m]);
  }
  // Model Stock: per group of scalars (the tensor, or each row of its last dimension), t, from the
  // Gram matrix of the task vectors (add_gram: a non-finite task value is left out of it, carried
  // into its own scalar only). A tensor that is one group is summed in spans on the lanes
  // (whole_gram); rows are summed each on one lane (the rows that start in its spans).
  std::vector<double> stock_t;
  const std::size_t stock_columns =
      o.filter_wise && !shape.empty() && shape.back() > 0 ? static_cast<std::size_t>(shape.back()) : numel;
  if (method == MergeMethod::ModelStock) {
    const std::size_t groups = numel == 0 ? 0 : numel / stock_columns, pairs = models * (models - 1) / 2;
    stock_t.resize(groups);
    const double n = static_cast<double>(models);
    const auto t_of = [&](const std::vector<long double>& gram) {
      double cosine = 0;
      for (std::size_t a = 0; a < models; ++a) {
        for (std::size_t b = a + 1; b < models; ++b) {
          const long double norms =
              std::max(std::sqrt(gram[a * models + a]) * std::sqrt(gram[b * models + b]), 1e-6L);
          cosine += static_cast<double>(std::clamp(gram[a * models + b] / norms, -1.0L, 1.0L));
        }
      }
      cosine /= static_cast<double>(pairs);
      const double denominator = 1 + (n - 1) * cosine;
      if (std::abs(denominator) < 1e-9) {  // (at the pole, or so near it that t is rounding error)
        throw InvalidArgument("polyak::merge: tensor '" + name + "': model_stock's mean cosine " +
                              detail::number_text(cosine) + " makes 1 + (n - 1) cos " +
                              detail::number_text(denominator) + ", within 1e-9 of 0: t is undefined");
      }
      return n * cosine / denominator;
    };
    if (groups == 1) {
      stock_t[0] = t_of(whole_gram(true));
    } else if (groups > 1) {
      in_lanes([&](std::size_t l, std::size_t begin, std::size_t end) {
        ProductSums sums(models);
        std::vector<long double> gram;
        for (std::size_t g = (begin + stock_columns - 1) / stock_columns;
             g < groups && g * stock_columns < end; ++g) {
          range_gram(l, g * stock_columns, (g + 1) * stock_columns, true, sums, gram);
          stock_t[g] = t_of(gram);
        }
      });
    }
  }
  // Sce: the kept scalars (highest variance across the models) and each model's weight. Ranked by
  // the standard deviation, which orders as the variance does, computed on the task values divided
  // by their largest magnitude (no overflow), as rank_key (NaN above all).
  bool sce_all = true;  // else kept where sce_window holds the scalar's spread (work.keys)
  RankWindow sce_window;
  // Whether each scalar of a piece in `lane` is kept, into the lane's buffer (once for all the models).
  const auto sce_kept = [&](MergeLane& lane, std::size_t begin, std::size_t count) {
    unsigned char* mask = lane.kept.data();
    const RankWindow window = sce_window;  // (a local: stores to mask could alias it)
    const std::uint64_t* keys = work.keys.data() + begin;
    if (sce_all) {
      std::fill(mask, mask + count, static_cast<unsigned char>(1));
    } else {
      for (std::size_t j = 0; j < count; ++j) mask[j] = window.contains(keys[j], begin + j);
    }
    return static_cast<const unsigned char*>(mask);
  };
  if (method == MergeMethod::Sce) {
    std::vector<std::uint64_t>&spread = work.keys, &scratch = work.scratch;
    spread.resize(numel);
    work.key_counts.start(lane_count);  // (counted as they are written, for rank_window)
    // Each model's sum of squares over the kept scalars, a non-finite task value left out: in
    // double with compensated sums (product_sums.hpp), in long double where a model's lie beyond
    // the range those hold (F64 values). The task values kept are formed in the lane's buffers.
    // (The kept values go into the lane's pieces of the models, which tau may be.)
    const auto add_kept_squares = [&](MergeLane& lane, const double* const* tau, std::size_t at,
                                      std::size_t count, std::vector<const double*>& v, ProductSums& part) {
      const unsigned char* in_window = sce_kept(lane, at, count);
      for (std::size_t m = 0; m < models; ++m) {
        double* kept_m = lane.x[m].data();
        const double* tm = tau[m];
        for (std::size_t j = 0; j < count; ++j)
          kept_m[j] = kept_or_zero((in_window[j] != 0) & std::isfinite(tm[j]), tm[j]);
        v[m] = kept_m;
      }
      part.add_squares(v.data(), count);
    };
    // The spreads, and where every scalar is kept (select_topk 1, mergekit's default) the squares
    // too, in the same pass (in a pass of their own once the window is known, else).
    const bool every_scalar = !(o.select_topk < 1);
    struct SpreadPart {
      ProductSums squares;
      std::size_t nonzero;  // the scalars of nonzero spread
    };
    const SpreadPart first_pass = sum_in_spans(
        SpreadPart{ProductSums(models), 0},
        [&](std::size_t l, std::size_t span_begin, std::size_t span_end, SpreadPart& part) {
          std::vector<const double*> v(models);
          task_pieces(
              l, span_begin, span_end,
              [&](MergeLane& lane, const double* const* tau, std::size_t begin, std::size_t count) {
                // A model at a time over the piece (loops the compiler vectorizes), each scalar's operations
                // those of one scalar at a time, in the same order: the largest magnitude, then the mean and
                // the sum of squares of the task values divided by it. Lanes where they do not apply (NaN,
                // infinity, all zero) compute what is then not taken.
                double *largest = lane.elect.data(), *mean = lane.sum.data(), *square = lane.divisor.data();
                unsigned char* nan = lane.nan.data();
                std::fill(largest, largest + count, 0.0);
                std::fill(nan, nan + count, static_cast<unsigned char>(0));
                for (std::size_t m = 0; m < models; ++m) {
                  const double* tm = tau[m];
                  for (std::size_t j = 0; j < count; ++j) {
                    nan[j] |= static_cast<unsigned char>(std::isnan(tm[j]));
                    largest[j] = std::max(largest[j], std::abs(tm[j]));
                  }
                }
                std::fill(mean, mean + count, 0.0);
                std::fill(square, square + count, 0.0);
                for (std::size_t m = 0; m < models; ++m) {
                  const double* tm = tau[m];
                  for (std::size_t j = 0; j < count; ++j) mean[j] += tm[j] / largest[j];
                }
                for (std::size_t j = 0; j < count; ++j) mean[j] /= static_cast<double>(models);
                for (std::size_t m = 0; m < models; ++m) {
                  const double* tm = tau[m];
                  for (std::size_t j = 0; j < count; ++j) {
                    const double d = tm[j] / largest[j] - mean[j];
                    square[j] += d * d;
                  }
                }
                std::size_t nonzero_here = 0;
                for (std::size_t j = 0; j < count; ++j) {
                  const double deviation =
                      nan[j] != 0 || std::isinf(largest[j]) ? std::numeric_limits<double>::quiet_NaN()
                      : largest[j] > 0 ? largest[j] * std::sqrt(square[j] / static_cast<double>(models))
                                       : 0.0;
                  spread[begin + j] = rank_key(deviation);
                  nonzero_here += spread[begin + j] > 0;  // (a deviation is >= 0; NaN ranks above all)
                }
                std::size_t* counts = work.key_counts.lanes[l].data();
                for (std::size_t j = 0; j < count; ++j) ++counts[KeyCounts::bucket(spread[begin + j])];
                part.nonzero += nonzero_here;
                if (every_scalar) add_kept_squares(lane, tau, begin, count, v, part.squares);
              });
        },
        [](SpreadPart& total, const SpreadPart& part) {
          total.squares.add(part.squares);
          total.nonzero += part.nonzero;
        });
    const std::size_t nonzero = first_pass.nonzero;
    if (!every_scalar) {
      const auto k = static_cast<std::size_t>(std::floor(o.select_topk * static_cast<double>(nonzero)));
      sce_all = false;
      sce_window =
          rank_window(spread, numel - k, numel, scratch, lane_count, lane_span, in_lanes, &work.key_counts);
    }
    ProductSums sums = first_pass.squares;
    if (!every_scalar) {
      sums = sum_in_spans(
          ProductSums(models),
          [&](std::size_t l, std::size_t begin, std::size_t end, ProductSums& part) {
            std::vector<const double*> v(models);
            task_pieces(l, begin, end,
                        [&](MergeLane& lane, const double* const* tau, std::size_t at, std::size_t count) {
                          add_kept_squares(lane, tau, at, count, v, part);
                        });
          },
          [](ProductSums& total, const ProductSums& part) { total.add(part); });
    }
    std::vector<long double> squares(models);
    for (std::size_t m = 0; m < models; ++m) squares[m] = sums.at(m, m);
    if (!sums.in_range()) {
      squares = sum_in_spans(
          std::vector<long double>(models, 0.0L),
          [&](std::size_t l, std::size_t begin, std::size_t end, std::vector<long double>& part) {
            task_pieces(l, begin, end,
                        [&](MergeLane&, const double* const* tau, std::size_t at, std::size_t count) {
                          for (std::size_t j = 0; j < count; ++j) {
                            if (!sce_all && !sce_window.contains(spread[at + j], at + j)) continue;
                            for (std::size_t m = 0; m < models; ++m) {
                              const auto value = static_cast<long double>(tau[m][j]);
                              if (std::isfinite(value)) part[m] += value * value;
                            }
                          }
                        });
          },
          [](std::vector<long double>& total, const std::vector<long double>& part) {
            for (std::size_t m = 0; m < total.size(); ++m) total[m] += part[m];
          });
    }
    long double total = 0;
    for (long double& square : squares) total += (square /= static_cast<long double>(numel));
    for (std::size_t m = 0; m < models; ++m)
      w[m] = total > 0 ? static_cast<double>(squares[m] / total) : 1.0 / static_cast<double>(models);
  }

  // The merge, piece by piece.
  const bool normalize = o.normalize.value_or(normalizes_by_default(method));
  const bool consensus = uses_sign_consensus(method);
  double weight_sum = 0;  // the divisor of normalize without consensus
  for (const double v : w) weight_sum += v;
  if (std::abs(weight_sum) < 1e-8) weight_sum = 1;
  // TIES' sign consensus over a piece of `lane`, whose v holds each model's task values and elect
  // their sum: into sum, the values that agree with elect's sign (times the model's weight where
  // `weigh`, std::true_type or std::false_type: a loop each), into divisor those models' weights; each from
  // 0, a model at a time (adding 0 where one disagrees leaves a sum that is never -0 unchanged).
  const auto sum_agreeing = [&](MergeLane& lane, std::size_t count, auto weigh) {
    const double* elect = lane.elect.data();
    double *sum = lane.sum.data(), *divisor = lane.divisor.data();
    std::fill(sum, sum + count, 0.0);
    std::fill(divisor, divisor + count, 0.0);
    for (std::size_t m = 0; m < models; ++m) {
      const double* vm = lane.v.data() + m * piece;
      const double weight = w[m];
      for (std::size_t j = 0; j < count; ++j) {
        const bool agreeing = agrees(vm[j], elect[j] >= 0 ? 1.0 : -1.0);
        if constexpr (decltype(weigh)::value) {
          sum[j] += agreeing ? weight * vm[j] : 0.0;
        } else {
          sum[j] += agreeing ? vm[j] : 0.0;
        }
        divisor[j] += agreeing ? weight : 0.0;
      }
    }
  };
  // Merges scalars [begin, begin + count) of the piece in `lane` into result.
  const auto merge_piece_into = [&](MergeLane& lane, std::size_t begin, std::size_t count, double* result) {
    const std::vector<std::vector<double>>& xs = lane.x;
    const std::vector<double>& bs = lane.base;
    std::vector<double>& vs = lane.v;
    if (method == MergeMethod::Average || method == MergeMethod::Passthrough ||
        method == MergeMethod::Slerp || method == MergeMethod::TaskArithmetic) {
      // The linear methods a model at a time over the piece (loops the compiler vectorizes).
      const bool slerp = method == MergeMethod::Slerp, arithmetic = method == MergeMethod::TaskArithmetic;
      const double divisor = arithmetic && normalize ? weight_sum : 1.0;
      for (std::size_t m = 0; m < models; ++m) {
        const double weight = slerp ? (m == 0 ? s0 : s1) : arithmetic ? o.scale * w[m] / divisor : w[m];
        const double* xm = xs[m].data();
        const double* b = bs.data();
        if (m == 0) {  // (0 + the first term: the sum from 0, as before, without a pass to zero it)
          if (arithmetic) {
            for (std::size_t j = 0; j < count; ++j) result[j] = 0.0 + weight * (xm[j] - b[j]);
          } else {
            for (std::size_t j = 0; j < count; ++j) result[j] = 0.0 + weight * xm[j];
          }
        } else if (arithmetic) {
          for (std::size_t j = 0; j < count; ++j) result[j] += weight * (xm[j] - b[j]);
        } else {
          for (std::size_t j = 0; j < count; ++j) result[j] += weight * xm[j];
        }
      }
      if (arithmetic) {
        for (std::size_t j = 0; j < count; ++j) result[j] += bs[j];
      }
    } else if (is_task_vector_method(method)) {
      // A model at a time over the piece (loops the compiler vectorizes), each scalar's sums taken in
      // the order of one scalar at a time: elect = 0 + v_0 + v_1 + ..., then the agreeing terms from
      // 0 (adding 0 where one disagrees leaves a sum that is never -0 unchanged).
      double *elect = lane.elect.data(), *sum = lane.sum.data(), *divisor = lane.divisor.data();
      unsigned char* nan = lane.nan.data();
      std::fill(elect, elect + count, 0.0);
      std::fill(nan, nan + count, static_cast<unsigned char>(0));
      const double* b = bs.data();
      for (std::size_t m = 0; m < models; ++m) {
        double* vm = vs.data() + m * piece;
        const KeptScalars& k = kept[m];
        const double factor = w[m] * k.rescale;
        const auto task_values = [&](auto&& keep) {  // keep(tau, position)
          with_task_values(lane, m, begin, [&](auto&& tau_at) {
            for (std::size_t j = 0; j < count; ++j) {
              const double tau = tau_at(j);
              nan[j] |= static_cast<unsigned char>(std::isnan(tau));
              vm[j] = kept_or_zero(keep(tau, begin + j), factor * tau);
              elect[j] += vm[j];
            }
          });
        };
        if (k.drawn) {
          task_values([&k](double, std::size_t at) { return uniform_draw(k.key, at) >= k.drop; });
        } else if (k.ranked) {                 // (the key the rank rules gave this task value)
          const RankWindow window = k.window;  // (a local: stores to vm could alias it)
          task_values([&window](double tau, std::size_t at) { return window.contains(rank_key(tau), at); });
        } else if (k.bits.empty()) {
          task_values([](double, std::size_t) { return true; });
        } else {
          task_values([&k](double, std::size_t at) { return k.bit(at); });
        }
      }
      if (consensus) {
        sum_agreeing(lane, count, std::false_type{});  // (the values already weighted)
        for (std::size_t j = 0; j < count; ++j) {
          const double d =
              exactly_equal(divisor[j], 0.0) ? 1.0 : divisor[j];  // (mergekit's guard, exactly 0)
          const double merged = b[j] + o.scale * (normalize ? sum[j] / d : sum[j]);
          result[j] = nan[j] ? std::numeric_limits<double>::quiet_NaN() : merged;  // as arithmetic carries it
        }
      } else {
        for (std::size_t j = 0; j < count; ++j) {
          const double merged = b[j] + o.scale * (normalize ? elect[j] / weight_sum : elect[j]);
          result[j] = nan[j] ? std::numeric_limits<double>::quiet_NaN() : merged;
        }
      }
    } else if (method == MergeMethod::ModelStock) {
      const double n = static_cast<double>(models);
      for (std::size_t j = 0; j < count;) {  // (a run of a row's scalars at a time, as NuSlerp's)
        const std::size_t g = (begin + j) / stock_columns;
        const std::size_t stop = std::min(count, (g + 1) * stock_columns - begin);
        const double t = stock_t[g];
        for (; j < stop; ++j) {
          double mean = 0;
          for (std::size_t m = 0; m < models; ++m) mean += xs[m][j];
          result[j] = t * (mean / n) + (1 - t) * bs[j];
        }
      }
    } else if (spherical) {
      std::fill(result, result + count, 0.0);
      for (std::size_t m = 0; m < models; ++m) {
        const double* xm = xs[m].data();
        if (span_base) {
          for (std::size_t j = 0; j < count; ++j) result[j] += span[m] * (xm[j] - bs[j]);
        } else {
          for (std::size_t j = 0; j < count; ++j) result[j] += span[m] * xm[j];
        }
      }
      if (span_base) {
        for (std::size_t j = 0; j < count; ++j) result[j] += bs[j];
      }
    } else if (method == MergeMethod::NuSlerp) {
      // A run of scalars that share their group's coefficients at a time (the tensor, a row), not a
      // division a scalar for its group; columns (row-wise) are a group a scalar.
      const bool by_column = nu_groups > 1 && !o.nuslerp_flatten && o.nuslerp_row_wise;
      for (std::size_t j = 0; j < count;) {
        const std::size_t g = nu_group(begin + j);
        const std::size_t stop = by_column       ? j + 1
                                 : nu_groups > 1 ? std::min(count, (g + 1) * nu_inner - begin)
                                                 : count;
        const double first = nu_s0[g], second = nu_s1[g];
        for (; j < stop; ++j) {
          const double b = has_base ? bs[j] : 0.0;
          result[j] = b + first * (xs[0][j] - b) + second * (xs[1][j] - b);
        }
      }
    } else if (method == MergeMethod::NearSwap) {
      for (std::size_t j = 0; j < count; ++j) {
        double weight = o.t / std::abs(bs[j] - xs[0][j]);
        if (!std::isfinite(weight)) weight = 1;  // x = b (and NaN): the model's value
        weight = std::clamp(weight, 0.0, 1.0);
        result[j] = weight * xs[0][j] + (1 - weight) * bs[j];
      }
    } else {  // Sce, a model at a time over the piece as the task-vector methods above
      double *elect = lane.elect.data(), *sum = lane.sum.data(), *divisor = lane.divisor.data();
      unsigned char* nan = lane.nan.data();
      const double* b = bs.data();
      const unsigned char* in_window = sce_kept(lane, begin, count);
      std::fill(elect, elect + count, 0.0);
      std::fill(nan, nan + count, static_cast<unsigned char>(0));
      for (std::size_t m = 0; m < models; ++m) {
        double* vm = vs.data() + m * piece;
        with_task_values(lane, m, begin, [&](auto&& tau_at) {
          for (std::size_t j = 0; j < count; ++j) {
            const double tau = tau_at(j);
            nan[j] |= static_cast<unsigned char>(std::isnan(tau));
            vm[j] = kept_or_zero(in_window[j] != 0, tau);
            elect[j] += vm[j];
          }
        });
      }
      sum_agreeing(lane, count, std::true_type{});
      for (std::size_t j = 0; j < count; ++j) {
        const double d = exactly_equal(divisor[j], 0.0) ? 1.0 : divisor[j];  // (exactly zero)
        result[j] = nan[j] ? std::numeric_limits<double>::quiet_NaN() : b[j] + sum[j] / d;
      }
    }
  };
  // The pass in spans of merge_lane_span scalars: each lane (a thread) merges a span of its own,
  // reading through blocks of its own, rounds it to dtype and stores it. A scalar's arithmetic is the
  // same whichever thread does it: the bytes do not depend on the number of threads.
  const std::size_t out_element = dtype_size(dtype);
  in_lanes([&](std::size_t l, std::size_t begin, std::size_t end) {
    MergeLane& lane = lanes[l];
    for (std::size_t at = begin; at < end; at += merge_piece) {
      const std::size_t count = std::min(merge_piece, end - at);
      if (hold) {  // (the task values held: the base alone)
        read(l, models, at, count, lane.base.data());
      } else {
        read_lane(l, at, count);
      }
      double* result = lane.out.data();
      merge_piece_into(lane, at, count, result);
      check_range(lane.x, lane.base, result, count, [&] {
        if (hold) read_lane(l, at, count);
      });
      doubles_to_bytes(dtype, result, count, lane.out_bytes.data() + (at - begin) * out_element);
    }
    store(static_cast<const std::byte*>(lane.out_bytes.data()), begin, end - begin);
  });
}

/// Refuses (FormatError, naming it) a merge whose input was written over in place while it was
/// read (CheckpointReader::unchanged): called after the last tensor, before the output is kept.
inline void check_inputs_unchanged(const std::vector<CheckpointReader>& readers) {
  for (const auto& reader : readers) {
    if (!reader.unchanged()) {
      throw FormatError("polyak: '" + reader.path() +
                        "' was written over while the merge read it; nothing was written");
    }
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

/// One input of a streamed merge: a tensor of one of the readers.
struct StreamedInput {
  std::size_t reader = 0;                            ///< index into the readers
  const CheckpointReader::Tensor* tensor = nullptr;  ///< one of its tensors
};

/// The blocks a streamed merge reads into, kept from one tensor to the next: fresh ones cost a page
/// fault every 4 KiB (zeroed by the kernel, then by the vector), which on a virtual machine took half
/// the time of an average of two checkpoints.
struct MergeBuffers {
  std::vector<std::vector<std::vector<std::byte>>> inputs;  ///< one block an input, a set a lane
  MergeWorkspace work;                                      ///< the lanes' and whole-tensor passes' memory
};

/// Merges one tensor from `inputs` (the models' tensors, then the base's where there is one) and
/// writes it to `fd` (a file, at its offset, which it leaves past the tensor), rounded once to
/// `dtype`; each input is read in its own dtype. Reads go in blocks of 1 MiB, each input's block
/// kept, writes a lane's span at a time, the arithmetic in pieces of merge_piece: a system call a
/// block, not a piece, which is most of what a merge costs beyond its I/O. An integer tensor
/// (a counter) is the last model's, copied.
inline void write_merged_stream(std::vector<CheckpointReader>& readers,
                                const std::vector<StreamedInput>& inputs, std::size_t models,
                                const MergeOptions& options, const std::string& name, DType dtype, int fd,
                                const std::string& file, MergeBuffers& buffers) {
  const CheckpointReader::Tensor& first = *inputs.front().tensor;
  if (first.dtype == DType::I64) {
    const StreamedInput& last = inputs[models - 1];
    const StoredTensor copied = readers[last.reader].read(*last.tensor);
    write_all(fd, copied.bytes.data(), copied.bytes.size(), file);
    return;
  }
  const std::size_t numel = first.numel(), out_element = dtype_size(dtype);
  struct Cached {
    std::size_t begin = 0, count = 0;  // the elements in the input's block
  };
  // Each lane (thread) reads through blocks of its own; the readers, which open and close shards,
  // one thread at a time.
  const std::size_t lanes = merge_lanes(options, numel);
  std::vector<std::vector<Cached>> cache(lanes, std::vector<Cached>(inputs.size()));
  if (buffers.inputs.size() < lanes) buffers.inputs.resize(lanes);
  for (auto& blocks : buffers.inputs) {
    if (blocks.size() < inputs.size()) blocks.resize(inputs.size());
  }
  std::mutex reading;
  const TensorSource read = [&](std::size_t lane, std::size_t m, std::size_t begin, std::size_t count,
                                double* values) {
    const CheckpointReader::Tensor& in = *inputs[m].tensor;
    const std::size_t element = dtype_size(in.dtype);
    const std::size_t block = std::max(merge_piece, (std::size_t{1} << 20) / element);
    Cached& c = cache[lane][m];
    std::vector<std::byte>& bytes = buffers.inputs[lane][m];
    if (begin < c.begin || begin + count > c.begin + c.count) {
      c.begin = begin;
      c.count = std::min(block, numel - begin);
      if (bytes.size() < c.count * element) bytes.resize(c.count * element);
      const std::lock_guard<std::mutex> one_reader(reading);
      readers[inputs[m].reader].read_bytes(in, begin * element, c.count * element, bytes.data());
    }
    bytes_to_doubles(in.dtype, bytes.data() + (begin - c.begin) * element, count, values);
  };
  // Each lane writes its spans where they go in the file (pwrite), so that the kernel's copies into
  // the page cache run on every lane, beside the others' reading and arithmetic; the file offset is
  // then moved past the tensor, as a sequential write would have left it.
  const off_t start = ::lseek(fd, 0, SEEK_CUR);
  if (start < 0) fail_io("cannot find the write position in", file);
  const auto at = static_cast<std::uint64_t>(start);
  merge_tensor(
      options, models, name, first.shape, numel, dtype, inputs.size() > models, read,
      [&](const std::byte* bytes, std::size_t begin, std::size_t count) {
        pwrite_all(fd, bytes, count * out_element, at + begin * out_element, file);
      },
      buffers.work);
  if (::lseek(fd, static_cast<off_t>(at + numel * out_element), SEEK_SET) < 0)
    fail_io("cannot move the write position in", file);
}

/// Merges tensor `tensor` of `readers` (the models, then the base) into `fd`, in its dtype.
inline void write_merged_tensor(std::vector<CheckpointReader>& readers, const MergeOptions& options,
                                std::size_t models, const CheckpointReader::Tensor& tensor, int fd,
                                const std::string& file, MergeBuffers& buffers) {
  std::vector<StreamedInput> inputs;
  for (std::size_t r = 0; r < readers.size(); ++r) inputs.push_back({r, readers[r].find(tensor.name)});
  write_merged_stream(readers, inputs, models, options, tensor.name, tensor.dtype, fd, file, buffers);
}

}  // namespace detail

}  // namespace polyak
