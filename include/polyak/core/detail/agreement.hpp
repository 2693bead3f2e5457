// SPDX-License-Identifier: MIT
// Agreement across the members of a communicator before anyone acts: the layout of parameter lists
// (names, scalar types, storage orders, shapes), a value every member must hold alike, and each
// member's local problems, so that a refusal reaches every member as the same exception and no
// member is left waiting in a collective. Used by the averagers (model_averaging.hpp), ShardView and
// the distributed checkpoints.
#pragma once

#include <cstddef>  // std::size_t, std::ptrdiff_t
#include <cstdint>  // std::uint64_t
#include <stdexcept>
#include <string>  // std::char_traits: lengths of scalar type names
#include <vector>

#include "polyak/core/detail/number_text.hpp"  // exactly_equal
#include "polyak/core/detail/tensor_spec.hpp"  // first_mismatch
#include "polyak/core/error.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {
namespace detail {

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

/// " of rank 2" / "s of ranks 1, 3": a phrase naming one rank or several.
inline std::string ranks_phrase(const std::string& ranks, const char* one, const char* several) {
  return (ranks.find(',') == std::string::npos ? one : several) + ranks;
}

/// Collective: each member's problem ("" for none) in; "" out when no member has one, else one
/// message for every member naming the ranks that have one and, here, this member's own. The rule
/// every collective decision follows: what one member finds wrong, all learn before any acts.
template <class Comm>
std::string problems_of_all(Comm& comm, const std::string& problem) {
  std::vector<double> flags(static_cast<std::size_t>(comm.size()), 0.0);
  flags[static_cast<std::size_t>(comm.rank())] = problem.empty() ? 0.0 : 1.0;
  comm.allreduce_sum(flags.data(), flags.size());
  const std::string ranks = rank_list(flags);
  if (ranks.empty()) return "";
  return ranks_phrase(ranks, "rank ", "ranks ") + " failed" + (problem.empty() ? "" : "; here: " + problem);
}

/// Where a tensor of one list shares memory with a tensor of an earlier list of the same call, what
/// to refuse ("" for none): it would be averaged twice. Allocates nothing when there is none.
template <class T>
const std::string* overlapping_in(const void* list, const void* begin, std::size_t bytes) {
  return static_cast<const ParameterList<T>*>(list)->overlapping(begin, bytes);
}
template <class... Ts>
std::string shared_across_lists(const ParameterList<Ts>&... lists) {
  constexpr std::size_t count = sizeof...(Ts);
  if constexpr (count < 2) {
    return {};
  } else {
    const void* const addresses[count] = {static_cast<const void*>(&lists)...};
    const std::string* (*const queries[count])(const void*, const void*,
                                               std::size_t) = {&overlapping_in<Ts>...};
    std::string problem;
    std::size_t j = 0;
    const auto against_earlier = [&](const auto& list) {
      for (const auto& tensor : list) {
        const std::size_t bytes = tensor.numel() * sizeof(*tensor.data());
        for (std::size_t i = 0; i < j && problem.empty(); ++i) {
          if (const std::string* other = queries[i](addresses[i], tensor.data(), bytes)) {
            problem = "tensor '" + tensor.name() + "' of list " + std::to_string(j + 1) +
                      " shares memory with tensor '" + *other + "' of list " + std::to_string(i + 1) +
                      ": it would be averaged twice; list a tensor once";
          }
        }
      }
      ++j;
    };
    (against_earlier(lists), ...);
    return problem;
  }
}

/// "F32, BF16": the scalar types of the lists of a call, empty ones too (they set the type
/// the values travel in, which every member must share).
template <class... Ts>
std::string list_types() {
  std::string types;
  ((types += (types.empty() ? "" : ", ") + std::string(dtype_name(dtype_of<Ts>()))), ...);
  return types;
}

/// Collective: returns when every member passed lists of the same layout (names, scalar types,
/// storage orders, shapes, in order; lists of the same scalar types, empty ones too), views whose
/// storage has not moved, no tensor in two of its lists, and no `refusal` of its own (a member's
/// local reason not to go on: "" for none); otherwise throws InvalidArgument on every
/// member, before any value moves, naming the ranks that refused, differ from rank 0 or hold stale
/// views and, on each of them, its own problem. So that a local failure is never a lone throw beside
/// a peer waiting in the collective, a caller finds its local reasons first and passes them here.
///
/// The common case costs one allreduce of 18 doubles and allocates nothing: each member's layout hash
/// as put_agreement writes it, a flag for a stale view, a flag for a refusal. Only when they disagree,
/// rank 0's description is broadcast (through allreduce_sum: the other members add zeros) so that
/// each member can find its own first difference.
template <class Comm, class... Ts>
void check_same_layout(Comm& comm, const char* where, const std::string& refusal,
                       const ParameterList<Ts>&... lists) {
  LayoutHash hash;
  (describe(hash, lists), ...);
  const char* const types[] = {dtype_name(dtype_of<Ts>())..., ""};
  for (const char* type : types) hash.put(type, std::char_traits<char>::length(type) + 1);  // (with its NUL)
  std::string stale;
  ((stale = stale.empty() ? lists.stale_view() : stale), ...);
  const std::string shared = refusal.empty() ? shared_across_lists(lists...) : std::string();
  const std::string& refused_here = refusal.empty() ? shared : refusal;

  double sums[agreement_doubles + 2] = {};
  put_agreement(hash.value, sums);
  sums[agreement_doubles] = stale.empty() ? 0.0 : 1.0;
  sums[agreement_doubles + 1] = refused_here.empty() ? 0.0 : 1.0;
  comm.allreduce_sum(sums, agreement_doubles + 2);
  const bool same_layout = agreed(sums, comm.size()) && sums[agreement_doubles] < 0.5;
  if (same_layout && sums[agreement_doubles + 1] < 0.5) return;

  // Every member is here and saw the same sums. Where the layouts differ, rank 0's description, to
  // every member, for each to find its own first difference.
  const std::string label = "rank " + std::to_string(comm.rank());
  std::string difference = stale;
  if (!same_layout) {
    LayoutBytes mine;
    (describe(mine, lists), ...);
    const std::string reference_bytes = text_of_rank0(comm, mine.bytes);
    bool complete = false;
    const std::vector<DescribedTensor> reference = read_description(reference_bytes, complete);
    bool own_complete = false;
    const std::vector<DescribedTensor> own = read_description(mine.bytes, own_complete);
    if (difference.empty()) {
      difference = first_mismatch(
          own.size(), [&](std::size_t i) { return own[i].spec(); }, label, reference.size(),
          [&](std::size_t i) { return reference[i].spec(); }, "rank 0");
      if (difference.empty() && !complete) difference = "rank 0's description of its list could not be read";
    }
    const std::string reference_types = text_of_rank0(comm, list_types<Ts...>());
    if (difference.empty() && reference_types != list_types<Ts...>()) {
      difference = label + " passed lists of " + list_types<Ts...>() + " where rank 0 passed lists of " +
                   reference_types + " (empty ones count: they set the type the values travel in)";
    }
  }
  const std::size_t size = static_cast<std::size_t>(comm.size()),
                    rank = static_cast<std::size_t>(comm.rank());
  std::vector<double> flags(3 * size, 0.0);
  flags[rank] = !difference.empty() && stale.empty() ? 1.0 : 0.0;
  flags[size + rank] = stale.empty() ? 0.0 : 1.0;
  flags[2 * size + rank] = refused_here.empty() ? 0.0 : 1.0;
  comm.allreduce_sum(flags.data(), flags.size());
  const auto ranks_of = [&](std::size_t kind) {
    return rank_list(std::vector<double>(flags.begin() + static_cast<std::ptrdiff_t>(kind * size),
                                         flags.begin() + static_cast<std::ptrdiff_t>((kind + 1) * size)));
  };
  const std::string listed = ranks_of(0), moved = ranks_of(1), refused = ranks_of(2);

  std::vector<std::string> parts;
  if (!refused.empty()) parts.push_back(ranks_phrase(refused, "rank ", "ranks ") + " could not go on");
  if (!listed.empty()) {
    parts.push_back("the list" + ranks_phrase(listed, " of rank ", "s of ranks ") +
                    (listed.find(',') == std::string::npos ? " differs" : " differ") + " from rank 0's");
  }
  if (!moved.empty())
    parts.push_back("views on " + ranks_phrase(moved, "rank ", "ranks ") + " point at storage that moved");
  std::string message = std::string("polyak::") + where + ": nothing was averaged:";
  for (std::size_t i = 0; i < parts.size(); ++i) message += (i == 0 ? " " : "; ") + parts[i];
  if (!refused_here.empty()) message += "; here, on " + label + ": " + refused_here;
  if (!difference.empty()) message += "; here, on " + label + ": " + difference;
  throw InvalidArgument(message);
}

/// The layout hash of lists, as check_same_layout computes it.
template <class... Ts>
std::uint64_t layout_hash(const ParameterList<Ts>&... lists) {
  LayoutHash hash;
  (describe(hash, lists), ...);
  return hash.value;
}

}  // namespace detail
}  // namespace polyak
