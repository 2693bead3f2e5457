// SPDX-License-Identifier: MIT
// Model averaging across processes: average_parameters, PeriodicModelAverager (post-local SGD) and
// HierarchicalModelAverager (hierarchical SGD), as PyTorch's
// torch.distributed.algorithms.model_averaging has them.
//
// Every function here is collective over its communicator (see polyak/communicator.hpp): each
// member calls it at the same step with a parameter list of the same layout.
#pragma once

#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t, std::uint64_t
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::pair
#include <vector>

#include "polyak/communicator.hpp"
#include "polyak/scalar_type.hpp"
#include "polyak/tensor_view.hpp"

namespace polyak {

namespace detail {

/// The type parameters travel in: double if any list is double, else float (16-bit ones go up to
/// float, as PyTorch's torch.cat up-casts, and come back rounded once).
template <class... Ts>
using wire_t = std::conditional_t<(std::is_same_v<accumulator_t<Ts>, double> || ...), double, float>;

template <class T>
constexpr std::uint64_t scalar_code() {
  if constexpr (std::is_same_v<T, float>) return 1;
  if constexpr (std::is_same_v<T, double>) return 2;
  if constexpr (std::is_same_v<T, Eigen::half>) return 3;
  return 4;  // Eigen::bfloat16
}

/// What members must agree on before their values may be summed: how many tensors, how many
/// scalars, and each tensor's size and scalar type (an FNV-1a hash of them, in order).
struct Layout {
  std::uint64_t tensors = 0, scalars = 0, hash = 14695981039346656037ull;

  void add(std::uint64_t value) {
    for (int byte = 0; byte < 8; ++byte) {
      hash ^= (value >> (8 * byte)) & 0xff;
      hash *= 1099511628211ull;
    }
  }
  template <class T>
  void add(const ParameterList<T>& list) {
    for (const auto& tensor : list) {
      ++tensors;
      scalars += tensor.numel();
      add(tensor.numel());
      add(scalar_code<T>());
    }
  }
};

/// Collective: throws std::invalid_argument on every member when the members' layouts differ, before
/// any value moves. It sums, over the members, each byte f of the layout and f^2: all members agree
/// on f exactly when size * sum(f^2) == sum(f)^2 (Cauchy-Schwarz); bytes keep those sums exact.
template <class Comm>
void check_same_layout(Comm& comm, const Layout& layout, const char* where) {
  const std::uint64_t fields[3] = {layout.tensors, layout.scalars, layout.hash};
  double sums[2 * 24] = {};
  for (int f = 0; f < 3; ++f) {
    for (int byte = 0; byte < 8; ++byte) {
      const double value = static_cast<double>((fields[f] >> (8 * byte)) & 0xff);
      sums[f * 8 + byte] = value;
      sums[24 + f * 8 + byte] = value * value;
    }
  }
  comm.allreduce_sum(sums, 2 * 24);
  const double members = static_cast<double>(comm.size());
  const char* what[3] = {"tensor counts", "scalar counts", "tensor sizes or scalar types"};
  for (int f = 0; f < 3; ++f) {
    for (int byte = 0; byte < 8; ++byte) {
      const double sum = sums[f * 8 + byte], squares = sums[24 + f * 8 + byte];
      if (members * squares != sum * sum) {
        throw std::invalid_argument(
            std::string("polyak::") + where + ": the members' parameter lists differ in " + what[f] +
            " (this member, rank " + std::to_string(comm.rank()) + " of " + std::to_string(comm.size()) +
            ", has " + std::to_string(layout.tensors) + " tensors of " + std::to_string(layout.scalars) +
            " scalars); nothing was averaged");
      }
    }
  }
}

/// The contiguous buffer parameters are packed into: one per thread and wire type, reused across
/// calls so that averaging allocates only when a model outgrows it.
template <class W>
std::vector<W>& pack_buffer() {
  thread_local std::vector<W> buffer;
  return buffer;
}

/// PyTorch's average_parameters: pack every tensor into one buffer divided by the group size, one
/// allreduce, unpack.
template <class Comm, class... Ts>
void average_lists(Comm& comm, const char* where, const ParameterList<Ts>&... lists) {
  static_assert(is_communicator_v<Comm>,
                "polyak: the communicator needs rank(), size(), allreduce_sum(T*, n) and split(color, key)");
  using W = wire_t<Ts...>;
  Layout layout;
  (layout.add(lists), ...);
  check_same_layout(comm, layout, where);

  std::vector<W>& buffer = pack_buffer<W>();
  buffer.resize(layout.scalars);
  const W members = static_cast<W>(comm.size());
  std::size_t offset = 0;
  auto pack = [&](const auto& list) {
    for (const auto& tensor : list) {
      Eigen::Map<Eigen::Array<W, Eigen::Dynamic, 1>>(buffer.data() + offset,
                                                     static_cast<Eigen::Index>(tensor.numel())) =
          tensor.flat().template cast<W>() / members;
      offset += tensor.numel();
    }
  };
  (pack(lists), ...);

  comm.allreduce_sum(buffer.data(), buffer.size());

  offset = 0;
  auto unpack = [&](const auto& list) {
    using T = typename std::decay_t<decltype(list)>::Scalar;
    for (const auto& tensor : list) {
      tensor.flat() = Eigen::Map<const Eigen::Array<W, Eigen::Dynamic, 1>>(
                          buffer.data() + offset, static_cast<Eigen::Index>(tensor.numel()))
                          .template cast<T>();
      offset += tensor.numel();
    }
  };
  (unpack(lists), ...);
}

}  // namespace detail

/// Replaces every tensor of `params` by its mean over the members of `comm` (PyTorch's
/// torch.distributed.algorithms.model_averaging.utils.average_parameters): one allreduce over a
/// contiguous buffer, divided by the group size first, as PyTorch divides. Members whose lists differ
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

 protected:
  Comm comm_;
  std::int64_t step_ = 0;
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
    if (period < 1) {
      throw std::invalid_argument("polyak::PeriodicModelAverager: period must be >= 1, got " +
                                  std::to_string(period));
    }
    if (warmup_steps < 0) {
      throw std::invalid_argument("polyak::PeriodicModelAverager: warmup_steps must be >= 0, got " +
                                  std::to_string(warmup_steps));
    }
  }

  /// One step: averages `lists` (one or more ParameterLists, of any scalar types) if this step is an
  /// averaging one; returns whether it was.
  template <class... Ts>
  bool average_parameters(const ParameterList<Ts>&... lists) {
    const bool now = this->step_ >= warmup_steps_ && (this->step_ - warmup_steps_) % period_ == 0;
    if (now) detail::average_lists(this->comm_, "PeriodicModelAverager::average_parameters", lists...);
    ++this->step_;
    return now;
  }

  std::int64_t period() const noexcept { return period_; }
  std::int64_t warmup_steps() const noexcept { return warmup_steps_; }

 private:
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
      : ModelAverager<Comm>(std::move(comm)), warmup_steps_(warmup_steps) {
    const int world = this->comm_.size();
    auto refuse = [](const std::string& why) {
      throw std::invalid_argument("polyak::HierarchicalModelAverager: " + why);
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

    // Consecutive ranks form each subgroup, as torch.distributed.new_subgroups makes them.
    const int rank = this->comm_.rank();
    for (const auto& [period, group_size] : period_group_sizes) {
      levels_.push_back(
          {period, group_size == world ? this->comm_ : this->comm_.split(rank / group_size, rank)});
    }
  }

  /// One step: averages `lists` within the group of the largest period dividing this step (if this
  /// step is past the warm-up and any period divides it); returns that period, or 0.
  template <class... Ts>
  std::int64_t average_parameters(const ParameterList<Ts>&... lists) {
    std::int64_t used = 0;
    if (this->step_ >= warmup_steps_) {
      for (auto level = levels_.rbegin(); level != levels_.rend(); ++level) {
        if (this->step_ % level->first == 0) {
          detail::average_lists(level->second, "HierarchicalModelAverager::average_parameters", lists...);
          used = level->first;
          break;
        }
      }
    }
    ++this->step_;
    return used;
  }

  std::int64_t warmup_steps() const noexcept { return warmup_steps_; }

 private:
  std::int64_t warmup_steps_;
  std::vector<std::pair<std::int64_t, Comm>> levels_;  // period -> its group, by increasing period
};

}  // namespace polyak
