// SPDX-License-Identifier: MIT
// The wire of the averagers (model_averaging.hpp, overlap.hpp): the type parameters travel in, and
// the chunked transport that divides them by the group size and sums them over the group, with
// PyTorch's bits, in calls of average_chunk_bytes_v<Comm> bytes (Chunk::reduce says how).
#pragma once

#include <algorithm>  // std::min, std::max
#include <cstddef>    // std::size_t
#include <cstdint>    // std::uint16_t, std::uint32_t: bf16's bits
#include <cstring>    // std::memcpy: bf16's bits
#include <limits>
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

/// Lists of at least this many wire bytes are summed first where the group size allows it
/// (Chunk::reduce). Smaller ones are likely in cache already (the optimizer just wrote them), where
/// the collective reads them in place at cache speed and dividing them there is the cheaper pass;
/// larger ones come from memory, where summing out of place into a cached buffer is cheaper. 16 MB
/// lies between common L2 and L3 sizes (docs/distributed.md).
inline constexpr std::size_t sum_first_bytes = std::size_t{16} << 20;

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

/// Whether some x / size, for a group size 2^k, might differ from x summed first and scaled by
/// 2^-k after: true where a scalar x != 0 is below 2^k times the smallest normal (x / size would
/// round, below the normal range) or finite above the largest / 2^(k+1) (a sum could overflow
/// where the divided one does not). Outside those ranges scaling by 2^-k is exact and commutes
/// with every rounding of the sum (infinities and NaN included), so both orders give the same bits.
/// Read on bits, so that it vectorizes.
template <class W>
bool outside_exact_scaling(const W* x, std::size_t n, int k) {
  using Bits = std::conditional_t<std::is_same_v<W, float>, std::uint32_t, std::uint64_t>;
  constexpr int mantissa_bits = std::numeric_limits<W>::digits - 1;
  constexpr Bits exponent_mask = (Bits{1} << (sizeof(W) * 8 - 1 - mantissa_bits)) - 1;  // 255, 2047
  const auto low = static_cast<Bits>(k);
  const auto high = static_cast<Bits>(exponent_mask - 2 - static_cast<Bits>(k));
  Bits outside = 0;
  for (std::size_t i = 0; i < n; ++i) {
    Bits bits;
    std::memcpy(&bits, x + i, sizeof bits);
    const Bits exponent = (bits >> mantissa_bits) & exponent_mask;
    const Bits magnitude = bits << 1;
    outside |= static_cast<Bits>((exponent <= low) & (magnitude != 0)) |
               static_cast<Bits>((exponent >= high) & (exponent != exponent_mask));
  }
  return outside != 0;
}

/// Whether this thread's floating-point unit flushes subnormal results or inputs to zero (x86's
/// FTZ / DAZ, Arm's FZ: torch.set_flush_denormal(True), code built with -ffast-math). Then scaling
/// after the sum is no longer dividing before it (a subnormal partial sum flushes in one order and
/// not in the other), so such a member sends every chunk the divide-first way (agreed with the
/// range check). Probed, not read from a register, so that it holds on every machine.
inline bool flushes_subnormals() noexcept {
  volatile float smallest_normal = std::numeric_limits<float>::min();
  volatile float smallest_subnormal = std::numeric_limits<float>::denorm_min();
  volatile double smallest_normal_double = std::numeric_limits<double>::min();
  const float half = smallest_normal * 0.5f;      // 0 where results flush (FTZ)
  const float twice = smallest_subnormal * 2.0f;  // 0 where inputs flush (DAZ)
  const double half_double = smallest_normal_double * 0.5;
  return half == 0.0f || twice == 0.0f || half_double == 0.0;
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
  /// (PyTorch's order, and its bits). Lists that are `large` (sum_first_bytes), of a group whose
  /// size is a power of two, are summed first and scaled after where the chunk is all wire scalars
  /// and the communicator sums out of place (sum_then_scale; without that a copy would cost what
  /// it saves); others are divided first (divide_then_sum). Every member takes the same way, which
  /// depends only on the layout, the group size and the communicator's type (the same on every
  /// member), and makes the same calls. Leaves the chunk empty.
  template <class Comm>
  void reduce(Comm& comm, const GroupDivisor<W>& divisor, bool large) {
    bool wire_only = true;
    for (const Piece& piece : pieces_) wire_only = wire_only && piece.wire_type;
    if (scalars_ == 0) {
    } else if (has_allreduce_to_v<Comm> && large && divisor.power_of_two() && wire_only) {
      sum_then_scale(comm, divisor);
    } else {
      divide_then_sum(comm, divisor);
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

  /// Divided in place and summed there where the chunk is one run of wire scalars (no copy);
  /// else divided while packed into the reduce buffer, summed there, unpacked. Both sum in place, so
  /// members that hold the chunk differently still make the same call (MPI wants MPI_IN_PLACE on
  /// every process of a call or on none).
  template <class Comm>
  void divide_then_sum(Comm& comm, const GroupDivisor<W>& divisor) {
    bool wire_only = true;
    for (const Piece& piece : pieces_) wire_only = wire_only && piece.wire_type;
    if (W* run = wire_only ? one_run() : nullptr) {
      to_wire(run, run, scalars_, divisor);
      comm.allreduce_sum(run, scalars_);
      return;
    }
    reserve(reduced_);
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

  /// For a group size 2^k, where x / 2^k is exact: summed out of place into the reduce buffer
  /// (the collective writes into memory that stays in cache, and reads the model where it lies),
  /// scaled by 2^-k on the way back. The same bits as dividing first wherever no member holds a
  /// scalar outside_exact_scaling and none flushes subnormals, which the members agree on (one
  /// allreduce of one scalar); otherwise the chunk, still untouched, goes the divide_then_sum way on
  /// every member. The range check reads the chunk just before the collective does, which then
  /// finds it in cache.
  template <class Comm>
  void sum_then_scale(Comm& comm, const GroupDivisor<W>& divisor) {
    reserve(reduced_);
    const W* in = one_run();
    if (in == nullptr) {  // the pieces lie apart: gathered first
      reserve(gathered_);
      std::size_t at = 0;
      for (const Piece& piece : pieces_) {
        std::copy_n(static_cast<const W*>(piece.data), piece.n, gathered_.data() + at);
        at += piece.n;
      }
      in = gathered_.data();
    }
    int k = 0;
    while ((std::size_t{1} << k) < static_cast<std::size_t>(divisor.size())) ++k;
    W outside = flushes_subnormals() || outside_exact_scaling(in, scalars_, k) ? W(1) : W(0);
    if constexpr (has_allreduce_to_v<Comm>) {  // (reduce() comes here only then)
      comm.allreduce_sum(in, reduced_.data(), scalars_);
    }
    comm.allreduce_sum(&outside, 1);
    if (outside != W(0)) {
      divide_then_sum(comm, divisor);
      return;
    }
    const W reciprocal = divisor.reciprocal();
    std::size_t at = 0;
    for (const Piece& piece : pieces_) {
      W* out = static_cast<W*>(piece.data);
      const W* sum = reduced_.data() + at;
      for (std::size_t i = 0; i < piece.n; ++i) out[i] = sum[i] * reciprocal;
      at += piece.n;
    }
  }

  /// The chunk's scalars where they are one run in memory (of wire scalars, by the caller's
  /// check), else nullptr.
  W* one_run() const noexcept {
    for (std::size_t k = 1; k < pieces_.size(); ++k) {
      if (static_cast<W*>(pieces_[k - 1].data) + pieces_[k - 1].n != pieces_[k].data) return nullptr;
    }
    return static_cast<W*>(pieces_.front().data);
  }

  void reserve(std::vector<W>& buffer) const {
    if (buffer.size() < scalars_) buffer.resize(scalars_);
  }

  std::vector<Piece> pieces_;
  std::vector<W> reduced_, gathered_;
  std::size_t scalars_ = 0;
};

/// PyTorch's average_parameters: every tensor divided by the group size, summed over the group
/// (its bits, for any group size). The lists' scalars, concatenated, are cut into chunks of
/// average_chunk_bytes_v<Comm>, one allreduce call a chunk, as the bare collective of the same bytes
/// would make them; see Chunk::reduce for the ways a chunk goes.
template <class Comm, class... Ts>
void average_lists(Comm& comm, const char* where, const ParameterList<Ts>&... lists) {
  static_assert(is_communicator_v<Comm>,
                "polyak: the communicator needs rank(), size(), allreduce_sum(T*, n) and split(color, key)");
  using W = wire_t<Ts...>;
  check_same_layout(comm, where, std::string(), lists...);
  constexpr std::size_t chunk_scalars = average_chunk_bytes_v<Comm> / sizeof(W);
  const GroupDivisor<W> divisor(comm.size());
  const bool large = (std::size_t{0} + ... + lists.numel()) * sizeof(W) >= sum_first_bytes;
  Chunk<W>& chunk = Chunk<W>::for_this_thread();
  chunk.clear();
  const auto cut = [&](const auto& list) {
    for (const auto& tensor : list) {
      for (std::size_t from = 0; from < tensor.numel();) {
        const std::size_t length = std::min(chunk_scalars - chunk.scalars(), tensor.numel() - from);
        chunk.add(tensor.data() + from, length);
        from += length;
        if (chunk.scalars() == chunk_scalars) chunk.reduce(comm, divisor, large);
      }
    }
  };
  (cut(lists), ...);
  chunk.reduce(comm, divisor, large);
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
