// SPDX-License-Identifier: MIT
// The wire of the averagers (model_averaging.hpp, overlap.hpp): the type parameters travel in, and
// the chunked transport that divides them by the group size and sums them over the group in the bare
// collective's 1 MB calls, in place where a chunk is one run of wire scalars in memory, else packed.
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

}  // namespace polyak
