// SPDX-License-Identifier: MIT
// The wire of the averagers (model_averaging.hpp, overlap.hpp): the type parameters travel in, and
// the chunked transport that divides them by the group size and sums them over the group, with
// PyTorch's bits, in calls of average_chunk_bytes_v<Comm> bytes (Chunk::reduce says how).
#pragma once

#include <algorithm>  // std::min, std::max
#include <cstddef>    // std::size_t
#include <cstdint>    // std::uint16_t, std::uint32_t: bf16's bits
#include <cstring>    // std::memcpy: bf16's bits
#include <string>
#include <type_traits>
#include <utility>  // std::declval
#include <vector>

#include "polyak/core/communicator.hpp"
#include "polyak/core/detail/agreement.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {
namespace detail {

/// The type parameters travel in: double if any list is double, else float (16-bit ones go up to
/// float, as PyTorch's torch.cat up-casts them beside a float tensor, and come back rounded once; a
/// 16-bit-only model, which PyTorch sums in its own type, is summed in float too: MPI adds no 16-bit
/// floats).
template <class... Ts>
using wire_t = std::conditional_t<(std::is_same_v<accumulator_t<Ts>, double> || ...), double, float>;

/// Division by the group size as PyTorch's average_parameters divides: IEEE division, rounded once.
/// Where the size is a power of two its reciprocal is exact and x * (1 / size) is the same number
/// as x / size, so it multiplies there (a division pass is slower than the memory it reads).
template <class W>
class GroupDivisor {
 public:
  explicit GroupDivisor(int size)
      : size_(static_cast<W>(size)),
        reciprocal_(W(1) / static_cast<W>(size)),
        power_of_two_((size & (size - 1)) == 0) {}

  /// Whether x / size is x times the exact reciprocal 1 / size.
  bool power_of_two() const noexcept { return power_of_two_; }
  W size() const noexcept { return size_; }
  W reciprocal() const noexcept { return reciprocal_; }
  W operator()(W x) const noexcept { return power_of_two_ ? x * reciprocal_ : x / size_; }

 private:
  W size_, reciprocal_;
  bool power_of_two_;
};

/// Scalars of T into the wire type W, divided by the group size (PyTorch divides before it sums).
template <class W, class T>
void to_wire(const T* in, W* out, std::size_t n, const GroupDivisor<W>& divisor) {
  // The branch on the divisor sits outside each loop, so that every loop vectorizes.
  const auto divide_all = [&](const auto& read) {
    if (divisor.power_of_two()) {
      const W reciprocal = divisor.reciprocal();
      for (std::size_t i = 0; i < n; ++i) out[i] = read(i) * reciprocal;
    } else {
      const W size = divisor.size();
      for (std::size_t i = 0; i < n; ++i) out[i] = read(i) / size;
    }
  };
  if constexpr (std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<W, float>) {
    divide_all([in](std::size_t i) {  // widen()'s shift and the division in one vectorized pass
      std::uint16_t low;
      std::memcpy(&low, in + i, sizeof low);
      const std::uint32_t bits = static_cast<std::uint32_t>(low) << 16;
      float value;
      std::memcpy(&value, &bits, sizeof value);
      return value;
    });
  } else {
    divide_all([in](std::size_t i) { return static_cast<W>(in[i]); });
  }
}

/// Scalars of T into the wire type W, unscaled (the overlapped average's snapshot).
template <class W, class T>
void to_wire(const T* in, W* out, std::size_t n) {
  if constexpr (std::is_same_v<accumulator_t<T>, W> && !std::is_same_v<T, W>) {
    widen(in, out, n);
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<W>(in[i]);
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
/// scalars each) and the buffers it is packed and reduced into, which stay in cache from one chunk
/// to the next. One per thread and wire type, reused: a step allocates nothing once one has run.
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
         [](const void* in, W* out, std::size_t count, const GroupDivisor<W>& divisor) {
           to_wire(static_cast<const T*>(in), out, count, divisor);
         },
         [](const W* in, void* out, std::size_t count) { from_wire(in, static_cast<T*>(out), count); }});
    scalars_ += n;
  }

  /// Replaces the chunk's scalars by their sum over the group, each divided by the group size first
  /// (PyTorch's order, and its bits, for any group size). Divided in place and summed there where
  /// the chunk is one run of wire scalars (no copy); else divided while packed into the reduce
  /// buffer, summed there, unpacked. Both sum in place, so members that hold the chunk differently
  /// still make the same call (MPI wants MPI_IN_PLACE on every process of a call or on none). The
  /// division reads the chunk into cache just before the collective reads it there, so it costs a
  /// pass over cache, not over memory: summing first out of place and scaling after (with a range
  /// check agreed to keep the bits) was 15-40% slower on one VM (docs/distributed.md). Leaves the
  /// chunk empty.
  template <class Comm>
  void reduce(Comm& comm, const GroupDivisor<W>& divisor) {
    if (scalars_ == 0) return clear();
    bool wire_only = true;
    for (const Piece& piece : pieces_) wire_only = wire_only && piece.wire_type;
    if (W* run = wire_only ? one_run() : nullptr) {
      to_wire(run, run, scalars_, divisor);
      comm.allreduce_sum(run, scalars_);
    } else {
      if (reduced_.size() < scalars_) reduced_.resize(scalars_);
      std::size_t at = 0;
      for (const Piece& piece : pieces_) {
        piece.pack(piece.data, reduced_.data() + at, piece.n, divisor);
        at += piece.n;
      }
      comm.allreduce_sum(reduced_.data(), scalars_);
      at = 0;
      for (const Piece& piece : pieces_) {
        piece.unpack(reduced_.data() + at, piece.data, piece.n);
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
    void (*pack)(const void* in, W* out, std::size_t n, const GroupDivisor<W>& divisor);
    void (*unpack)(const W* in, void* out, std::size_t n);
  };

  /// The chunk's scalars where they are one run in memory (of wire scalars, by the caller's
  /// check), else nullptr.
  W* one_run() const noexcept {
    for (std::size_t k = 1; k < pieces_.size(); ++k) {
      if (static_cast<W*>(pieces_[k - 1].data) + pieces_[k - 1].n != pieces_[k].data) return nullptr;
    }
    return static_cast<W*>(pieces_.front().data);
  }

  std::vector<Piece> pieces_;
  std::vector<W> reduced_;
  std::size_t scalars_ = 0;
};

/// PyTorch's average_parameters: every tensor divided by the group size, summed over the group
/// (its bits, for any group size). The lists' scalars, concatenated, are cut into chunks of
/// average_chunk_bytes_v<Comm>, one allreduce call a chunk, as the bare collective of the same bytes
/// would make them; see Chunk::reduce.
template <class Comm, class... Ts>
void average_lists(Comm& comm, const char* where, const ParameterList<Ts>&... lists) {
  static_assert(is_communicator_v<Comm>,
                "polyak: the communicator needs rank(), size(), allreduce_sum(T*, n) and split(color, key)");
  using W = wire_t<Ts...>;
  constexpr std::size_t chunk_scalars = average_chunk_bytes_v<Comm> / sizeof(W);
  static_assert(chunk_scalars >= 1,
                "polyak: the communicator's average_chunk_bytes must hold one scalar (8 bytes)");
  check_same_layout(comm, where, std::string(), lists...);
  const GroupDivisor<W> divisor(comm.size());
  Chunk<W>& chunk = Chunk<W>::for_this_thread();
  chunk.clear();
  const auto cut = [&](const auto& list) {
    for (const auto& tensor : list) {
      for (std::size_t from = 0; from < tensor.numel();) {
        const std::size_t length = std::min(chunk_scalars - chunk.scalars(), tensor.numel() - from);
        chunk.add(tensor.data() + from, length);
        from += length;
        if (chunk.scalars() == chunk_scalars) chunk.reduce(comm, divisor);
      }
    }
  };
  (cut(lists), ...);
  chunk.reduce(comm, divisor);
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

}  // namespace polyak
