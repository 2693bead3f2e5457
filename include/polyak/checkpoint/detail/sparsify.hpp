// SPDX-License-Identifier: MIT
// Which scalars of one task vector a sparsified merge keeps (magnitude, outliers, random, rank
// sampling; the rules: polyak/checkpoint/merge_options.hpp), as one bit per scalar, and the L1
// rescale that goes with them. Selection by rank is linear time (std::nth_element for the one or
// two boundary values, then a pass in position order), never a sort of the tensor; rank sampling,
// which needs every rank of a row, orders the row by a radix sort (linear time too).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>  // std::memcpy
#include <memory>   // std::unique_ptr
#include <new>      // std::bad_alloc
#include <string>
#include <tuple>  // std::tie
#include <utility>
#include <vector>

#include "polyak/checkpoint/merge_options.hpp"
#include "polyak/core/detail/number_text.hpp"

namespace polyak {

namespace detail {

/// The scalars a merge's arithmetic takes at a time (as doubles, one piece a model: a few hundred KB).
inline constexpr std::size_t merge_piece = std::size_t{1} << 14;

/// FNV-1a of a name: part of the random methods' seed, the same on every platform.
inline std::uint64_t name_hash(const std::string& name) {
  std::uint64_t h = 14695981039346656037ull;
  for (const char c : name)
    h = (h ^ static_cast<std::uint64_t>(static_cast<unsigned char>(c))) * 1099511628211ull;
  return h;
}

/// SplitMix64's output function (Steele, Lea and Flood, 2014): a bijection of 64-bit words whose
/// outputs at consecutive inputs pass BigCrush.
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// The key of model `m`'s draws for the tensor `name`: a stream of its own, so that a tensor's
/// draws do not depend on which other tensors or models exist.
inline std::uint64_t draw_key(std::uint64_t seed, const std::string& name, std::size_t m) {
  return mix64(seed + mix64(name_hash(name) + mix64(static_cast<std::uint64_t>(m) + 1)));
}

/// The uniform draw in [0, 1) of scalar `position` under `key`: SplitMix64's output at step
/// position + 1 from state `key`. Counter-based: any scalar's draw is computed without those before
/// it (pieces of a tensor can be drawn in any order, on any thread), in a few instructions (the
/// mt19937_64 + generate_canonical it replaced took 15 ns a draw, half of a DARE merge).
inline double uniform_draw(std::uint64_t key, std::uint64_t position) {
  return static_cast<double>(mix64(key + (position + 1) * 0x9e3779b97f4a7c15ull) >> 11) * 0x1p-53;
}

/// `value` where `kept`, else +0, without a branch (whether a scalar is kept is often a coin toss,
/// which a branch mispredicts half the time).
inline double kept_or_zero(bool kept, double value) {
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  bits &= std::uint64_t{0} - std::uint64_t{kept};
  std::memcpy(&value, &bits, sizeof bits);
  return value;
}

/// A task value's magnitude as the rank rules order it: the bits of |tau| (for values >= 0 their
/// order as integers is their order as numbers, infinity above every finite value), NaN (any
/// payload) above infinity, so that the order is strict whatever the inputs hold.
inline std::uint64_t rank_key(double tau) {
  if (std::isnan(tau)) return 0x7ff8000000000000ull;
  const double size = std::abs(tau);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &size, sizeof bits);
  return bits;
}

/// The magnitude a finite rank_key holds, and whether it is finite.
inline bool finite_magnitude(std::uint64_t key, double& size) {
  if (key >= 0x7ff0000000000000ull) return false;
  std::memcpy(&size, &key, sizeof size);
  return true;
}

/// Sorts `items` (pairs whose .first is an unsigned 64-bit key) by key, ascending, equal keys kept
/// in their order: a least-significant-digit radix sort, 8 bits a pass, skipping each digit that
/// every key shares (the high bits of magnitudes of one size, the low ones of a float's widened
/// mantissa). Linear time; `scratch` is working memory (resized; its contents swap with `items`'
/// between passes). std::sort of the (key, position) pairs of a row of 4 million scalars was most of
/// a DELLA merge.
template <class Pair>
void stable_sort_by_key(std::vector<Pair>& items, std::vector<Pair>& scratch) {
  const std::size_t n = items.size();
  const auto key_less = [](const Pair& a, const Pair& b) { return a.first < b.first; };
  if (n < 256) {  // (eight histograms of 256 would cost more than the sort)
    std::stable_sort(items.begin(), items.end(), key_less);
    return;
  }
  constexpr std::size_t digits = 8;
  std::vector<std::size_t> counts(digits * 256, 0);  // counts[d * 256 + digit d's value]
  for (const Pair& item : items) {
    for (std::size_t d = 0; d < digits; ++d) ++counts[d * 256 + ((item.first >> (8 * d)) & 0xff)];
  }
  scratch.resize(n);
  for (std::size_t d = 0; d < digits; ++d) {
    std::size_t* count = counts.data() + d * 256;
    if (count[(items.front().first >> (8 * d)) & 0xff] == n) continue;  // (one value: order kept)
    std::size_t at = 0;
    for (std::size_t v = 0; v < 256; ++v) {  // each digit value's first slot
      const std::size_t here = count[v];
      count[v] = at;
      at += here;
    }
    for (const Pair& item : items) scratch[count[(item.first >> (8 * d)) & 0xff]++] = item;
    items.swap(scratch);
  }
}

/// The scalars whose ascending rank lies in [lo, hi), held as bounds on their keys rather than a bit
/// a scalar: ranks by key, equal keys ranked by position, the earlier one higher. So a key strictly
/// between the boundary keys is in the window, and of the keys equal to a boundary, those on the
/// window's side of a cut position. A merge asks it of each scalar's key as it goes (setting a bit a
/// scalar in a std::vector<bool> was a quarter of a TIES merge).
struct RankWindow {
  bool has_low = false, has_high = false;  ///< whether ranks below lo (at or past hi) exist at all
  std::uint64_t low = 0, high = 0;         ///< the lo-th and the (hi - 1)-th smallest keys
  std::size_t low_until = 0;               ///< a key equal to `low` is in the window at positions < low_until
  std::size_t high_from = 0;  ///< a key equal to `high` is in the window at positions >= high_from

  /// Whether the scalar at `position`, of key `key`, ranks within the window.
  bool contains(std::uint64_t key, std::size_t position) const {  // (no branches: `&`, `|` on bools)
    const bool above_low = !has_low | (low < key) | ((key == low) & (position < low_until));
    const bool below_high = !has_high | (key < high) | ((key == high) & (position >= high_from));
    return above_low & below_high;
  }
};

/// Rank keys counted by their top 16 bits, a histogram a lane (threads count apart; the sum is the
/// same whatever the lanes). The pass that writes a tensor's keys counts them here as it goes, so that
/// selection does not read them once more for it; kept in MergeWorkspace, its memory reused.
struct KeyCounts {
  static constexpr std::size_t buckets = std::size_t{1} << 16;
  std::vector<std::vector<std::size_t>> lanes;  ///< lanes[l][b]: the keys lane l counted in bucket b

  /// Zero counts for `lane_count` lanes.
  void start(std::size_t lane_count) {
    lanes.resize(lane_count);
    for (auto& count : lanes) count.assign(buckets, 0);
  }
  static std::size_t bucket(std::uint64_t key) { return static_cast<std::size_t>(key >> 48); }
};

/// The windows that need no key: an empty one (no key reaches the low boundary) and one of every rank.
/// Clamps hi to n and sets `window`'s kind; true where those settle it, with no pass over the keys.
inline bool window_without_keys(std::size_t n, std::size_t lo, std::size_t& hi, RankWindow& window) {
  hi = std::min(hi, n);
  window = RankWindow{};
  if (lo >= hi) {
    window.has_low = true;
    window.low = ~std::uint64_t{0};
    window.low_until = 0;
    return true;
  }
  window.has_low = lo > 0;
  window.has_high = hi < n;
  return !window.has_low && !window.has_high;
}

/// The window of the ranks [lo, hi) of `value` (a key a scalar; RankWindow says how equal keys
/// rank). `scratch` is working memory (resized).
///
/// The passes over the values run in spans: for_each_span(body) calls body(lane, begin, end) for
/// every span [k * span, min((k + 1) * span, n)), lane < lanes, from several threads at once. The
/// boundary keys are found by radix selection: a histogram of the top 16 bits (`counted`, where the
/// caller counted every key there, else a pass here) finds the bucket that holds each, one pass
/// gathers those buckets' keys, and std::nth_element runs on them alone (nth_element on all of
/// them was a fifth of a TIES merge). Where a boundary's equal keys are split by the window, a pass
/// counts them span by span to find the cut: the result does not depend on the spans or threads.
template <class ForEachSpan>
RankWindow rank_window(const std::vector<std::uint64_t>& value, std::size_t lo, std::size_t hi,
                       std::vector<std::uint64_t>& scratch, std::size_t lanes, std::size_t span,
                       ForEachSpan&& for_each_span, const KeyCounts* counted = nullptr) {
  using Key = std::uint64_t;
  const std::size_t n = value.size();
  RankWindow window;
  if (window_without_keys(n, lo, hi, window)) return window;
  constexpr std::size_t buckets = KeyCounts::buckets;
  KeyCounts counting;
  if (counted == nullptr) {
    counting.lanes.resize(lanes);
    for_each_span([&](std::size_t l, std::size_t begin, std::size_t end) {
      std::vector<std::size_t>& count = counting.lanes[l];
      if (count.empty()) count.assign(buckets, 0);
      for (std::size_t p = begin; p < end; ++p) ++count[KeyCounts::bucket(value[p])];
    });
    counted = &counting;
  }
  const std::vector<std::vector<std::size_t>>& lane_counts = counted->lanes;
  std::vector<std::size_t> counts(buckets, 0);
  for (const auto& count : lane_counts) {
    for (std::size_t b = 0; b < count.size(); ++b) counts[b] += count[b];
  }
  const auto lane_count_of = [&](std::size_t l, std::size_t b) {
    return l < lane_counts.size() && !lane_counts[l].empty() ? lane_counts[l][b] : std::size_t{0};
  };
  // The bucket of the k-th smallest key (from 0), and how many keys lie in buckets below it.
  const auto bucket_of_rank = [&](std::size_t k, std::size_t& below) {
    std::size_t bucket = 0;
    below = 0;
    while (below + counts[bucket] <= k) below += counts[bucket++];
    return bucket;
  };
  std::size_t below_low = 0, below_high = 0;
  const std::size_t low_bucket = window.has_low ? bucket_of_rank(lo, below_low) : buckets;
  const std::size_t high_bucket = window.has_high ? bucket_of_rank(hi - 1, below_high) : buckets;
  // Both boundaries' buckets gathered in one pass: the low one's keys in scratch[0, counts[low]),
  // the high one's after them (where it is another bucket), each lane at its own place (from its
  // histogram), in position order within a lane.
  const std::size_t first = low_bucket != buckets ? low_bucket : high_bucket;
  const std::size_t second =
      low_bucket != buckets && high_bucket != buckets && high_bucket != low_bucket ? high_bucket : buckets;
  const std::size_t first_size = counts[first];
  scratch.resize(first_size + (second != buckets ? counts[second] : 0));
  std::vector<std::size_t> cursor(lanes), second_cursor(lanes);
  for (std::size_t l = 0, at = 0, second_at = first_size; l < lanes; ++l) {
    cursor[l] = at;
    at += lane_count_of(l, first);
    second_cursor[l] = second_at;
    if (second != buckets) second_at += lane_count_of(l, second);
  }
  for_each_span([&](std::size_t l, std::size_t begin, std::size_t end) {
    std::size_t next = cursor[l], second_next = second_cursor[l];  // (locals: the lanes' share a line)
    for (std::size_t p = begin; p < end; ++p) {
      const std::size_t b = KeyCounts::bucket(value[p]);
      if (b == first) scratch[next++] = value[p];
      if (b == second) scratch[second_next++] = value[p];
    }
    cursor[l] = next;
    second_cursor[l] = second_next;
  });
  // The k-th smallest key (from 0), with how many keys are below it and equal to it, from its
  // bucket's keys (reordered by nth_element; `below`: the keys in buckets below it).
  const auto select = [&](std::size_t k, std::size_t bucket, std::size_t below, std::size_t& less,
                          std::size_t& equal) {
    const auto from = scratch.begin() + static_cast<std::ptrdiff_t>(bucket == first ? 0 : first_size);
    const auto to = from + static_cast<std::ptrdiff_t>(counts[bucket]);
    const auto at = from + static_cast<std::ptrdiff_t>(k - below);
    std::nth_element(from, at, to);
    const Key kth = *at;
    less = below;
    equal = 0;
    for (auto v = from; v != to; ++v) {
      less += *v < kth;
      equal += *v == kth;
    }
    return kth;
  };
  // The keys equal to a boundary rank from less + equal - 1 (the first by position) down to less:
  // the i-th of them (from 0, by position) ranks at or above lo while i <= less + equal - 1 - lo,
  // and below hi from i >= less + equal - hi on.
  std::size_t less_low = 0, equal_low = 0, less_high = 0, equal_high = 0;
  std::size_t last_low = 0, first_high = 0;  // the indices (among the equal keys) of the cuts
  if (window.has_low) {
    window.low = select(lo, low_bucket, below_low, less_low, equal_low);
    last_low = less_low + equal_low - 1 - lo;
  }
  if (window.has_high) {
    window.high = select(hi - 1, high_bucket, below_high, less_high, equal_high);
    first_high = less_high + equal_high - hi;
  }
  const bool cut_low = window.has_low && last_low + 1 < equal_low;  // (else every equal one is in)
  const bool cut_high = window.has_high && first_high > 0;
  window.low_until = n;
  window.high_from = 0;
  if (!cut_low && !cut_high) return window;
  // The positions of the cuts: the equal keys counted span by span, then the span of each cut
  // scanned for it.
  const std::size_t spans = (n + span - 1) / span;
  std::vector<std::size_t> low_in(spans, 0), high_in(spans, 0);
  for_each_span([&](std::size_t, std::size_t begin, std::size_t end) {
    std::size_t lows = 0, highs = 0;
    for (std::size_t p = begin; p < end; ++p) {
      lows += cut_low && value[p] == window.low;
      highs += cut_high && value[p] == window.high;
    }
    low_in[begin / span] = lows;
    high_in[begin / span] = highs;
  });
  // The position of the index-th (from 0) key equal to `key`, from the counts `in` of each span.
  const auto position_of = [&](Key key, std::size_t index, const std::vector<std::size_t>& in) {
    std::size_t k = 0;
    while (index >= in[k]) index -= in[k++];
    for (std::size_t p = k * span;; ++p) {
      if (value[p] == key && index-- == 0) return p;
    }
  };
  if (cut_low) window.low_until = position_of(window.low, last_low + 1, low_in);
  if (cut_high) window.high_from = position_of(window.high, first_high, high_in);
  return window;
}

/// rank_window on this thread alone (one span).
inline RankWindow rank_window(const std::vector<std::uint64_t>& value, std::size_t lo, std::size_t hi,
                              std::vector<std::uint64_t>& scratch) {
  const std::size_t n = value.size(), span = std::max<std::size_t>(1, n);
  return rank_window(value, lo, hi, scratch, 1, span,
                     [n](auto&& body) { body(std::size_t{0}, std::size_t{0}, n); });
}

/// The index of the lowest set bit of `mask` (not 0).
inline std::size_t lowest_bit(std::uint64_t mask) {
#if defined(__GNUC__) || defined(__clang__)
  return static_cast<std::size_t>(__builtin_ctzll(mask));
#else
  std::size_t bit = 0;
  for (; (mask & 1) == 0; mask >>= 1) ++bit;
  return bit;
#endif
}

/// A scalar near a boundary of the kept window, as rank_window_streamed keeps it (no initializer: a
/// block of them is allocated, not written, until filled).
struct Candidate {
  std::uint64_t key;       ///< its rank key
  std::uint64_t position;  ///< its position in the tensor
};

/// Working memory of rank_window_streamed, kept in MergeWorkspace from one tensor to the next.
struct StreamedSelection {
  KeyCounts sample;                                    ///< the sampled pieces' keys, counted a lane
  std::vector<std::size_t> counts;                     ///< a histogram summed over the lanes
  std::unique_ptr<Candidate[]> candidates;             ///< lane l's from l * room: one block, whose pages are
                                                       ///< touched only as filled and given back when freed
  std::size_t room = 0, lanes = 0;                     ///< the candidates a lane has room for, and the lanes
  std::vector<std::vector<std::uint64_t>> piece_keys;  ///< a lane's keys of a piece
  std::vector<std::uint64_t> found;  ///< a boundary bucket's keys, then the positions of a boundary key
                                     ///< (kept for the next tensor, as the candidates are)
  bool enabled = true;               ///< (false: the keys always held; the tests compare both ways)
  std::size_t windows = 0;           ///< the windows found streamed
  std::size_t missed = 0;            ///< the windows the sample missed (left to rank_window)
  std::size_t outgrown = 0;          ///< of those, the windows whose candidates passed their limit
};

/// The smallest tensor rank_window_streamed takes (32 pieces, of which it samples 4 or 5); below it,
/// the keys held cost little.
inline constexpr std::size_t streamed_selection_min = 32 * merge_piece;

/// rank_window's window of the ranks [lo, hi) of the keys of a tensor of n scalars, without holding
/// the keys (8 bytes a scalar, written and read again). tau_of(lane, begin, count) gives the task
/// values of a piece. A sample (every stride-th piece, 4 or 5 of them, a pass of their own) says in
/// which buckets of KeyCounts the boundaries fall, with a wide margin; the pass that counts every
/// key into `counted` keeps the (key, position) of those in these buckets. Where the boundaries'
/// buckets turn out to lie among them, the window is selected from those alone, by rank_window's
/// rules: the same window. Else, or where they outgrow a quarter of the tensor, it returns false,
/// its memory freed, and leaves the window to rank_window over keys held: a second pass, so a sample
/// that misses costs speed, never the result. for_each_piece, span and for_each_span are
/// kept_scalars'.
template <class TauOf, class ForEachPiece, class ForEachSpan>
bool rank_window_streamed(std::size_t n, std::size_t lo, std::size_t hi, TauOf&& tau_of,
                          ForEachPiece&& for_each_piece, std::size_t lanes, std::size_t span,
                          ForEachSpan&& for_each_span, KeyCounts& counted, StreamedSelection& s,
                          std::vector<std::uint64_t>& held_keys, std::vector<std::uint64_t>& held_scratch,
                          RankWindow& window) {
  using Key = std::uint64_t;
  constexpr std::size_t buckets = KeyCounts::buckets;
  if (window_without_keys(n, lo, hi, window)) return true;
  // Where the window is left to rank_window, its keys held: the candidates' memory freed first (the
  // two never held at once).
  const auto release = [&s] {
    s.candidates.reset();
    s.room = s.lanes = 0;
    std::vector<std::uint64_t>().swap(s.found);
    return false;
  };
  if (!s.enabled || n < streamed_selection_min) return release();
  // The sample: every stride-th piece (4 or 5 of them), its keys counted.
  const std::size_t stride = (n + merge_piece - 1) / merge_piece / 4 * merge_piece;
  s.sample.start(lanes);
  for_each_span([&](std::size_t l, std::size_t begin, std::size_t end) {
    std::size_t* count = s.sample.lanes[l].data();
    for (std::size_t at = (begin + stride - 1) / stride * stride; at < end; at += stride) {
      const std::size_t size = std::min(merge_piece, end - at);
      const double* tau = tau_of(l, at, size);
      for (std::size_t j = 0; j < size; ++j) ++count[KeyCounts::bucket(rank_key(tau[j]))];
    }
  });
  const auto sum_lanes = [&](const KeyCounts& lanes_counted) {
    s.counts.assign(buckets, 0);
    for (const auto& count : lanes_counted.lanes) {
      for (std::size_t b = 0; b < count.size(); ++b) s.counts[b] += count[b];
    }
  };
  sum_lanes(s.sample);
  std::size_t sampled = 0;
  for (const std::size_t c : s.counts) sampled += c;
  if (sampled == 0) return release();
  // The bucket of the k-th smallest key (from 0) of s.counts, and how many keys lie below it.
  const auto bucket_of_rank = [&](std::size_t k, std::size_t& below) {
    std::size_t bucket = 0;
    below = 0;
    while (below + s.counts[bucket] <= k) below += s.counts[bucket++];
    return bucket;
  };
  // The buckets where the sample puts rank k of n, with a margin of 6 standard deviations of a
  // sampled rank and 1/64 of the sample besides (the pieces are not a random sample).
  const auto buckets_around = [&](std::size_t k, std::size_t& first, std::size_t& width) {
    const double q = (static_cast<double>(k) + 0.5) / static_cast<double>(n);
    const double size = static_cast<double>(sampled), at = q * size;
    const double margin = 6 * std::sqrt(size * q * (1 - q)) + size / 64 + 1;
    std::size_t below = 0;
    first = bucket_of_rank(static_cast<std::size_t>(std::max(0.0, at - margin)), below);
    const std::size_t last = bucket_of_rank(static_cast<std::size_t>(std::min(size - 1, at + margin)), below);
    width = last - first;
  };
  std::size_t first_a = 0, width_a = 0, first_b = 0, width_b = 0;
  buckets_around(window.has_low ? lo : hi - 1, first_a, width_a);
  first_b = first_a;
  width_b = width_a;
  if (window.has_low && window.has_high) buckets_around(hi - 1, first_b, width_b);
  const auto candidate = [=](std::size_t b) -> std::uint64_t {  // (1 or 0: no branch)
    return static_cast<std::uint64_t>(b - first_a <= width_a) |
           static_cast<std::uint64_t>(b - first_b <= width_b);
  };
  const auto missed = [&] {
    ++s.missed;
    return release();
  };
  // Where the sample puts a fifth of its keys in those buckets, the candidates would near their
  // limit (a quarter of the scalars): a tensor whose task values are mostly equal (a layer left
  // frozen, all zero) goes to the keys held at once, not after a pass.
  std::size_t near = 0;
  for (std::size_t b = 0; b < buckets; ++b) near += s.counts[b] * static_cast<std::size_t>(candidate(b));
  if (near > sampled / 5) return missed();
  // The keys counted, and the candidates kept, in one pass: at most a quarter of a lane's scalars
  // (of its spans at most), 16 bytes each: 4 bytes a scalar where the keys held take 8 (they and the
  // copy rank_window selects in are freed first: the two never held at once).
  const std::size_t spans = (n + span - 1) / span;
  const std::size_t cap = (spans + lanes - 1) / lanes * std::min(span, n) / 4 + merge_piece;
  std::vector<std::uint64_t>().swap(held_keys);
  std::vector<std::uint64_t>().swap(held_scratch);
  if (s.room < cap || s.lanes < lanes) {  // (one block: a large one is the system's, freed to it)
    s.candidates.reset();                 // (freed before the larger block is taken)
    s.room = s.lanes = 0;
    try {
      s.candidates.reset(new Candidate[lanes * cap]);
      s.room = cap;
      s.lanes = lanes;
    } catch (const std::bad_alloc&) {  // (an address-space limit: the keys held, as before)
      return missed();
    }
  }
  if (s.piece_keys.size() < lanes) s.piece_keys.resize(lanes);
  for (std::size_t l = 0; l < lanes; ++l) s.piece_keys[l].resize(std::min(n, merge_piece));
  std::vector<std::size_t> filled(lanes, 0);
  std::vector<unsigned char> overflow(lanes, 0);
  counted.start(lanes);
  for_each_piece([&](std::size_t l, std::size_t begin, std::size_t count) {
    const double* tau = tau_of(l, begin, count);
    std::size_t* counts = counted.lanes[l].data();
    std::size_t c = filled[l];
    if (c + count > cap) overflow[l] = 1;
    if (overflow[l] != 0) {
      for (std::size_t j = 0; j < count; ++j) ++counts[KeyCounts::bucket(rank_key(tau[j]))];
      return;
    }
    Key* keys = s.piece_keys[l].data();
    for (std::size_t j = 0; j < count; ++j) keys[j] = rank_key(tau[j]);
    for (std::size_t j = 0; j < count; ++j) ++counts[KeyCounts::bucket(keys[j])];
    Candidate* out = s.candidates.get() + l * s.room;
    for (std::size_t from = 0; from < count; from += 64) {  // (64 tested at once, the few kept by bit)
      const std::size_t size = std::min<std::size_t>(64, count - from);
      std::uint64_t mask = 0;
      for (std::size_t j = 0; j < size; ++j) mask |= candidate(KeyCounts::bucket(keys[from + j])) << j;
      for (; mask != 0; mask &= mask - 1) {
        const std::size_t j = from + lowest_bit(mask);
        out[c++] = {keys[j], begin + j};
      }
    }
    filled[l] = c;
  });
  for (std::size_t l = 0; l < lanes; ++l) {
    if (overflow[l] != 0) {
      ++s.outgrown;
      return missed();
    }
  }
  sum_lanes(counted);
  std::size_t below_low = 0, below_high = 0;
  const std::size_t low_bucket = window.has_low ? bucket_of_rank(lo, below_low) : 0;
  const std::size_t high_bucket = window.has_high ? bucket_of_rank(hi - 1, below_high) : 0;
  if ((window.has_low && candidate(low_bucket) == 0) || (window.has_high && candidate(high_bucket) == 0))
    return missed();
  // The k-th smallest key (from 0), in `bucket` (`below`: the keys in buckets below it), with how
  // many keys are below it and equal to it, as rank_window's selection.
  std::vector<Key>& found = s.found;
  const auto select = [&](std::size_t k, std::size_t bucket, std::size_t below, std::size_t& less,
                          std::size_t& equal) {
    found.clear();
    found.reserve(s.counts[bucket]);  // (every key of a candidates' bucket is a candidate)
    for (std::size_t l = 0; l < lanes; ++l) {
      for (std::size_t i = 0; i < filled[l]; ++i) {
        const Candidate& c = s.candidates[l * s.room + i];
        if (KeyCounts::bucket(c.key) == bucket) found.push_back(c.key);
      }
    }
    const auto at = found.begin() + static_cast<std::ptrdiff_t>(k - below);
    std::nth_element(found.begin(), at, found.end());
    const Key kth = *at;
    less = below;
    equal = 0;
    for (const Key key : found) {
      less += key < kth;
      equal += key == kth;
    }
    return kth;
  };
  // The position of the index-th (from 0, by position) key equal to `key`.
  const auto position_of = [&](Key key, std::size_t index) {
    found.clear();
    for (std::size_t l = 0; l < lanes; ++l) {
      for (std::size_t i = 0; i < filled[l]; ++i) {
        const Candidate& c = s.candidates[l * s.room + i];
        if (c.key == key) found.push_back(c.position);
      }
    }
    std::nth_element(found.begin(), found.begin() + static_cast<std::ptrdiff_t>(index), found.end());
    return static_cast<std::size_t>(found[index]);
  };
  std::size_t less_low = 0, equal_low = 0, less_high = 0, equal_high = 0, last_low = 0, first_high = 0;
  if (window.has_low) {
    window.low = select(lo, low_bucket, below_low, less_low, equal_low);
    last_low = less_low + equal_low - 1 - lo;
  }
  if (window.has_high) {
    window.high = select(hi - 1, high_bucket, below_high, less_high, equal_high);
    first_high = less_high + equal_high - hi;
  }
  window.low_until = n;
  window.high_from = 0;
  if (window.has_low && last_low + 1 < equal_low) window.low_until = position_of(window.low, last_low + 1);
  if (window.has_high && first_high > 0) window.high_from = position_of(window.high, first_high);
  // `found` is kept, not freed: taken afresh each window, its pages were most of a ranked merge's
  // page faults (docs/merging.md). A bucket's keys, 8 bytes each of candidates held at 16, it is at
  // most half the candidates' block, and release() frees both before any keys are held.
  found.clear();
  ++s.windows;
  return true;
}

/// The whole-tensor work of sparsifying model m's task vector: its kept scalars and its rescale.
/// Neither ranked, nor drawn, and no bits: every scalar is kept.
struct KeptScalars {
  bool ranked = false;              ///< the rank rules (magnitude, outliers): kept where
                                    ///< window.contains(rank_key(tau), position), tau its task value
  RankWindow window;                ///< (ranked)
  std::vector<std::uint64_t> bits;  ///< Della's rank sampling: kept where bit(position)
  double rescale = 1.0;             ///< s_i
  bool drawn = false;     ///< the random rule: kept where uniform_draw(key, position) >= drop, drawn as
                          ///< the merge goes (no bits held; no pass of its own unless it rescales)
  std::uint64_t key = 0;  ///< the draws' key (drawn)
  double drop = 0;        ///< the drop probability (drawn)

  /// Bit p % 64 of word p / 64 of `bits`: whether Della keeps the scalar at p.
  bool bit(std::size_t p) const { return ((bits[p / 64] >> (p % 64)) & 1) != 0; }
};

/// One thread's buffers in a merge's last pass: a piece of each model (and of the base), and the
/// merged scalars of its span.
struct MergeLane {
  std::vector<std::vector<double>> x;       ///< a piece of each model
  std::vector<double> base;                 ///< the base's piece
  std::vector<double> out;                  ///< a piece's merged scalars
  std::vector<std::byte> out_bytes;         ///< the span's, rounded to the output's dtype
  std::vector<double> v;                    ///< a piece of each model's kept task values (or a scalar's)
  std::vector<double> elect, sum, divisor;  ///< the task-vector methods' sums over the models, a piece
  std::vector<unsigned char> nan;           ///< whether a scalar's task values hold a NaN, a piece
  std::vector<unsigned char> kept;          ///< whether a scalar is kept (Sce's window), a piece
};

/// One thread's working memory for DELLA's rows (kept_scalars): a row's keys counted by bucket, and
/// the buckets ranked exactly.
struct DellaRow {
  std::vector<std::size_t> count, below;         ///< a bucket's keys, and the keys in buckets below it
  std::vector<std::pair<double, double>> draws;  ///< a bucket's draws: kept from, dropped below
  std::vector<unsigned char> unsure;  ///< whether a bucket holds a draw its ranks' bounds leave open
  std::vector<std::pair<std::uint64_t, std::uint64_t>> pairs;  ///< the unsure buckets' (key, column)
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranked, sort_scratch;  ///< one bucket's, sorted
};

/// The most memory a merge holds its task values in (`MergeWorkspace::held`): 256 MiB, every
/// model's task vector of a tensor of up to 16 M scalars for two models, 8 M for four.
inline constexpr std::size_t merge_held_bytes = std::size_t{256} << 20;

/// Working memory of a merge's whole-tensor passes, reused from one tensor (and model) to the next:
/// a fresh vector of a tensor's size costs a page fault every 4 KiB, which on a virtual machine
/// cost more than the selection it holds.
struct MergeWorkspace {
  /// Every model's task values (x - base, model m's at m * numel), where a random method that
  /// rescales reads them for its L1 norms (drawn_norms) and they fit `held_limit` bytes, from the
  /// second such tensor of a merge on: the last pass then reads the base alone, not every input
  /// again. (The first such tensor is read again: the first touch of fresh memory, some 1 GB/s on
  /// a virtual machine, costs more than one tensor's reads save.) Allocated at its size, not
  /// zeroed; an earlier block freed first; where the allocation fails (an address-space limit),
  /// not held: the inputs are read again.
  std::unique_ptr<double[]> held;
  std::size_t held_capacity = 0;              ///< the doubles `held` holds room for
  bool held_wanted = false;                   ///< whether an earlier tensor would have held them
  std::size_t held_limit = merge_held_bytes;  ///< (0: never held; the tests compare both ways)
  std::vector<std::uint64_t> keys;            ///< one rank key a scalar (a model's magnitudes, Sce's spreads)
  std::vector<std::uint64_t> scratch;         ///< the copy of the keys that selection reorders
  KeyCounts key_counts;                       ///< the keys' histogram, a lane, counted as they are written
  StreamedSelection streamed;                 ///< the ranked methods' selection without their keys held
  std::vector<KeptScalars> kept;              ///< per model
  std::vector<DellaRow> rows;                 ///< Della's, one a lane
  std::vector<MergeLane> lanes;               ///< the last pass's, one a thread
};

/// The probability that a random method drops each scalar of model m's task vector: 1 - its density,
/// or legacy DARE's `drop` where no density is given.
inline double drawn_drop(const MergeOptions& o, std::size_t m) {
  const bool legacy_dare = o.method == MergeMethod::Dare;
  return legacy_dare && o.densities.empty() && !(o.density < 1) ? o.drop : 1 - o.density_of(m);
}

/// Whether a sparsified method keeps model m's L1 norm (its kept scalars times norm / kept norm):
/// below density 1, where `rescale` (or the method's default) asks it; never legacy DARE, whose
/// rescale is 1 / (1 - drop).
inline bool rescales_l1(const MergeOptions& o, std::size_t m) {
  return o.method != MergeMethod::Dare && o.density_of(m) < 1 &&
         o.rescale.value_or(rescales_by_default(o.method));
}

/// The L1 norms, (every finite task value's, the drawn kept ones'), of each model's task vector under
/// a random method (DARE-*), where rescales_l1 (else (0, 0)): one pass that reads each input once,
/// for every model. task_pieces(lane, begin, end, body) calls body(lane_memory, tau, at, count) for
/// each piece of [begin, end), tau[m] pointing at model m's task values of the piece; sum_in_spans
/// is merge_tensor's (as kept_scalars takes it). The draws are the merge's.
template <class TaskPieces, class SumInSpans>
std::vector<std::pair<double, double>> drawn_norms(const MergeOptions& o, const std::string& name,
                                                   std::size_t models, TaskPieces&& task_pieces,
                                                   SumInSpans&& sum_in_spans) {
  using Norms = std::vector<std::pair<double, double>>;
  std::vector<std::uint64_t> keys(models);
  std::vector<double> drops(models);
  std::vector<std::size_t> summed;  // the models that rescale
  for (std::size_t m = 0; m < models; ++m) {
    keys[m] = draw_key(o.seed, name, m);
    drops[m] = drawn_drop(o, m);
    if (rescales_l1(o, m)) summed.push_back(m);
  }
  if (summed.empty()) return Norms(models, {0.0, 0.0});
  return sum_in_spans(
      Norms(models, {0.0, 0.0}),
      [&](std::size_t lane, std::size_t begin, std::size_t end, Norms& part) {
        task_pieces(
            lane, begin, end,
            [&](const MergeLane&, const double* const* tau, std::size_t at, std::size_t count) {
              for (const std::size_t m : summed) {
                const std::uint64_t key = keys[m];  // (in locals: stores through `part` could alias them)
                const double drop = drops[m];
                const double* t = tau[m];
                double all = part[m].first, kept = part[m].second;  // (each sum's additions in scalar order)
                for (std::size_t j = 0; j < count; ++j) {
                  const bool keep = uniform_draw(key, at + j) >= drop;  // (as the merge will draw it)
                  const double size = std::abs(t[j]);
                  if (std::isfinite(size)) {
                    all += size;
                    kept += keep ? size : 0;
                  }
                }
                part[m] = {all, kept};
              }
            });
      },
      [](Norms& total, const Norms& part) {
        for (std::size_t m = 0; m < total.size(); ++m) {
          total[m].first += part[m].first;
          total[m].second += part[m].second;
        }
      });
}

/// Sets `result` to the kept scalars of model `m` under `o` (a task-vector method), given
/// `tau_of(lane, begin, count)`, which returns model m's task values [begin, begin + count) (at most a
/// piece) in lane `lane`'s memory, and for_each_piece(body), which calls body(lane, begin, count) for
/// every piece of the tensor, spread over threads (lanes), sum_in_spans(zero, partial, add),
/// merge_tensor's sums in spans on the lanes (partial(lane, begin, end, part)), and
/// for_each_span(body), which calls body(lane, begin, end) for every span of `span` scalars (a
/// multiple of 64, or the tensor), lane < lanes, from several threads at once. `shape` gives
/// Della's rows; `work` holds the rank keys. A random method's L1 norms, where it rescales, are
/// `drawn` (drawn_norms'; the pass that sums them reads every model at once).
template <class TauOf, class ForEachPiece, class SumInSpans, class ForEachSpan>
void kept_scalars(const MergeOptions& o, std::size_t m, const std::string& name,
                  const std::vector<std::int64_t>& shape, std::size_t numel, TauOf&& tau_of,
                  ForEachPiece&& for_each_piece, SumInSpans&& sum_in_spans, std::size_t lanes,
                  std::size_t span, ForEachSpan&& for_each_span, MergeWorkspace& work,
                  const std::pair<double, double>& drawn, KeptScalars& result) {
  result.ranked = false;
  result.bits.clear();
  result.rescale = 1.0;
  result.drawn = false;
  const Sparsification rule = sparsification_of(o.method);
  const double density = o.density_of(m);
  if (rule == Sparsification::None) return;
  const bool legacy_dare = o.method == MergeMethod::Dare;
  const double drop = drawn_drop(o, m);
  if (legacy_dare) result.rescale = 1 / (1 - drop);
  if (!legacy_dare && density >= 1) return;  // everything, unrescaled
  const bool rescale = rescales_l1(o, m);
  double norm = 0, kept_norm = 0;           // the L1 norms (finite values; a NaN stays at its scalar)
  using Norms = std::pair<double, double>;  // (norm, kept_norm), as the lanes sum them
  const auto add_norms = [](Norms& total, const Norms& part) {
    total.first += part.first;
    total.second += part.second;
  };
  if (rule == Sparsification::Random) {
    // Drawn as the merge goes (counter-based draws: the same scalar, the same draw); the L1 norms of
    // the rescale are the caller's (drawn_norms).
    result.drawn = true;
    result.key = draw_key(o.seed, name, m);
    result.drop = drop;  // (density 0: drop 1, which no draw in [0, 1) reaches)
    if (rescale) std::tie(norm, kept_norm) = drawn;
  } else {
    const bool by_rank = rule == Sparsification::Magnitude || rule == Sparsification::Outliers;
    const auto kept_count = static_cast<std::size_t>(std::floor(density * static_cast<double>(numel)));
    std::size_t lo = 0, hi = 0;  // the window of ranks kept (by_rank)
    if (rule == Sparsification::Magnitude) {
      lo = numel - kept_count;
      hi = numel;
    } else if (rule == Sparsification::Outliers) {
      std::size_t top = static_cast<std::size_t>(std::floor(o.gamma * static_cast<double>(numel)));
      top = std::min(top, numel - kept_count);  // fewer from the top where both cannot be met
      lo = numel - kept_count - top;
      hi = numel - top;
    }
    // Without the rescale's norms, nothing but the window needs the keys: selected as they are
    // counted, where a sample finds their boundaries (else held, below).
    if (by_rank && !rescale &&
        rank_window_streamed(numel, lo, hi, tau_of, for_each_piece, lanes, span, for_each_span,
                             work.key_counts, work.streamed, work.keys, work.scratch, result.window)) {
      result.ranked = true;
      return;
    }
    std::vector<std::uint64_t>&magnitude = work.keys, &scratch = work.scratch;
    magnitude.resize(numel);
    if (by_rank) work.key_counts.start(lanes);  // (counted as the keys are written, for rank_window)
    for_each_piece([&](std::size_t lane, std::size_t begin, std::size_t count) {  // (each its own keys)
      const double* tau = tau_of(lane, begin, count);
      std::uint64_t* key = magnitude.data() + begin;
      for (std::size_t j = 0; j < count; ++j) key[j] = rank_key(tau[j]);
      if (!by_rank) return;
      std::size_t* counts = work.key_counts.lanes[lane].data();
      for (std::size_t j = 0; j < count; ++j) ++counts[KeyCounts::bucket(key[j])];
    });
    if (by_rank) {
      result.ranked = true;
      result.window = rank_window(magnitude, lo, hi, scratch, lanes, span, for_each_span, &work.key_counts);
    } else {  // rank sampling, row by row, the rows spread over the lanes
      const std::size_t rows =
          shape.size() >= 2 && shape[0] > 0 ? static_cast<std::size_t>(shape[0]) : std::size_t{1};
      const std::size_t columns = numel / rows;
      const std::uint64_t key = draw_key(o.seed, name, m);
      result.bits.assign((numel + 63) / 64, 0);
      // A row's kept scalars go into `bits` where the row owns the word (64 positions from a
      // multiple of 64); in the words it may share with its neighbours (at most one at each end),
      // they are marked in their keys' top bit instead, which no rank key sets (|tau| has no sign),
      // and move into `bits` afterwards, span by span. Both without a branch on the draw, which is
      // a coin toss.
      constexpr std::uint64_t kept_mark = std::uint64_t{1} << 63;
      if (work.rows.size() < lanes) work.rows.resize(lanes);
      // The draw of scalar `position` keeps it where it is at least threshold(r), r its rank in the
      // row: a function of r that is monotonic in floating point too (each step rounds monotonically).
      const auto threshold = [&](std::size_t r) {
        const double spread = columns > 1
                                  ? 2 * o.epsilon * static_cast<double>(r) / static_cast<double>(columns - 1)
                                  : o.epsilon;
        return 1 - (density - o.epsilon + spread);
      };
      const auto bit_width = [](std::uint64_t x) {
        std::size_t bits = 0;
        for (; x != 0; x >>= 1) ++bits;
        return bits;
      };
      // Buckets of keys, some 16 scalars a bucket (at most 2^14 of them: in L2): a scalar's bucket bounds its
      // rank, and the threshold at both bounds decides most draws without the rank itself.
      const std::size_t bucket_bits = std::clamp<std::size_t>(bit_width(columns), 5, 18) - 4;
      if (columns > 0 && density > 0) {  // (an empty tensor has no rows; density 0 keeps nothing)
        for_each_span([&](std::size_t lane, std::size_t begin, std::size_t end) {
          DellaRow& scratch_of_row = work.rows[lane];
          std::vector<std::size_t>&count = scratch_of_row.count, &below = scratch_of_row.below;
          std::vector<std::pair<double, double>>& draws = scratch_of_row.draws;
          std::vector<unsigned char>& unsure = scratch_of_row.unsure;
          for (std::size_t row = (begin + columns - 1) / columns; row < rows && row * columns < end; ++row) {
            std::uint64_t* v = magnitude.data() + row * columns;  // (the rows that start in the span)
            const std::size_t start = row * columns, stop = start + columns;
            const std::size_t owned_from = std::min(stop, (start + 63) / 64 * 64);  // [from, to): own words
            const std::size_t owned_to = std::max(owned_from, stop / 64 * 64);
            const auto store = [&](std::size_t at, bool kept) {  // column `at`'s decision
              const std::size_t position = start + at;
              if (position >= owned_from && position < owned_to) {
                result.bits[position / 64] |= std::uint64_t{kept} << (position % 64);
              } else {
                v[at] |= std::uint64_t{kept} << 63;  // (kept_mark where kept)
              }
            };
            std::uint64_t least = ~std::uint64_t{0}, most = 0;
            for (std::size_t c = 0; c < columns; ++c) {
              least = std::min(least, v[c]);
              most = std::max(most, v[c]);
            }
            const std::size_t width = bit_width(most - least);
            const std::size_t shift = width > bucket_bits ? width - bucket_bits : 0;
            const auto bucket_of = [&](std::uint64_t k) {
              return static_cast<std::size_t>((k - least) >> shift);
            };
            const std::size_t buckets = std::size_t{1} << bucket_bits;
            count.assign(buckets, 0);
            for (std::size_t c = 0; c < columns; ++c) ++count[bucket_of(v[c])];
            // The draws decided by their bucket's ranks [below, below + count): kept where the draw
            // reaches the threshold at both ends, not where it reaches neither; the rest wait.
            below.resize(buckets);
            draws.resize(buckets);
            for (std::size_t b = 0, at = 0; b < buckets; ++b) {
              below[b] = at;
              at += count[b];
              if (count[b] == 0) continue;
              const double at_low = threshold(below[b]), at_high = threshold(at - 1);
              draws[b] = {std::max(at_low, at_high), std::min(at_low, at_high)};
            }
            unsure.assign(buckets, 0);
            bool any_unsure = false;
            for (std::size_t c = 0; c < columns; ++c) {
              const std::size_t b = bucket_of(v[c]);
              const double u = uniform_draw(key, start + c);
              const bool kept = u >= draws[b].first;
              const bool doubtful = !kept & (u >= draws[b].second);
              unsure[b] |= static_cast<unsigned char>(doubtful);
              any_unsure |= doubtful;
              store(c, kept);
            }
            if (!any_unsure) continue;
            // The buckets with a doubtful draw, ranked exactly: their (key, column) pairs, each bucket's
            // laid out from its last column to its first and sorted stably by key (ascending
            // magnitude; equal ones the later column first, the earlier ranking higher). Every one
            // of their draws is taken again by its rank (the same decision where it was sure).
            std::vector<std::pair<std::uint64_t, std::uint64_t>>&pairs = scratch_of_row.pairs,
                                                 &ranked = scratch_of_row.ranked,
                                                 &sort_scratch = scratch_of_row.sort_scratch;
            const auto size_of = [&](std::size_t b) {
              return (b + 1 < buckets ? below[b + 1] : columns) - below[b];
            };
            std::size_t total = 0;  // count[b] becomes the end of unsure bucket b's place in `pairs`
            for (std::size_t b = 0; b < buckets; ++b) {
              if (unsure[b] != 0) count[b] = total += size_of(b);
            }
            pairs.resize(total);
            // Filled from each place's end, the first column first: a bucket's pairs run from its last
            // column to its first, and count[b] ends at its place's start.
            for (std::size_t c = 0; c < columns; ++c) {
              const std::uint64_t k = v[c] & ~kept_mark;
              const std::size_t b = bucket_of(k);
              if (unsure[b] != 0) pairs[--count[b]] = {k, c};
            }
            for (std::size_t b = 0; b < buckets; ++b) {
              if (unsure[b] == 0) continue;
              const auto first = pairs.begin() + static_cast<std::ptrdiff_t>(count[b]);
              ranked.assign(first, first + static_cast<std::ptrdiff_t>(size_of(b)));
              stable_sort_by_key(ranked, sort_scratch);
              for (std::size_t i = 0; i < ranked.size(); ++i) {
                const auto at = static_cast<std::size_t>(ranked[i].second);
                store(at, uniform_draw(key, start + at) >= threshold(below[b] + i));
              }
            }
          }
        });
      }
      for_each_span([&](std::size_t, std::size_t begin, std::size_t end) {  // (spans share no word)
        for (std::size_t p = begin; p < end; ++p) {
          if (magnitude[p] & kept_mark) {  // (a rare branch: marks lie in the rows' shared words only)
            magnitude[p] &= ~kept_mark;
            result.bits[p / 64] |= std::uint64_t{1} << (p % 64);
          }
        }
      });
    }
    if (rescale) {  // the L1 norms (only where they are used), summed in spans
      const Norms norms = sum_in_spans(
          Norms{0.0, 0.0},
          [&](std::size_t, std::size_t begin, std::size_t end, Norms& part) {
            double all = 0, kept = 0;
            for (std::size_t p = begin; p < end; ++p) {
              double size = 0;
              if (finite_magnitude(magnitude[p], size)) {
                all += size;
                kept += kept_or_zero(result.ranked ? result.window.contains(magnitude[p], p) : result.bit(p),
                                     size);
              }
            }
            part = {all, kept};
          },
          add_norms);
      std::tie(norm, kept_norm) = norms;
    }
  }
  if (rescale && norm >= 1e-7 && kept_norm >= 1e-7) result.rescale = norm / kept_norm;
}

}  // namespace detail

}  // namespace polyak
