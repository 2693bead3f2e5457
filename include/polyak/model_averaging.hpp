// SPDX-License-Identifier: MIT
// Model averaging across processes: average_parameters, PeriodicModelAverager (post-local SGD) and
// HierarchicalModelAverager (hierarchical SGD), as PyTorch's
// torch.distributed.algorithms.model_averaging has them.
//
// Every function here is collective over its communicator (see polyak/communicator.hpp): each
// member calls it at the same step with a parameter list of the same layout. Overlap (opt-in) makes
// the averagers start their averages without waiting and apply them `delay` steps later
// (PendingAverage says what the model then holds); it needs the communicator's iallreduce_sum.
#pragma once

#include <algorithm>  // std::min, std::max
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t, std::uint64_t
#include <cstring>    // std::memcpy: bf16's bits
#include <numeric>    // std::gcd: the gaps between a hierarchy's averaging steps
#include <stdexcept>  // std::invalid_argument
#include <string>     // std::char_traits: lengths of scalar type names
#include <type_traits>
#include <utility>  // std::pair
#include <vector>

#include "polyak/detail/counter.hpp"
#include "polyak/communicator.hpp"
#include "polyak/detail/agreement.hpp"
#include "polyak/detail/state_io_fwd.hpp"
#include "polyak/error.hpp"
#include "polyak/scalar_type.hpp"
#include "polyak/tensor_view.hpp"

namespace polyak {

namespace detail {

/// The type parameters travel in: double if any list is double, else float (16-bit ones go up to
/// float, as PyTorch's torch.cat up-casts, and come back rounded once).
template <class... Ts>
using wire_t = std::conditional_t<(std::is_same_v<accumulator_t<Ts>, double> || ...), double, float>;

/// Bytes reduced per allreduce call. Open MPI's allreduce of one 40 MB buffer took 120 ms on 2 ranks
/// here, in 1 MB pieces 13 ms (its temporary pages fault afresh on every large call); a 1 MB piece
/// also stays in the 2 MB L2 cache between the pass that scales (or packs) it and the collective
/// that reads it (benchmarks/bench_mpi.cpp).
inline constexpr std::size_t average_chunk_bytes = std::size_t{1} << 20;

/// Scalars of T into the wire type W, times `scale` (PyTorch divides before it sums).
template <class W, class T>
void to_wire(const T* in, W* out, std::size_t n, W scale) {
  if constexpr (std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<W, float>) {
    for (std::size_t i = 0; i < n; ++i) {  // widen()'s shift and the scaling in one vectorized pass:
      std::uint16_t low;                   // 14 us a 1 MB chunk here, where the two passes took 24
      std::memcpy(&low, in + i, sizeof low);
      const std::uint32_t bits = static_cast<std::uint32_t>(low) << 16;
      float value;
      std::memcpy(&value, &bits, sizeof value);
      out[i] = value * scale;
    }
  } else if constexpr (std::is_same_v<accumulator_t<T>, W> && !std::is_same_v<T, W>) {
    widen(in, out, n);
    for (std::size_t i = 0; i < n; ++i) out[i] *= scale;
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<W>(in[i]) * scale;
  }
}

/// Wire scalars back into T, rounded once.
template <class T, class W>
void from_wire(const W* in, T* out, std::size_t n) {
  if constexpr (std::is_same_v<accumulator_t<T>, W>) {
    narrow(in, out, n);
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
  }
}

/// One chunk of the concatenated lists on its way to one allreduce call: its pieces (a tensor's
/// scalars each) and, where they are not one run of wire scalars in memory, the buffer they are
/// packed into. One per thread and wire type, reused: a step allocates nothing once one has run.
template <class W>
class Chunk {
 public:
  static Chunk& for_this_thread() {
    thread_local Chunk chunk;
    return chunk;
  }

  void clear() noexcept {
    pieces_.clear();
    scalars_ = 0;
  }
  std::size_t scalars() const noexcept { return scalars_; }

  template <class T>
  void add(T* data, std::size_t n) {
    pieces_.push_back(
        {data, n, std::is_same_v<T, W>,
         [](const void* in, W* out, std::size_t count, W scale) {
           to_wire(static_cast<const T*>(in), out, count, scale);
         },
         [](const W* in, void* out, std::size_t count) { from_wire(in, static_cast<T*>(out), count); }});
    scalars_ += n;
  }

  /// Divides the chunk's scalars by the group size (times `scale`) and sums them over the group: in
  /// place where they are one run of wire scalars in memory (a large tensor, or tensors allocated
  /// one after another), else packed, reduced and unpacked. Every member reduces the same number of
  /// scalars, whichever way it holds them. Leaves the chunk empty.
  template <class Comm>
  void reduce(Comm& comm, W scale) {
    bool one_run = true;
    for (std::size_t k = 0; k < pieces_.size() && one_run; ++k) {
      one_run = pieces_[k].wire_type &&
                (k == 0 || static_cast<W*>(pieces_[k - 1].data) + pieces_[k - 1].n == pieces_[k].data);
    }
    if (one_run && !pieces_.empty()) {
      W* data = static_cast<W*>(pieces_.front().data);
      ArrayMap<W>(data, static_cast<Eigen::Index>(scalars_)) *= scale;
      comm.allreduce_sum(data, scalars_);
    } else if (scalars_ > 0) {
      if (packed_.size() < scalars_) packed_.resize(std::max(scalars_, average_chunk_bytes / sizeof(W)));
      std::size_t at = 0;
      for (const Piece& piece : pieces_) {
        piece.pack(piece.data, packed_.data() + at, piece.n, scale);
        at += piece.n;
      }
      comm.allreduce_sum(packed_.data(), scalars_);
      at = 0;
      for (const Piece& piece : pieces_) {
        piece.unpack(packed_.data() + at, piece.data, piece.n);
        at += piece.n;
      }
    }
    clear();
  }

 private:
  struct Piece {
    void* data;
    std::size_t n;
    bool wire_type;
    void (*pack)(const void* in, W* out, std::size_t n, W scale);
    void (*unpack)(const W* in, void* out, std::size_t n);
  };
  std::vector<Piece> pieces_;
  std::vector<W> packed_;
  std::size_t scalars_ = 0;
};

/// PyTorch's average_parameters: every tensor divided by the group size, summed over the group. The
/// lists' scalars, concatenated, are cut into chunks of average_chunk_bytes, one allreduce call a
/// chunk, as the bare collective of the same bytes would make them. A chunk that lies in one run of
/// wire scalars is scaled and reduced in place (no copy; the scaling pass leaves it in cache for the
/// collective); others (spanning tensors allocated apart, or bf16, fp16, float on a double wire) are
/// packed, the division folded into the packing. It multiplies by 1 / size where PyTorch divides by
/// size (a division pass cost 15% here): the same bits for groups of 2, 4, 8...; within one
/// rounding otherwise.
template <class Comm, class... Ts>
void average_lists(Comm& comm, const char* where, const ParameterList<Ts>&... lists) {
  static_assert(is_communicator_v<Comm>,
                "polyak: the communicator needs rank(), size(), allreduce_sum(T*, n) and split(color, key)");
  using W = wire_t<Ts...>;
  check_same_layout(comm, where, std::string(), lists...);
  constexpr std::size_t chunk_scalars = average_chunk_bytes / sizeof(W);
  const W scale = W(1) / static_cast<W>(comm.size());
  Chunk<W>& chunk = Chunk<W>::for_this_thread();
  chunk.clear();
  const auto cut = [&](const auto& list) {
    for (const auto& tensor : list) {
      for (std::size_t from = 0; from < tensor.numel();) {
        const std::size_t length = std::min(chunk_scalars - chunk.scalars(), tensor.numel() - from);
        chunk.add(tensor.data() + from, length);
        from += length;
        if (chunk.scalars() == chunk_scalars) chunk.reduce(comm, scale);
      }
    }
  };
  (cut(lists), ...);
  chunk.reduce(comm, scale);
}

/// What an incomplete request is where the communicator has no iallreduce_sum: averaging without
/// Overlap never makes one.
struct NoRequest {
  void wait() {}
  bool test() { return true; }
};

template <class Comm, class W, class = void>
struct request_of {
  using type = NoRequest;
};
template <class Comm, class W>
struct request_of<
    Comm, W, std::void_t<decltype(std::declval<Comm&>().iallreduce_sum(std::declval<W*>(), std::size_t{}))>> {
  using type = decltype(std::declval<Comm&>().iallreduce_sum(std::declval<W*>(), std::size_t{}));
};

}  // namespace detail

/// Opt-in overlap of averaging with training, for PeriodicModelAverager and
/// HierarchicalModelAverager: the average an averaging step starts is applied `delay` steps later
/// (1 <= delay <= the smallest period), while training goes on. See PendingAverage for what the
/// model then holds.
struct Overlap {
  std::int64_t delay = 1;
};

/// An average in flight: start_average_parameters (or an averager given Overlap) took a snapshot x_s
/// of this member's parameters and started a non-blocking allreduce of x_s / size; training goes on
/// meanwhile. finish() waits for it and applies it, keeping this member's own updates since the
/// snapshot:
///     x  <-  mean over the group of x_s  +  (x - x_s)
/// so the members agree on the averaged part and each keeps its own progress (with no progress,
/// x == x_s, the model holds the mean exactly). It costs two copies of the parameters in the wire
/// type (float, or double), kept for the next average: no allocation once one has run.
///
/// finish() needs lists of the layout the snapshot was taken of, whose storage has not moved; it
/// refuses others, and changes nothing. It involves no other member: each finishes on its own.
/// Destroying or assigning over a PendingAverage in flight waits for its collective to complete and
/// discards the average (the buffers it writes into live until then).
template <class Comm, class W>
class PendingAverage {
 public:
  using Request = typename detail::request_of<Comm, W>::type;

  /// Nothing in flight.
  PendingAverage() = default;
  PendingAverage(PendingAverage&& other) noexcept  // (the buffers move with their addresses)
      : snapshot_(std::move(other.snapshot_)),
        mean_(std::move(other.mean_)),
        layout_(other.layout_),
        pending_(std::exchange(other.pending_, false)),
        request_(std::move(other.request_)) {}
  PendingAverage& operator=(PendingAverage&& other) noexcept {
    if (this != &other) {
      request_ = std::move(other.request_);    // first: waits for this one's collective, which writes
      snapshot_ = std::move(other.snapshot_);  // into mean_ until it completes
      mean_ = std::move(other.mean_);
      layout_ = other.layout_;
      pending_ = std::exchange(other.pending_, false);
    }
    return *this;
  }
  ~PendingAverage() = default;  // (request_, declared last, is destroyed first: it waits)

  /// Whether an average is in flight (started and not finished).
  bool pending() const noexcept { return pending_; }

  /// True when nothing is in flight or its reduction is complete; drives the communicator's progress
  /// (MPI makes progress only inside MPI calls: call it now and then while computing).
  bool test() { return !pending_ || request_.test(); }

  /// Collective: checks the layout (as average_parameters does) and starts the average of `lists`.
  /// Refused on every member (InvalidArgument, nothing started) while an average is in flight on any.
  template <class... Ts>
  void start(Comm& comm, const ParameterList<Ts>&... lists) {
    static_assert(has_iallreduce_v<Comm>,
                  "polyak: overlapped averaging needs the communicator's non-blocking iallreduce_sum(T*, n) "
                  "(see polyak/communicator.hpp)");
    static_assert(std::is_same_v<detail::wire_t<Ts...>, W>,
                  "polyak::PendingAverage: lists of another wire type");
    detail::check_same_layout(comm, "PendingAverage::start", pending_ ? in_flight_refusal : std::string(),
                              lists...);
    launch(comm, lists...);
  }

  /// Waits for the average in flight, if any, and applies it to `lists` (see above).
  template <class... Ts>
  void finish(const ParameterList<Ts>&... lists) {
    const std::string problem = finish_problem(lists...);
    if (!problem.empty()) throw InvalidArgument("polyak::PendingAverage::finish: " + problem);
    apply(lists...);
  }

 private:
  template <class C>
  friend class ModelAverager;

  static constexpr const char* in_flight_refusal =
      "an average is still in flight: finish it before starting the next";

  /// Why finish(lists) would refuse: "" when it can apply.
  template <class... Ts>
  std::string finish_problem(const ParameterList<Ts>&... lists) const {
    if (!pending_) return {};
    if (!std::is_same_v<detail::wire_t<Ts...>, W> || detail::layout_hash(lists...) != layout_ ||
        (std::size_t{0} + ... + lists.numel()) != snapshot_.size()) {
      return "the lists to apply the average to are not laid out as those it started from (names, scalar "
             "types, shapes, in order), so nothing changed";
    }
    std::string stale;
    const auto check_storage = [&](const auto& list) {
      try {
        if (stale.empty()) list.check_storage("");
      } catch (const std::invalid_argument& e) {
        stale = std::string(e.what()).substr(2) + ", so nothing changed";  // (without check_storage's ": ")
      }
    };
    (check_storage(lists), ...);
    return stale;
  }

  /// Snapshot and non-blocking sum of lists the members agreed on (check_same_layout).
  template <class... Ts>
  void launch(Comm& comm, const ParameterList<Ts>&... lists) {
    layout_ = detail::layout_hash(lists...);
    const std::size_t scalars = (std::size_t{0} + ... + lists.numel());
    snapshot_.resize(scalars);
    mean_.resize(scalars);
    std::size_t at = 0;
    const auto take = [&](const auto& list) {
      for (const auto& tensor : list) {
        detail::to_wire(tensor.data(), snapshot_.data() + at, tensor.numel(), W(1));
        at += tensor.numel();
      }
    };
    (take(lists), ...);
    const W scale = W(1) / static_cast<W>(comm.size());
    for (std::size_t i = 0; i < scalars; ++i) mean_[i] = snapshot_[i] * scale;
    request_ = comm.iallreduce_sum(mean_.data(), scalars);
    pending_ = true;
  }

  /// Waits and applies, where finish_problem found nothing.
  template <class... Ts>
  void apply(const ParameterList<Ts>&... lists) {
    if (!pending_) return;
    request_.wait();
    pending_ = false;
    if constexpr (std::is_same_v<detail::wire_t<Ts...>, W>) {
      constexpr std::size_t block = 1024;  // one block of wire scalars on the stack at a time
      W updated[block];
      std::size_t at = 0;
      const auto apply_to = [&](const auto& list) {
        for (const auto& tensor : list) {
          for (std::size_t from = 0; from < tensor.numel(); from += block) {
            const std::size_t n = std::min(block, tensor.numel() - from);
            detail::to_wire(tensor.data() + from, updated, n, W(1));
            for (std::size_t i = 0; i < n; ++i) updated[i] = mean_[at + i] + (updated[i] - snapshot_[at + i]);
            detail::from_wire(updated, tensor.data() + from, n);
            at += n;
          }
        }
      };
      (apply_to(lists), ...);
    }
  }

  std::vector<W> snapshot_, mean_;
  std::uint64_t layout_ = 0;
  bool pending_ = false;
  Request request_{};  // last: destroyed first, waiting for the collective that writes into mean_
};

/// Starts the average of `params` over `comm` without waiting for it (collective, as
/// average_parameters); apply it with finish(params) at a later step. See PendingAverage.
template <class T, class Comm>
PendingAverage<Comm, detail::wire_t<T>> start_average_parameters(const ParameterList<T>& params, Comm& comm) {
  PendingAverage<Comm, detail::wire_t<T>> pending;
  pending.start(comm, params);
  return pending;
}

/// Replaces every tensor of `params` by its mean over the members of `comm` (PyTorch's
/// torch.distributed.algorithms.model_averaging.utils.average_parameters): divided by the group size
/// first as PyTorch divides, then summed over the group, large tensors in place and small ones packed
/// together (see detail::average_lists). Members whose lists differ
/// in tensor count, sizes or scalar types all get std::invalid_argument, and nothing changes.
template <class T, class Comm>
void average_parameters(const ParameterList<T>& params, Comm& comm) {
  detail::average_lists(comm, "average_parameters", params);
}

/// What the averagers share (PyTorch's ModelAverager): the group and the step counter.
template <class Comm>
class ModelAverager {
  static_assert(is_communicator_v<Comm>,
                "polyak: the communicator needs rank(), size(), allreduce_sum(T*, n) and split(color, key)");

 public:
  explicit ModelAverager(Comm comm) : comm_(std::move(comm)) {}

  /// How many times average_parameters has been called (PyTorch's `step` attribute).
  std::int64_t step() const noexcept { return step_; }

  const Comm& communicator() const noexcept { return comm_; }

  /// The overlap the averager was made with; a delay of 0 means it averages blocking.
  std::int64_t overlap_delay() const noexcept { return delay_; }

  /// Whether an overlapped average is in flight.
  bool in_flight() const noexcept { return float_.pending() || double_.pending(); }

  /// Applies the overlapped average in flight, if any, now rather than at its step (before an
  /// evaluation, a checkpoint or the end of training): the model then holds what PendingAverage
  /// describes. Not collective.
  template <class... Ts>
  void synchronize(const ParameterList<Ts>&... lists) {
    const std::string problem = wire_type_problem<detail::wire_t<Ts...>>();
    if (!problem.empty()) throw InvalidArgument("polyak::ModelAverager::synchronize: " + problem);
    pending<detail::wire_t<Ts...>>().finish(lists...);
  }

 protected:
  ModelAverager(Comm comm, Overlap overlap, std::int64_t largest_delay, const char* who)
      : comm_(std::move(comm)), delay_(overlap.delay) {
    static_assert(has_iallreduce_v<Comm>,
                  "polyak: Overlap needs the communicator's non-blocking iallreduce_sum(T*, n) "
                  "(see polyak/communicator.hpp)");
    if (overlap.delay < 1 || overlap.delay > largest_delay) {
      throw InvalidArgument(std::string("polyak::") + who + ": the overlap delay must be in [1, " +
                            std::to_string(largest_delay) +
                            "] (an average must land before the next one starts), got " +
                            std::to_string(overlap.delay));
    }
  }

  /// Refuses (before anything changes) the step that would overflow the step counter.
  void check_step(const char* where) const { detail::check_can_count(step_, "step", "polyak::", where); }

  /// One step's overlapped work: applies the average in flight once `delay` steps have passed since
  /// it started (else drives its progress), then, if `start_group` is given, starts this step's on
  /// it. Whether a step lands or starts follows from the step counter alone, the same on every
  /// member (not from whether this member's average is still in flight: synchronize() may have
  /// landed it early on one member only). At such a step, every decision is agreed over the whole
  /// group first: the layout of the lists and each member's local problems (lists that moved or
  /// changed, another scalar type, an average still in flight), so that all refuse alike and nothing
  /// changes, or all go on; a subgroup cannot agree for the members it does not hold (groups of a
  /// hierarchy need not nest, and a group of one has no one to disagree with). A step that neither
  /// lands nor starts involves no other member and refuses nothing: a problem there is refused,
  /// agreed, at the next step that does.
  template <class... Ts>
  void overlapped_step(Comm* start_group, const char* where, const ParameterList<Ts>&... lists) {
    using W = detail::wire_t<Ts...>;
    PendingAverage<Comm, W>& average = pending<W>();
    const bool lands = landing_due_ && step_ - started_at_ >= delay_;
    if (!lands && start_group == nullptr) {
      float_.test();  // (progress for MPI, which moves data only inside its calls)
      double_.test();
      return;
    }
    std::string problem = wire_type_problem<W>();
    if (problem.empty()) problem = average.finish_problem(lists...);
    if (problem.empty() && start_group != nullptr && !lands && landing_due_)
      problem = PendingAverage<Comm, W>::in_flight_refusal;
    detail::check_same_layout(comm_, where, problem, lists...);  // the whole group: all go on, or none
    average.apply(lists...);
    landing_due_ = false;
    if (start_group != nullptr) {
      average.launch(*start_group, lists...);
      started_at_ = step_;
      landing_due_ = true;
    }
  }

  Comm comm_;
  std::int64_t step_ = 0;
  std::int64_t delay_ = 0;  // 0: blocking

 private:
  template <class W>
  PendingAverage<Comm, W>& pending() {
    if constexpr (std::is_same_v<W, float>) {
      return float_;
    } else {
      return double_;
    }
  }
  /// The lists of an average in flight and those of this call must travel as the same type.
  template <class W>
  std::string wire_type_problem() const {
    if ((std::is_same_v<W, float> ? double_.pending() : float_.pending())) {
      return "the overlapped average in flight was started from lists of another scalar type; pass the same "
             "lists every step";
    }
    return {};
  }

  PendingAverage<Comm, float> float_;
  PendingAverage<Comm, double> double_;
  std::int64_t started_at_ = 0;
  bool landing_due_ = false;  // an average started and its landing step has not come yet
};

/// Averages the parameters over the whole group every `period` steps once `warmup_steps` steps have
/// passed: post-local SGD (PyTorch's PeriodicModelAverager). Call average_parameters after every
/// optimizer step; it averages when step >= warmup_steps and (step - warmup_steps) % period == 0,
/// then counts the step.
template <class Comm>
class PeriodicModelAverager : public ModelAverager<Comm> {
 public:
  /// Refused: period < 1, warmup_steps < 0.
  PeriodicModelAverager(std::int64_t period, std::int64_t warmup_steps, Comm comm)
      : ModelAverager<Comm>(std::move(comm)), period_(period), warmup_steps_(warmup_steps) {
    check_settings(period, warmup_steps);
  }

  /// Overlapped: each averaging step starts the average and the step `overlap.delay` later applies
  /// it (see PendingAverage); average_parameters returns true at the steps that start one. Refused
  /// also: a delay outside [1, period]. Needs the communicator's iallreduce_sum.
  PeriodicModelAverager(std::int64_t period, std::int64_t warmup_steps, Comm comm, Overlap overlap)
      : ModelAverager<Comm>((check_settings(period, warmup_steps), std::move(comm)), overlap, period,
                            "PeriodicModelAverager"),
        period_(period),
        warmup_steps_(warmup_steps) {}

  /// One step: averages `lists` (one or more ParameterLists, of any scalar types) if this step is an
  /// averaging one; returns whether it was. Overlapped, it first applies the average in flight if
  /// its delay has passed, and then starts this step's.
  template <class... Ts>
  bool average_parameters(const ParameterList<Ts>&... lists) {
    constexpr const char* where = "PeriodicModelAverager::average_parameters";
    this->check_step(where);
    const bool now = this->step_ >= warmup_steps_ && (this->step_ - warmup_steps_) % period_ == 0;
    if (this->delay_ > 0) {
      this->overlapped_step(now ? &this->comm_ : nullptr, where, lists...);
    } else if (now) {
      detail::average_lists(this->comm_, where, lists...);
    }
    ++this->step_;
    return now;
  }

  std::int64_t period() const noexcept { return period_; }
  std::int64_t warmup_steps() const noexcept { return warmup_steps_; }

  /// Checkpoints: the step count and settings; defined by the checkpoint layer: see
  /// StateIO<PeriodicModelAverager> in polyak/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(PeriodicModelAverager);

 private:
  static void check_settings(std::int64_t period, std::int64_t warmup_steps) {
    if (period < 1) {
      throw InvalidArgument("polyak::PeriodicModelAverager: period must be >= 1, got " +
                            std::to_string(period));
    }
    if (warmup_steps < 0) {
      throw InvalidArgument("polyak::PeriodicModelAverager: warmup_steps must be >= 0, got " +
                            std::to_string(warmup_steps));
    }
  }

  std::int64_t period_, warmup_steps_;
};

/// Averages over groups of different sizes with different periods: hierarchical SGD (PyTorch's
/// HierarchicalModelAverager). `period_group_sizes` maps a period to a group size, in order, e.g.
/// {{4, 2}, {16, world}}: every 4 steps each pair of consecutive ranks averages, every 16 steps the
/// whole world. At a step >= warmup_steps, the largest period that divides the step picks the group.
///
/// Refused, as PyTorch refuses them or they make no hierarchy: no entries, a period < 1, periods not
/// increasing, group sizes not increasing or not dividing the group's size, a last group size other
/// than the whole group's, warmup_steps < 0. Construction is collective (it splits the group).
template <class Comm>
class HierarchicalModelAverager : public ModelAverager<Comm> {
 public:
  HierarchicalModelAverager(const std::vector<std::pair<std::int64_t, int>>& period_group_sizes,
                            std::int64_t warmup_steps, Comm comm)
      : ModelAverager<Comm>((check_settings(period_group_sizes, warmup_steps, comm.size()), std::move(comm))),
        warmup_steps_(warmup_steps) {
    make_levels(period_group_sizes);
  }

  /// Overlapped (see PendingAverage and PeriodicModelAverager's overlapped form): refused also, a
  /// delay outside [1, the shortest gap between two averaging steps], which is the smallest period or
  /// the smallest greatest common divisor of two periods ({2, 3} average at steps 2, 3, 4, 6: delay 1).
  /// Needs the communicator's iallreduce_sum.
  HierarchicalModelAverager(const std::vector<std::pair<std::int64_t, int>>& period_group_sizes,
                            std::int64_t warmup_steps, Comm comm, Overlap overlap)
      : ModelAverager<Comm>((check_settings(period_group_sizes, warmup_steps, comm.size()), std::move(comm)),
                            overlap, shortest_gap(period_group_sizes), "HierarchicalModelAverager"),
        warmup_steps_(warmup_steps) {
    make_levels(period_group_sizes);
  }

  /// One step: averages `lists` within the group of the largest period dividing this step (if this
  /// step is past the warm-up and any period divides it); returns that period, or 0. Overlapped, it
  /// first applies the average in flight if its delay has passed, then starts this step's.
  template <class... Ts>
  std::int64_t average_parameters(const ParameterList<Ts>&... lists) {
    constexpr const char* where = "HierarchicalModelAverager::average_parameters";
    this->check_step(where);
    std::int64_t used = 0;
    Comm* group = nullptr;
    if (this->step_ >= warmup_steps_) {
      for (std::size_t k = levels_.size(); k-- > 0;) {
        if (this->step_ % levels_[k].first == 0) {
          group = &levels_[k].second;
          used = levels_[k].first;
          break;
        }
      }
    }
    if (this->delay_ > 0) {
      this->overlapped_step(group, where, lists...);
    } else if (group != nullptr) {
      detail::average_lists(*group, where, lists...);
    }
    ++this->step_;
    return used;
  }

  std::int64_t warmup_steps() const noexcept { return warmup_steps_; }

  /// Checkpoints: the step count and settings; defined by the checkpoint layer: see
  /// StateIO<HierarchicalModelAverager> in polyak/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(HierarchicalModelAverager);

 private:
  static void check_settings(const std::vector<std::pair<std::int64_t, int>>& period_group_sizes,
                             std::int64_t warmup_steps, int world) {
    auto refuse = [](const std::string& why) {
      throw InvalidArgument("polyak::HierarchicalModelAverager: " + why);
    };
    if (period_group_sizes.empty()) refuse("period_group_sizes must not be empty");
    for (std::size_t i = 0; i < period_group_sizes.size(); ++i) {
      const auto [period, group_size] = period_group_sizes[i];
      if (period < 1) refuse("period " + std::to_string(period) + " must be >= 1");
      if (group_size < 1 || world % group_size != 0) {
        refuse("group size " + std::to_string(group_size) + " does not divide the group's size " +
               std::to_string(world));
      }
      if (i > 0 && period <= period_group_sizes[i - 1].first) refuse("periods must increase");
      if (i > 0 && group_size <= period_group_sizes[i - 1].second) refuse("group sizes must increase");
    }
    if (period_group_sizes.back().second != world) {
      refuse("the last group size, " + std::to_string(period_group_sizes.back().second) +
             ", must be the whole group's size, " + std::to_string(world));
    }
    if (warmup_steps < 0) refuse("warmup_steps must be >= 0, got " + std::to_string(warmup_steps));
  }

  /// The shortest gap between two averaging steps past the warm-up: the first period (they
  /// increase), or a smaller greatest common divisor of two periods (Bezout: multiples of p and q come
  /// gcd(p, q) apart); 1 for no entries, which check_settings refuses.
  static std::int64_t shortest_gap(const std::vector<std::pair<std::int64_t, int>>& period_group_sizes) {
    for (const auto& entry : period_group_sizes) {
      if (entry.first < 1) return 1;  // (refused by check_settings)
    }
    if (period_group_sizes.empty()) return 1;
    std::int64_t gap = period_group_sizes.front().first;
    for (std::size_t i = 0; i < period_group_sizes.size(); ++i) {
      for (std::size_t j = i + 1; j < period_group_sizes.size(); ++j)
        gap = std::min(gap, std::gcd(period_group_sizes[i].first, period_group_sizes[j].first));
    }
    return gap;
  }

  /// Collective: consecutive ranks form each subgroup, as torch.distributed.new_subgroups makes them.
  void make_levels(const std::vector<std::pair<std::int64_t, int>>& period_group_sizes) {
    const int world = this->comm_.size(), rank = this->comm_.rank();
    for (const auto& [period, group_size] : period_group_sizes) {
      levels_.push_back(
          {period, group_size == world ? this->comm_ : this->comm_.split(rank / group_size, rank)});
    }
  }

  std::int64_t warmup_steps_;
  std::vector<std::pair<std::int64_t, Comm>> levels_;  // period -> its group, by increasing period
};

}  // namespace polyak
