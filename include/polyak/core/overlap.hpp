// SPDX-License-Identifier: MIT
// Averaging that overlaps training: Overlap (the averagers' opt-in), PendingAverage (an average in
// flight on the communicator's non-blocking iallreduce_sum, applied later) and
// start_average_parameters. The averagers that use them are in model_averaging.hpp.
#pragma once

#include <algorithm>  // std::min
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t, std::uint64_t
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::move, std::exchange
#include <vector>

#include "polyak/core/communicator.hpp"
#include "polyak/core/detail/agreement.hpp"
#include "polyak/core/detail/wire.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {

template <class Comm>
class ModelAverager;

/// Opt-in overlap of averaging with training, for PeriodicModelAverager and
/// HierarchicalModelAverager: the average an averaging step starts is applied `delay` steps later
/// (1 <= delay <= the smallest period), while training goes on. See PendingAverage for what the
/// model then holds.
struct Overlap {
  std::int64_t delay = 1;  ///< steps between an average's start and the step that applies it
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
  /// The communicator's request of a non-blocking sum.
  using Request = typename detail::request_of<Comm, W>::type;

  /// Nothing in flight.
  PendingAverage() = default;
  /// Movable, in flight too (the buffers keep their addresses); the source is then not pending.
  PendingAverage(PendingAverage&& other) noexcept  // (the buffers move with their addresses)
      : snapshot_(std::move(other.snapshot_)),
        mean_(std::move(other.mean_)),
        layout_(other.layout_),
        pending_(std::exchange(other.pending_, false)),
        request_(std::move(other.request_)) {}
  /// Waits for this one's collective to complete (and discards its average), then takes `other`'s.
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
                  "(see polyak/core/communicator.hpp)");
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
    ((stale = stale.empty() ? lists.stale_view() : stale), ...);
    return stale.empty() ? stale : stale + ", so nothing changed";
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
        detail::to_wire(tensor.data(), snapshot_.data() + at, tensor.numel());
        at += tensor.numel();
      }
    };
    (take(lists), ...);
    detail::to_wire(snapshot_.data(), mean_.data(), scalars, detail::GroupDivisor<W>(comm.size()));
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
            detail::to_wire(tensor.data() + from, updated, n);
            for (std::size_t i = 0; i < n; ++i) {  // unchanged: the mean exactly (inf - inf is NaN)
              const W mine = updated[i], taken = snapshot_[at + i];
              updated[i] = mine == taken ? mean_[at + i] : mean_[at + i] + (mine - taken);
            }
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

}  // namespace polyak
