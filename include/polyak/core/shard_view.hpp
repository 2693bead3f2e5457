// SPDX-License-Identifier: MIT
// Views of one rank's shard of a model that no rank holds whole (FSDP's flat parameters, ZeRO-3's
// partitions): FlatLayout, the whole model's tensors laid end to end, and ShardView, one rank's
// contiguous range of it as a ParameterList of pieces, for an AveragedModel to average. The rules
// are elementwise, so the average of a shard is the shard of the average, bit for bit.
//
//     polyak::FlatLayout layout;                       // the same on every rank
//     layout.add("fc.weight", {512, 1024}).add("fc.bias", {512});
//     const auto range = polyak::even_shard(layout.numel(), comm.rank(), comm.size());
//     polyak::ShardView<float> shard(layout, my_flat.data(), range, comm);  // collective
//     polyak::AveragedModel<float, polyak::EMA> ema(shard.parameters(), polyak::EMA(0.999));
//
// Checkpoints of such averages, one file written by all ranks and read back by any number of them:
// polyak/checkpoint/distributed_checkpoint.hpp.
#pragma once

#include <algorithm>  // std::sort, std::min, std::max
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t, std::uint64_t
#include <string>
#include <utility>  // std::move, std::pair
#include <vector>

#include "polyak/core/communicator.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/detail/agreement.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {

/// The whole model's tensors, each flattened row-major and laid end to end in the order added: the
/// flat parameter a sharded trainer cuts into ranges.
class FlatLayout {
 public:
  /// One tensor of the flat model.
  struct Tensor {
    std::string name;                 ///< its name
    std::vector<std::int64_t> shape;  ///< its shape
    std::size_t offset = 0;           ///< where its first scalar lies in the flat model
    std::size_t numel = 0;            ///< its element count
  };

  /// Adds a tensor; refused: an empty or repeated name, a negative extent.
  FlatLayout& add(std::string name, std::vector<std::int64_t> shape) {
    if (name.empty()) throw InvalidArgument("polyak::FlatLayout::add: a tensor needs a non-empty name");
    for (const auto& t : tensors_) {
      if (t.name == name)
        throw InvalidArgument("polyak::FlatLayout::add: the name '" + name + "' is already in");
    }
    std::size_t numel = 1;
    for (const std::int64_t extent : shape) {
      if (extent < 0) {
        throw InvalidArgument("polyak::FlatLayout::add: tensor '" + name + "' has a negative extent");
      }
      numel *= static_cast<std::size_t>(extent);
    }
    tensors_.push_back({std::move(name), std::move(shape), numel_, numel});
    numel_ += numel;
    return *this;
  }

  /// The layout of a whole model's list (every tensor, in order); storage orders are not kept: a
  /// flat model is row-major.
  template <class T>
  static FlatLayout of(const ParameterList<T>& model) {
    FlatLayout layout;
    for (const auto& tensor : model) layout.add(tensor.name(), tensor.shape());
    return layout;
  }

  /// The tensors, in order.
  const std::vector<Tensor>& tensors() const noexcept { return tensors_; }
  /// The whole model's scalar count.
  std::size_t numel() const noexcept { return numel_; }

  /// FNV-1a of the names and shapes: what the members compare.
  std::uint64_t hash() const {
    detail::LayoutHash h;
    const auto put_u64 = [&](std::uint64_t value) {
      unsigned char bytes[8];
      for (int b = 0; b < 8; ++b) bytes[b] = static_cast<unsigned char>(value >> (8 * b));
      h.put(bytes, 8);
    };
    for (const auto& t : tensors_) {
      put_u64(t.name.size());
      h.put(t.name.data(), t.name.size());
      put_u64(t.shape.size());
      for (const std::int64_t extent : t.shape) put_u64(static_cast<std::uint64_t>(extent));
    }
    return h.value;
  }

 private:
  std::vector<Tensor> tensors_;
  std::size_t numel_ = 0;
};

/// A member's contiguous range [begin, end) of a flat model.
struct ShardRange {
  std::size_t begin = 0;  ///< the first flat scalar the member holds
  std::size_t end = 0;    ///< one past the last
};

/// Member `rank`'s range when `numel` scalars are cut evenly over `members`: the first
/// numel % members members hold one scalar more than the others, in rank order, and the ranges
/// cover the model exactly. InvalidArgument unless 0 <= rank < members.
inline ShardRange even_shard(std::size_t numel, int rank, int members) {
  if (members < 1 || rank < 0 || rank >= members)
    throw InvalidArgument("polyak::even_shard: rank " + std::to_string(rank) + " is not one of " +
                          std::to_string(members) + " members");
  const auto r = static_cast<std::size_t>(rank), n = static_cast<std::size_t>(members);
  const std::size_t share = numel / n, extra = numel % n;
  const std::size_t begin = r * share + std::min(r, extra);
  return {begin, begin + share + (r < extra ? 1 : 0)};
}

/// One rank's contiguous range [begin, end) of a FlatLayout, held at `data` (end - begin scalars).
/// parameters() lists, for every tensor of the layout, the run of its scalars inside the range as a
/// 1-D view named as the tensor (empty where the range misses the tensor), so that every rank's list
/// has the same names and an AveragedModel over it keeps exactly its shard of the average.
///
/// Construction is collective over `comm`: every member must pass the same layout, and the members'
/// ranges must cover it exactly, without gap or overlap (empty ranges allowed). Otherwise every
/// member throws std::invalid_argument naming the problem, after the same one collective call:
/// nobody is left waiting.
template <class T>
class ShardView {
 public:
  /// Where a layout tensor's piece lies: `offset` scalars into the tensor, `length` scalars long.
  struct Piece {
    std::size_t offset = 0;  ///< scalars into the tensor
    std::size_t length = 0;  ///< scalars long
  };

  template <class Comm>
  /// Collective: this member holds scalars [begin, end) of the flat `layout` at `data` (see above).
  ShardView(FlatLayout layout, T* data, std::size_t begin, std::size_t end, Comm& comm)
      : layout_(std::move(layout)), begin_(begin), end_(end) {
    check(comm, data);
    for (const auto& tensor : layout_.tensors()) {
      const std::size_t from = std::max(begin_, tensor.offset);
      const std::size_t to = std::min(end_, tensor.offset + tensor.numel);
      const Piece piece = to > from ? Piece{from - tensor.offset, to - from} : Piece{0, 0};
      pieces_.push_back(piece);
      T* at = piece.length > 0 ? data + (from - begin_) : data;
      parameters_.add(tensor.name, TensorView<T>(piece.length > 0 ? at : nullptr,
                                                 {static_cast<std::int64_t>(piece.length)}));
    }
  }

  /// Collective: this member holds `range` of the flat `layout` at `data` (even_shard gives one).
  template <class Comm>
  ShardView(FlatLayout layout, T* data, ShardRange range, Comm& comm)
      : ShardView(std::move(layout), data, range.begin, range.end, comm) {}

  /// The pieces, one per layout tensor, as views: what an AveragedModel averages.
  const ParameterList<T>& parameters() const noexcept { return parameters_; }
  /// The whole model's layout.
  const FlatLayout& layout() const noexcept { return layout_; }
  /// Where each layout tensor's piece lies within the tensor, in layout order.
  const std::vector<Piece>& pieces() const noexcept { return pieces_; }
  /// The first flat scalar this member holds.
  std::size_t begin() const noexcept { return begin_; }
  /// One past the last flat scalar this member holds.
  std::size_t end() const noexcept { return end_; }

 private:
  /// One allreduce: every member's range, a flag for a local problem, and the layout hash.
  template <class Comm>
  void check(Comm& comm, const T* data) {
    const auto members = static_cast<std::size_t>(comm.size());
    const auto rank = static_cast<std::size_t>(comm.rank());
    std::string local;
    if (data == nullptr && end_ > begin_) {
      local = "null data for a range of " + std::to_string(end_ - begin_) + " scalars";
    }
    std::vector<double> sums(3 * members + detail::agreement_doubles, 0.0);
    sums[2 * rank] = static_cast<double>(begin_);
    sums[2 * rank + 1] = static_cast<double>(end_);
    sums[2 * members + rank] = local.empty() ? 0.0 : 1.0;
    detail::put_agreement(layout_.hash(), sums.data() + 3 * members);
    comm.allreduce_sum(sums.data(), sums.size());

    std::string problem;
    if (!detail::agreed(sums.data() + 3 * members, comm.size())) {
      problem = "the members passed different layouts (names and shapes)";
    }
    std::string flagged;
    for (std::size_t r = 0; r < members; ++r) {
      if (sums[2 * members + r] > 0.5) flagged += (flagged.empty() ? "" : ", ") + std::to_string(r);
    }
    if (problem.empty() && !flagged.empty()) problem = "rank(s) " + flagged + " passed null data";
    if (problem.empty()) problem = coverage_problem(sums, members);
    if (problem.empty()) return;
    throw InvalidArgument("polyak::ShardView: " + problem + " (here, rank " + std::to_string(rank) + ": [" +
                          std::to_string(begin_) + ", " + std::to_string(end_) + ")" +
                          (local.empty() ? "" : ", " + local) + "), so no shard was made");
  }

  /// "" when the members' ranges tile [0, numel) exactly; else the first gap or overlap.
  std::string coverage_problem(const std::vector<double>& sums, std::size_t members) const {
    std::vector<std::pair<std::pair<std::size_t, std::size_t>, std::size_t>> ranges;  // ((begin, end), rank)
    for (std::size_t r = 0; r < members; ++r) {
      const auto begin = static_cast<std::size_t>(sums[2 * r]),
                 end = static_cast<std::size_t>(sums[2 * r + 1]);
      const std::string who = "rank " + std::to_string(r) + "'s range [" + std::to_string(begin) + ", " +
                              std::to_string(end) + ")";
      if (begin > end) return who + " ends before it begins";
      if (end > layout_.numel()) {
        return who + " reaches past the model's " + std::to_string(layout_.numel()) + " scalars";
      }
      ranges.push_back({{begin, end}, r});
    }
    std::sort(ranges.begin(), ranges.end());
    std::size_t covered = 0;
    for (const auto& [range, r] : ranges) {
      const std::string who = "rank " + std::to_string(r) + "'s range [" + std::to_string(range.first) +
                              ", " + std::to_string(range.second) + ")";
      if (range.first > covered) {
        return "the ranges leave [" + std::to_string(covered) + ", " + std::to_string(range.first) +
               ") of the model's " + std::to_string(layout_.numel()) + " scalars to no rank (before " + who +
               ")";
      }
      if (range.first < covered && range.second > range.first) {
        return who + " overlaps another's, which ends at " + std::to_string(covered);
      }
      covered = std::max(covered, range.second);
    }
    if (covered < layout_.numel()) {
      return "the ranges end at " + std::to_string(covered) + ", before the model's " +
             std::to_string(layout_.numel()) + " scalars";
    }
    return "";
  }

  FlatLayout layout_;
  std::size_t begin_, end_;
  std::vector<Piece> pieces_;
  ParameterList<T> parameters_;
};

}  // namespace polyak
