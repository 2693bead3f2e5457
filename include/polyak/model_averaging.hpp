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

/// Collective: rank 0's bytes, to every member (through allreduce_sum: the others add zeros).
template <class Comm>
std::string text_of_rank0(Comm& comm, const std::string& text) {
  double length = comm.rank() == 0 ? static_cast<double>(text.size()) : 0.0;
  comm.allreduce_sum(&length, 1);
  std::vector<double> wire(static_cast<std::size_t>(length), 0.0);
  if (comm.rank() == 0) {
    for (std::size_t i = 0; i < wire.size(); ++i) wire[i] = static_cast<unsigned char>(text[i]);
  }
  comm.allreduce_sum(wire.data(), wire.size());
  std::string out(wire.size(), '\0');
  for (std::size_t i = 0; i < wire.size(); ++i) out[i] = static_cast<char>(static_cast<int>(wire[i]));
  return out;
}

/// How many doubles an agreement takes (see put_agreement).
inline constexpr int agreement_doubles = 16;

/// Writes into sums[0, agreement_doubles) what, summed over the members by allreduce_sum, tells
/// agreed() whether every member put the same `value`: its bytes and their squares (all members
/// agree on a byte b exactly when size * sum(b^2) == sum(b)^2, by Cauchy-Schwarz; bytes keep those
/// sums exact).
inline void put_agreement(std::uint64_t value, double* sums) {
  for (int byte = 0; byte < 8; ++byte) {
    const double b = static_cast<double>((value >> (8 * byte)) & 0xff);
    sums[byte] = b;
    sums[8 + byte] = b * b;
  }
}
inline bool agreed(const double* sums, int members) {
  bool same = true;
  for (int byte = 0; byte < 8; ++byte) {
    same = same && exactly_equal(static_cast<double>(members) * sums[8 + byte], sums[byte] * sums[byte]);
  }
  return same;
}

/// Collective: returns when every member passed lists of the same layout (names, scalar types,
/// storage orders, shapes, in order) and views whose storage has not moved; otherwise throws
/// std::invalid_argument on every member, before any value moves, naming the ranks that differ from
/// rank 0 and, on each of them, its first difference.
///
/// The common case costs one allreduce of 17 doubles and allocates nothing: each member's layout hash
/// as put_agreement writes it, and a flag for a stale view. Only when they disagree, rank 0's description is
/// broadcast (through allreduce_sum: the other members add zeros) so that each member can find its own first
/// difference.
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

  double sums[agreement_doubles + 1] = {};
  put_agreement(hash.value, sums);
  sums[agreement_doubles] = stale.empty() ? 0.0 : 1.0;
  comm.allreduce_sum(sums, agreement_doubles + 1);
  // Same layouts and no member flagged a stale view.
  if (agreed(sums, comm.size()) && sums[agreement_doubles] < 0.5) return;

  // Every member is here (all saw the same sums). Rank 0's description, to every member.
  LayoutBytes mine;
  (describe(mine, lists), ...);
  const std::string reference_bytes = text_of_rank0(comm, mine.bytes);
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
  check_same_layout(comm, where, lists...);
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

template <class... Ts>
std::uint64_t layout_hash(const ParameterList<Ts>&... lists) {
  LayoutHash hash;
  (describe(hash, lists), ...);
  return hash.value;
}

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
template <class Comm, class W>
class PendingAverage {
 public:
  using Request = typename detail::request_of<Comm, W>::type;

  /// Nothing in flight.
  PendingAverage() = default;

  /// Whether an average is in flight (started and not finished).
  bool pending() const noexcept { return pending_; }

  /// True when nothing is in flight or its reduction is complete; drives the communicator's progress
  /// (MPI makes progress only inside MPI calls: call it now and then while computing).
  bool test() { return !pending_ || request_.test(); }

  /// Collective: checks the layout (as average_parameters does) and starts the average of `lists`.
  /// Refused while an average is in flight.
  template <class... Ts>
  void start(Comm& comm, const char* where, const ParameterList<Ts>&... lists) {
    static_assert(has_iallreduce_v<Comm>,
                  "polyak: overlapped averaging needs the communicator's non-blocking iallreduce_sum(T*, n) "
                  "(see polyak/communicator.hpp)");
    static_assert(std::is_same_v<detail::wire_t<Ts...>, W>,
                  "polyak::PendingAverage: lists of another wire type");
    if (pending_) {
      throw InvalidArgument(std::string("polyak::") + where +
                            ": an average is still in flight: finish it before starting the next");
    }
    detail::check_same_layout(comm, where, lists...);
    where_ = where;
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

  /// Waits for the average in flight, if any, and applies it to `lists` (see above).
  template <class... Ts>
  void finish(const ParameterList<Ts>&... lists) {
    if (!pending_) return;
    if (!std::is_same_v<detail::wire_t<Ts...>, W> || detail::layout_hash(lists...) != layout_ ||
        (std::size_t{0} + ... + lists.numel()) != snapshot_.size()) {
      throw InvalidArgument("polyak::" + where_ +
                            ": the lists to apply the average to are not laid out as those it started from "
                            "(names, scalar types, shapes, in order), so nothing changed");
    }
    (lists.check_storage("polyak::", where_.c_str()), ...);
    request_.wait();
    pending_ = false;
    constexpr std::size_t block = 1024;  // one block of wire scalars on the stack at a time
    W updated[block];
    std::size_t at = 0;
    const auto apply = [&](const auto& list) {
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
    (apply(lists), ...);
  }

 private:
  std::vector<W> snapshot_, mean_;
  Request request_{};
  std::uint64_t layout_ = 0;
  std::string where_;
  bool pending_ = false;
};

/// Starts the average of `params` over `comm` without waiting for it (collective, as
/// average_parameters); apply it with finish(params) at a later step. See PendingAverage.
template <class T, class Comm>
PendingAverage<Comm, detail::wire_t<T>> start_average_parameters(const ParameterList<T>& params, Comm& comm) {
  PendingAverage<Comm, detail::wire_t<T>> pending;
  pending.start(comm, "start_average_parameters", params);
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
    check_wire_type<detail::wire_t<Ts...>>();
    pending<detail::wire_t<Ts...>>().finish(lists...);
  }

 protected:
  ModelAverager(Comm comm, Overlap overlap, std::int64_t smallest_period, const char* who)
      : comm_(std::move(comm)), delay_(overlap.delay) {
    static_assert(has_iallreduce_v<Comm>,
                  "polyak: Overlap needs the communicator's non-blocking iallreduce_sum(T*, n) "
                  "(see polyak/communicator.hpp)");
    if (overlap.delay < 1 || overlap.delay > smallest_period) {
      throw InvalidArgument(std::string("polyak::") + who + ": the overlap delay must be in [1, " +
                            std::to_string(smallest_period) +
                            "] (an average must land before the next one starts), got " +
                            std::to_string(overlap.delay));
    }
  }

  /// One step's overlapped work: applies the average in flight once `delay` steps have passed since
  /// it started (else drives its progress), then, if `comm` is given, starts this step's average.
  template <class... Ts>
  void overlapped_step(Comm* comm, const char* where, const ParameterList<Ts>&... lists) {
    using W = detail::wire_t<Ts...>;
    check_wire_type<W>();
    PendingAverage<Comm, W>& in_flight = pending<W>();
    if (in_flight.pending()) {
      if (step_ - started_at_ >= delay_) {
        in_flight.finish(lists...);
      } else {
        in_flight.test();
      }
    }
    if (comm != nullptr) {
      in_flight.start(*comm, where, lists...);
      started_at_ = step_;
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
  void check_wire_type() const {
    if ((std::is_same_v<W, float> ? double_.pending() : float_.pending())) {
      throw InvalidArgument(
          "polyak: the overlapped average in flight was started from lists of another scalar type; "
          "pass the same lists every step");
    }
  }

  PendingAverage<Comm, float> float_;
  PendingAverage<Comm, double> double_;
  std::int64_t started_at_ = 0;
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
    const bool now = this->step_ >= warmup_steps_ && (this->step_ - warmup_steps_) % period_ == 0;
    constexpr const char* where = "PeriodicModelAverager::average_parameters";
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
  /// delay outside [1, the smallest period]. Needs the communicator's iallreduce_sum.
  HierarchicalModelAverager(const std::vector<std::pair<std::int64_t, int>>& period_group_sizes,
                            std::int64_t warmup_steps, Comm comm, Overlap overlap)
      : ModelAverager<Comm>((check_settings(period_group_sizes, warmup_steps, comm.size()), std::move(comm)),
                            overlap, smallest_period(period_group_sizes), "HierarchicalModelAverager"),
        warmup_steps_(warmup_steps) {
    make_levels(period_group_sizes);
  }

  /// One step: averages `lists` within the group of the largest period dividing this step (if this
  /// step is past the warm-up and any period divides it); returns that period, or 0. Overlapped, it
  /// first applies the average in flight if its delay has passed, then starts this step's.
  template <class... Ts>
  std::int64_t average_parameters(const ParameterList<Ts>&... lists) {
    std::int64_t used = 0;
    Comm* group = nullptr;
    if (this->step_ >= warmup_steps_) {
      for (auto level = levels_.rbegin(); level != levels_.rend(); ++level) {
        if (this->step_ % level->first == 0) {
          group = &level->second;
          used = level->first;
          break;
        }
      }
    }
    constexpr const char* where = "HierarchicalModelAverager::average_parameters";
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

  /// The first period (they increase); 1 for no entries, which check_settings refuses.
  static std::int64_t smallest_period(const std::vector<std::pair<std::int64_t, int>>& period_group_sizes) {
    return period_group_sizes.empty() ? 1 : period_group_sizes.front().first;
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
