// SPDX-License-Identifier: MIT
// Model averaging across processes: average_parameters, PeriodicModelAverager (post-local SGD) and
// HierarchicalModelAverager (hierarchical SGD), as PyTorch's
// torch.distributed.algorithms.model_averaging has them.
//
// Every function here is collective over its communicator (see polyak/core/communicator.hpp): each
// member calls it at the same step with a parameter list of the same layout. Overlap (opt-in) makes
// the averagers start their averages without waiting and apply them `delay` steps later
// (PendingAverage says what the model then holds); it needs the communicator's iallreduce_sum.
#pragma once

#include <algorithm>  // std::min
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t
#include <numeric>    // std::gcd: the gaps between a hierarchy's averaging steps
#include <string>
#include <type_traits>
#include <utility>  // std::pair
#include <vector>

#include "polyak/core/communicator.hpp"
#include "polyak/core/detail/agreement.hpp"
#include "polyak/core/detail/counter.hpp"
#include "polyak/core/detail/state_io_fwd.hpp"
#include "polyak/core/detail/wire.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/overlap.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {

/// Replaces every tensor of `params` by its mean over the members of `comm` (PyTorch's
/// torch.distributed.algorithms.model_averaging.utils.average_parameters), with PyTorch's bits for
/// any group size: each scalar divided by the group size, then summed over the group in the
/// communicator's order (docs/distributed.md says how it gets there fast; detail::average_lists).
/// Members whose lists differ in tensor count, sizes or scalar types all get std::invalid_argument,
/// and nothing changes. The bits need IEEE arithmetic: code built with -ffast-math may divide by
/// multiplying by 1 / size, and over MPI a rank that flushes subnormals sums in its own mode.
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
  /// An averager over the group `comm`, averaging blocking.
  explicit ModelAverager(Comm comm) : comm_(std::move(comm)) {}

  /// How many times average_parameters has been called (PyTorch's `step` attribute).
  std::int64_t step() const noexcept { return step_; }

  /// The whole group.
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
  /// An overlapped averager: refuses a delay outside [1, largest_delay] (naming `who`).
  ModelAverager(Comm comm, Overlap overlap, std::int64_t largest_delay, const char* who)
      : comm_(std::move(comm)), delay_(overlap.delay) {
    static_assert(has_iallreduce_v<Comm>,
                  "polyak: Overlap needs the communicator's non-blocking iallreduce_sum(T*, n) "
                  "(see polyak/core/communicator.hpp)");
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
    if constexpr (has_iallreduce_v<Comm>) {  // (delay_ > 0 needs it: see the Overlap constructor)
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
  }

  Comm comm_;               ///< the whole group
  std::int64_t step_ = 0;   ///< how many steps were counted
  std::int64_t delay_ = 0;  ///< the overlap delay; 0: blocking

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

  /// Every how many steps it averages.
  std::int64_t period() const noexcept { return period_; }
  /// How many steps pass before the first average.
  std::int64_t warmup_steps() const noexcept { return warmup_steps_; }

  ///@{
  /// Checkpoints: the step count and settings; defined by the checkpoint layer: see
  /// StateIO<PeriodicModelAverager> in polyak/checkpoint/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(PeriodicModelAverager);
  ///@}

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
  /// Blocking: averages within the group of the largest period that divides the step (see above).
  /// Collective (it splits the group).
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

  /// How many steps pass before the first average.
  std::int64_t warmup_steps() const noexcept { return warmup_steps_; }

  ///@{
  /// Checkpoints: the step count and settings; defined by the checkpoint layer: see
  /// StateIO<HierarchicalModelAverager> in polyak/checkpoint/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(HierarchicalModelAverager);
  ///@}

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
