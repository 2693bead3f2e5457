// SPDX-License-Identifier: MIT
// Model averaging across processes: average_parameters, PeriodicModelAverager (post-local SGD) and
// HierarchicalModelAverager (hierarchical SGD), as PyTorch's
// torch.distributed.algorithms.model_averaging has them.
//
// Every function here is collective over its communicator (see polyak/communicator.hpp): each
// member calls it at the same step with a parameter list of the same layout.
#pragma once

#include <algorithm>  // std::min, std::max
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t, std::uint64_t
#include <stdexcept>  // std::invalid_argument
#include <string>     // std::char_traits: lengths of scalar type names
#include <type_traits>
#include <utility>  // std::pair
#include <vector>

#include "polyak/detail/state_io_fwd.hpp"
#include "polyak/error.hpp"
#include "polyak/communicator.hpp"
#include "polyak/detail/tensor_spec.hpp"
#include "polyak/scalar_type.hpp"
#include "polyak/tensor_view.hpp"
#include "polyak/detail/number_text.hpp"

namespace polyak {

namespace detail {

/// The type parameters travel in: double if any list is double, else float (16-bit ones go up to
/// float, as PyTorch's torch.cat up-casts, and come back rounded once).
template <class... Ts>
using wire_t = std::conditional_t<(std::is_same_v<accumulator_t<Ts>, double> || ...), double, float>;

/// Writes what members must agree on before their values may be summed, tensor by tensor: name,
/// scalar type, storage order (of tensors of two or more dimensions) and shape, as bytes into `sink`
/// (sink.put(pointer, length)). The same bytes feed the layout hash and, when members disagree, the
/// description of rank 0's list that every member compares its own with.
template <class Sink, class T>
void describe(Sink& sink, const ParameterList<T>& list) {
  const auto put_u64 = [&](std::uint64_t value) {
    unsigned char bytes[8];
    for (int b = 0; b < 8; ++b) bytes[b] = static_cast<unsigned char>(value >> (8 * b));
    sink.put(bytes, 8);
  };
  const char* scalar = dtype_name(dtype_of<T>());
  for (const auto& tensor : list) {
    put_u64(tensor.name().size());
    sink.put(tensor.name().data(), tensor.name().size());
    put_u64(std::char_traits<char>::length(scalar));
    sink.put(scalar, std::char_traits<char>::length(scalar));
    put_u64(tensor.shape().size() > 1 && tensor.storage_order() == StorageOrder::ColMajor ? 1 : 0);
    put_u64(tensor.shape().size());
    for (const std::int64_t extent : tensor.shape()) put_u64(static_cast<std::uint64_t>(extent));
  }
}

/// FNV-1a over what describe() writes; allocates nothing.
struct LayoutHash {
  std::uint64_t value = 14695981039346656037ull;
  void put(const void* data, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      value ^= static_cast<const unsigned char*>(data)[i];
      value *= 1099511628211ull;
    }
  }
};

/// What describe() writes, kept (only when members disagree).
struct LayoutBytes {
  std::string bytes;
  void put(const void* data, std::size_t n) { bytes.append(static_cast<const char*>(data), n); }
};

/// One tensor of a description read back from its bytes.
struct DescribedTensor {
  std::string name, scalar;
  StorageOrder order = StorageOrder::RowMajor;
  std::vector<std::int64_t> shape;
  TensorSpec spec() const { return {name, shape.data(), shape.size(), order, scalar, {}}; }
};

/// Reads describe()'s bytes back; a description that does not parse (another polyak on that rank?)
/// gives what it could read and `complete` false.
inline std::vector<DescribedTensor> read_description(const std::string& bytes, bool& complete) {
  std::vector<DescribedTensor> tensors;
  std::size_t at = 0;
  const auto get_u64 = [&](std::uint64_t& value) {
    if (bytes.size() - at < 8) return false;
    value = 0;
    for (int b = 7; b >= 0; --b)
      value = (value << 8) | static_cast<unsigned char>(bytes[at + static_cast<std::size_t>(b)]);
    at += 8;
    return true;
  };
  const auto get_text = [&](std::string& text) {
    std::uint64_t length = 0;
    if (!get_u64(length) || bytes.size() - at < length) return false;
    text.assign(bytes, at, static_cast<std::size_t>(length));
    at += static_cast<std::size_t>(length);
    return true;
  };
  complete = false;
  while (at < bytes.size()) {
    DescribedTensor t;
    std::uint64_t order = 0, rank = 0;
    if (!get_text(t.name) || !get_text(t.scalar) || !get_u64(order) || !get_u64(rank) || rank > bytes.size())
      return tensors;
    t.order = order == 1 ? StorageOrder::ColMajor : StorageOrder::RowMajor;
    for (std::uint64_t d = 0; d < rank; ++d) {
      std::uint64_t extent = 0;
      if (!get_u64(extent)) return tensors;
      t.shape.push_back(static_cast<std::int64_t>(extent));
    }
    tensors.push_back(std::move(t));
  }
  complete = true;
  return tensors;
}

/// "1, 3" for the ranks whose flag is set.
inline std::string rank_list(const std::vector<double>& flags) {
  std::string out;
  for (std::size_t r = 0; r < flags.size(); ++r) {
    if (flags[r] > 0) out += (out.empty() ? "" : ", ") + std::to_string(r);
  }
  return out;
}

/// Collective: returns when every member passed lists of the same layout (names, scalar types,
/// storage orders, shapes, in order) and views whose storage has not moved; otherwise throws
/// std::invalid_argument on every member, before any value moves, naming the ranks that differ from
/// rank 0 and, on each of them, its first difference.
///
/// The common case costs one allreduce of 17 doubles and allocates nothing: each member's layout hash,
/// byte by byte, and the squares of those bytes (all members agree on a byte b exactly when
/// size * sum(b^2) == sum(b)^2, by Cauchy-Schwarz; bytes keep those sums exact), and a flag for a stale
/// view. Only when they disagree, rank 0's description is broadcast (through allreduce_sum: the other
/// members add zeros) so that each member can find its own first difference.
template <class Comm, class... Ts>
void check_same_layout(Comm& comm, const char* where, const ParameterList<Ts>&... lists) {
  LayoutHash hash;
  (describe(hash, lists), ...);
  std::string stale;
  const auto check_storage = [&](const auto& list) {
    try {
      if (stale.empty()) list.check_storage("");
    } catch (const std::invalid_argument& e) {
      stale = std::string(e.what()).substr(2);  // without check_storage's ": "
    }
  };
  (check_storage(lists), ...);

  double sums[17] = {};
  for (int byte = 0; byte < 8; ++byte) {
    const double value = static_cast<double>((hash.value >> (8 * byte)) & 0xff);
    sums[byte] = value;
    sums[8 + byte] = value * value;
  }
  sums[16] = stale.empty() ? 0.0 : 1.0;
  comm.allreduce_sum(sums, 17);
  const double members = static_cast<double>(comm.size());
  bool same = sums[16] < 0.5;  // no member flagged a stale view
  for (int byte = 0; byte < 8; ++byte) {
    same = same && detail::exactly_equal(members * sums[8 + byte], sums[byte] * sums[byte]);
  }
  if (same) return;

  // Every member is here (all saw the same sums). Rank 0's description, to every member.
  LayoutBytes mine;
  (describe(mine, lists), ...);
  double length = comm.rank() == 0 ? static_cast<double>(mine.bytes.size()) : 0.0;
  comm.allreduce_sum(&length, 1);
  std::vector<double> wire(static_cast<std::size_t>(length), 0.0);
  if (comm.rank() == 0) {
    for (std::size_t i = 0; i < wire.size(); ++i) wire[i] = static_cast<unsigned char>(mine.bytes[i]);
  }
  comm.allreduce_sum(wire.data(), wire.size());
  std::string reference_bytes(wire.size(), '\0');
  for (std::size_t i = 0; i < wire.size(); ++i)
    reference_bytes[i] = static_cast<char>(static_cast<int>(wire[i]));
  bool complete = false;
  const std::vector<DescribedTensor> reference = read_description(reference_bytes, complete);
  bool own_complete = false;
  const std::vector<DescribedTensor> own = read_description(mine.bytes, own_complete);

  // This member's first difference from rank 0, and which members have one (or a stale view).
  const std::string label = "rank " + std::to_string(comm.rank());
  std::string problem = stale;
  if (problem.empty()) {
    problem = first_mismatch(
        own.size(), [&](std::size_t i) { return own[i].spec(); }, label, reference.size(),
        [&](std::size_t i) { return reference[i].spec(); }, "rank 0");
    if (problem.empty() && !complete) problem = "rank 0's description of its list could not be read";
  }
  std::vector<double> differs(static_cast<std::size_t>(comm.size()) * 2, 0.0);
  differs[static_cast<std::size_t>(comm.rank())] = !problem.empty() && stale.empty() ? 1.0 : 0.0;
  differs[static_cast<std::size_t>(comm.size() + comm.rank())] = stale.empty() ? 0.0 : 1.0;
  comm.allreduce_sum(differs.data(), differs.size());
  const std::vector<double> listed(differs.begin(), differs.begin() + comm.size());
  const std::vector<double> moved(differs.begin() + comm.size(), differs.end());

  std::string message =
      std::string("polyak::") + where + ": the members' parameter lists differ, so nothing was averaged:";
  const std::string ranks = rank_list(listed), stale_ranks = rank_list(moved);
  if (!ranks.empty()) {
    message += std::string(" the list") +
               (ranks.find(',') == std::string::npos ? " of rank " : "s of ranks ") + ranks + " differ" +
               (ranks.find(',') == std::string::npos ? "s" : "") + " from rank 0's";
  }
  if (!stale_ranks.empty()) {
    message += std::string(ranks.empty() ? "" : ";") + " views on rank" +
               (stale_ranks.find(',') == std::string::npos ? " " : "s ") + stale_ranks +
               " point at storage that moved";
  }
  if (!problem.empty()) message += "; here, on " + label + ": " + problem;
  throw InvalidArgument(message);
}

/// The buffer parameters are packed into: one per thread and wire type, reused across calls.
template <class W>
std::vector<W>& pack_buffer() {
  thread_local std::vector<W> buffer;
  return buffer;
}

/// Scalars packed and reduced at a time. Open MPI's allreduce of one 40 MB buffer took 120 ms on
/// 2 ranks here, in 1e6-float chunks 13 ms (its temporary pages fault afresh on every large call);
/// a 1 MB staging buffer also stays in cache between packing and unpacking, where a 4 MB one cost
/// 15% more (benchmarks/bench_mpi.cpp).
inline constexpr std::size_t average_chunk_scalars = std::size_t{1} << 18;

/// PyTorch's average_parameters: every tensor divided by the group size, summed over the group,
/// copied back; packed into a contiguous buffer a chunk at a time, one allreduce a chunk. It
/// multiplies by 1 / size where PyTorch divides by size (a division pass cost 15% here): the same
/// bits for groups of 2, 4, 8...; within one rounding otherwise.
template <class Comm, class... Ts>
void average_lists(Comm& comm, const char* where, const ParameterList<Ts>&... lists) {
  static_assert(is_communicator_v<Comm>,
                "polyak: the communicator needs rank(), size(), allreduce_sum(T*, n) and split(color, key)");
  using W = wire_t<Ts...>;
  check_same_layout(comm, where, lists...);
  const std::size_t scalars = (std::size_t{0} + ... + lists.numel());

  std::vector<W>& buffer = pack_buffer<W>();
  buffer.resize(std::min(scalars, average_chunk_scalars));
  const W members = static_cast<W>(comm.size());

  // Walks the tensors of all lists as one range of scalars, a chunk at a time: pack, reduce, unpack.
  for (std::size_t chunk = 0; chunk < scalars; chunk += buffer.size()) {
    const std::size_t chunk_end = std::min(scalars, chunk + buffer.size());
    auto for_each_piece = [&](auto&& piece) {  // piece(tensor, from, to, buffer offset)
      std::size_t start = 0;
      auto visit = [&](const auto& list) {
        for (const auto& tensor : list) {
          const std::size_t end = start + tensor.numel();
          if (end > chunk && start < chunk_end) {
            const std::size_t from = std::max(start, chunk), to = std::min(end, chunk_end);
            piece(tensor, from - start, to - start, from - chunk);
          }
          start = end;
        }
      };
      (visit(lists), ...);
    };
    for_each_piece([&](const auto& tensor, std::size_t from, std::size_t to, std::size_t at) {
      const auto length = static_cast<Eigen::Index>(to - from);
      Eigen::Map<Eigen::Array<W, Eigen::Dynamic, 1>>(buffer.data() + at, length) =
          tensor.flat().segment(static_cast<Eigen::Index>(from), length).template cast<W>() *
          (W(1) / members);
    });
    comm.allreduce_sum(buffer.data(), chunk_end - chunk);
    for_each_piece([&](const auto& tensor, std::size_t from, std::size_t to, std::size_t at) {
      using T = std::remove_pointer_t<decltype(tensor.data())>;
      const auto length = static_cast<Eigen::Index>(to - from);
      tensor.flat().segment(static_cast<Eigen::Index>(from), length) =
          Eigen::Map<const Eigen::Array<W, Eigen::Dynamic, 1>>(buffer.data() + at, length).template cast<T>();
    });
  }
}

}  // namespace detail

/// Replaces every tensor of `params` by its mean over the members of `comm` (PyTorch's
/// torch.distributed.algorithms.model_averaging.utils.average_parameters): packed into a contiguous
/// buffer, divided by the group size first as PyTorch divides, and reduced a chunk of
/// detail::average_chunk_scalars at a time. Members whose lists differ
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
      throw InvalidArgument("polyak::PeriodicModelAverager: period must be >= 1, got " +
                            std::to_string(period));
    }
    if (warmup_steps < 0) {
      throw InvalidArgument("polyak::PeriodicModelAverager: warmup_steps must be >= 0, got " +
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

  /// Checkpoints: the step count and settings; defined by the checkpoint layer: see
  /// StateIO<PeriodicModelAverager> in polyak/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(PeriodicModelAverager);

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

  /// Checkpoints: the step count and settings; defined by the checkpoint layer: see
  /// StateIO<HierarchicalModelAverager> in polyak/state_io.hpp.
  POLYAK_DETAIL_STATE_MEMBERS(HierarchicalModelAverager);

 private:
  std::int64_t warmup_steps_;
  std::vector<std::pair<std::int64_t, Comm>> levels_;  // period -> its group, by increasing period
};

}  // namespace polyak
