// SPDX-License-Identifier: MIT
// StateDict: a checkpoint in memory, named owned tensors plus string metadata. What every polyak
// type's state_dict() returns and load_state_dict() takes; polyak/checkpoint/safetensors.hpp writes and reads
// it as safetensors.
#pragma once

#include <algorithm>  // std::sort
#include <cmath>      // std::llround
#include <cstddef>    // std::size_t, std::byte
#include <cstdint>
#include <cstring>  // std::memcpy
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "polyak/core/detail/number_text.hpp"
#include "polyak/core/error.hpp"
#include "polyak/core/scalar_type.hpp"
#include "polyak/core/tensor_view.hpp"

namespace polyak {

namespace detail {

/// For each row-major index of `shape`, the offset of that element in `order` storage.
template <class Visit>
void for_each_row_major(const std::vector<std::int64_t>& shape, StorageOrder order, Visit&& visit) {
  std::size_t numel = 1;
  for (const auto extent : shape) numel *= static_cast<std::size_t>(extent);
  if (order == StorageOrder::RowMajor || shape.size() <= 1) {
    for (std::size_t i = 0; i < numel; ++i) visit(i, i);
    return;
  }
  // Column-major strides; walk the row-major index like an odometer, last dimension fastest.
  std::vector<std::size_t> stride(shape.size()), index(shape.size(), 0);
  std::size_t s = 1;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    stride[d] = s;
    s *= static_cast<std::size_t>(shape[d]);
  }
  std::size_t offset = 0;
  for (std::size_t i = 0; i < numel; ++i) {
    visit(i, offset);
    for (std::size_t d = shape.size(); d-- > 0;) {
      if (++index[d] < static_cast<std::size_t>(shape[d])) {
        offset += stride[d];
        break;
      }
      offset -= stride[d] * (index[d] - 1);
      index[d] = 0;
    }
  }
}

}  // namespace detail

/// One tensor of a checkpoint: element type, logical shape, and its elements in row-major order as
/// little-endian bytes. It owns them (`bytes`), or borrows them from the memory of a view
/// (`StoredTensor::borrow`, what state_dict() of a live object returns: as PyTorch's state_dict(),
/// whose tensors share the module's storage, it copies nothing and shows the object's values at the
/// time it is read). A borrowed tensor's `bytes` is empty; read it with elements(), contiguous() or
/// for_each_chunk(), which serve both kinds, or make an owning copy with owned().
struct StoredTensor {
  DType dtype = DType::F32;         ///< the element type
  std::vector<std::int64_t> shape;  ///< the logical shape
  std::vector<std::byte> bytes;     ///< owned elements, row-major; empty while borrowed

  /// Where a borrowed tensor's elements live, in `borrowed_order`; null for an owned one.
  const std::byte* borrowed = nullptr;
  StorageOrder borrowed_order = StorageOrder::RowMajor;  ///< how the borrowed elements lie

  /// Borrows the elements of a tensor of `shape` stored at `data` in `order`; valid while that memory
  /// is. An empty tensor owns its (no) elements.
  template <class T>
  static StoredTensor borrow(const T* data, std::vector<std::int64_t> shape,
                             StorageOrder order = StorageOrder::RowMajor) {
    StoredTensor t;
    t.dtype = dtype_of<T>();
    t.shape = std::move(shape);
    if (t.numel() != 0) {
      t.borrowed = reinterpret_cast<const std::byte*>(data);
      t.borrowed_order = t.shape.size() <= 1 ? StorageOrder::RowMajor : order;
    }
    return t;
  }

  /// The element count: the product of the shape.
  std::size_t numel() const {
    std::size_t n = 1;
    for (const auto extent : shape) n *= static_cast<std::size_t>(extent);
    return n;
  }
  /// The elements' bytes.
  std::size_t byte_size() const { return numel() * dtype_size(dtype); }
  /// Whether it borrows its elements.
  bool is_borrowed() const noexcept { return borrowed != nullptr; }

  /// The row-major bytes in one piece, without a copy: `bytes`, or borrowed row-major memory;
  /// null for a borrowed column-major tensor of two or more dimensions (see for_each_chunk).
  const std::byte* contiguous() const noexcept {
    if (!is_borrowed()) return bytes.data();
    return borrowed_order == StorageOrder::RowMajor ? borrowed : nullptr;
  }

  /// Calls visit(i, element) with a pointer to each element's dtype_size(dtype) bytes, in row-major
  /// order i, whether owned or borrowed.
  template <class Visit>
  void elements(Visit&& visit) const {
    const std::size_t size = dtype_size(dtype);
    if (const std::byte* base = contiguous()) {
      const std::size_t n = numel();
      for (std::size_t i = 0; i < n; ++i) visit(i, base + i * size);
      return;
    }
    detail::for_each_row_major(shape, borrowed_order,
                               [&](std::size_t i, std::size_t from) { visit(i, borrowed + from * size); });
  }

  /// Calls visit(pointer, length) with the row-major bytes in order: once with all of them where
  /// contiguous(), else in pieces of about 64 KiB reordered into one buffer (all a writer needs).
  template <class Visit>
  void for_each_chunk(Visit&& visit) const {
    if (const std::byte* base = contiguous()) {
      visit(base, byte_size());
      return;
    }
    const std::size_t size = dtype_size(dtype);
    const std::size_t per_chunk = std::max<std::size_t>(1, (std::size_t{64} << 10) / size);
    std::vector<std::byte> chunk(std::min(per_chunk, numel()) * size);
    std::size_t filled = 0;
    elements([&](std::size_t, const std::byte* element) {
      std::memcpy(chunk.data() + filled * size, element, size);
      if (++filled == per_chunk) {
        visit(static_cast<const std::byte*>(chunk.data()), filled * size);
        filled = 0;
      }
    });
    if (filled != 0) visit(static_cast<const std::byte*>(chunk.data()), filled * size);
  }

  /// A copy that owns its elements (row-major bytes).
  StoredTensor owned() const {
    StoredTensor out;
    out.dtype = dtype;
    out.shape = shape;
    if (!is_borrowed()) {
      out.bytes = bytes;
      return out;
    }
    out.bytes.resize(byte_size());
    std::size_t at = 0;
    for_each_chunk([&](const std::byte* data, std::size_t length) {
      std::memcpy(out.bytes.data() + at, data, length);
      at += length;
    });
    return out;
  }
};

namespace detail {

/// `count` elements of `dtype` at `in` as doubles (exact for every dtype; I64 up to 2^53).
inline void bytes_to_doubles(DType dtype, const std::byte* in, std::size_t count, double* out) {
  // (captured by value: a byte store may alias a captured reference, which the compiler would then
  // reload every element instead of vectorizing the loop)
  with_scalar_type(dtype, [in, count, out](auto zero) {
    using T = decltype(zero);
    for (std::size_t i = 0; i < count; ++i) {
      T v;
      std::memcpy(&v, in + i * sizeof(T), sizeof(T));
      out[i] = static_cast<double>(v);
    }
  });
}

/// `value` as a float rounded to odd: toward zero, the last bit set where that was inexact. Rounding
/// it on to half or bfloat16 (to nearest, even) gives `value` rounded once to those: a float keeps
/// more than two bits beyond theirs, and the odd last bit says the value was not exactly a float
/// (so a value just past a halfway point is not taken for the halfway point itself).
inline float float_rounded_to_odd(double value) {
  float f = static_cast<float>(value);  // nearest
  if (!std::isfinite(value) || exactly_equal(static_cast<double>(f), value)) return f;
  if (std::abs(static_cast<double>(f)) > std::abs(value)) f = std::nextafter(f, 0.0f);  // toward zero
  std::uint32_t bits = 0;
  std::memcpy(&bits, &f, sizeof bits);
  bits |= 1u;
  std::memcpy(&f, &bits, sizeof bits);
  return f;
}

/// `count` doubles rounded once to `dtype` (I64 to the nearest integer; half and bfloat16 through a
/// float rounded to odd, float_rounded_to_odd), into `out`.
inline void doubles_to_bytes(DType dtype, const double* in, std::size_t count, std::byte* out) {
  with_scalar_type(dtype, [in, count, out](auto zero) {  // (by value, as bytes_to_doubles)
    using T = decltype(zero);
    // In blocks through an array of T: a loop of stores into bytes is not vectorized, a conversion
    // into an array and one copy of it are.
    constexpr std::size_t block = 64;
    T converted[block];
    for (std::size_t begin = 0; begin < count; begin += block) {
      const std::size_t n = std::min(block, count - begin);
      const double* from = in + begin;
      for (std::size_t i = 0; i < n; ++i) {
        if constexpr (std::is_same_v<T, std::int64_t>) {
          converted[i] = static_cast<std::int64_t>(std::llround(from[i]));
        } else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
          converted[i] = static_cast<T>(from[i]);
        } else {
          converted[i] = static_cast<T>(float_rounded_to_odd(from[i]));
        }
      }
      std::memcpy(out + begin * sizeof(T), converted, n * sizeof(T));
    }
  });
}

/// Calls visit(i, value) with each element of `t` as a double, row-major.
template <class Visit>
void for_each_double(const StoredTensor& t, Visit&& visit) {
  with_scalar_type(t.dtype, [&](auto zero) {
    using T = decltype(zero);
    t.elements([&](std::size_t i, const std::byte* element) {
      T v;
      std::memcpy(&v, element, sizeof(T));
      visit(i, static_cast<double>(v));
    });
  });
}

}  // namespace detail

/// The elements of `t` as doubles, row-major; exact for every dtype (for I64 up to 2^53).
inline std::vector<double> to_doubles(const StoredTensor& t) {
  std::vector<double> out(t.numel());
  detail::for_each_double(t, [&](std::size_t i, double v) { out[i] = v; });
  return out;
}

namespace detail {

/// Stores `values` (row-major, t.numel() of them) into `t`, each rounded once to t's dtype; `t`
/// then owns its elements (a borrowed tensor's memory is not written).
inline void assign_doubles(StoredTensor& t, const std::vector<double>& values) {
  if (values.size() != t.numel())
    throw InvalidArgument("polyak::detail::assign_doubles: " + std::to_string(values.size()) +
                          " values for " + std::to_string(t.numel()) + " elements");
  t.borrowed = nullptr;
  t.borrowed_order = StorageOrder::RowMajor;
  t.bytes.resize(values.size() * dtype_size(t.dtype));
  detail::doubles_to_bytes(t.dtype, values.data(), values.size(), t.bytes.data());
}

}  // namespace detail

namespace detail {

static_assert(sizeof(float) == 4 && sizeof(double) == 8 && std::numeric_limits<float>::is_iec559,
              "polyak's checkpoints assume IEEE float and double");

inline bool little_endian() {
  const std::uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

}  // namespace detail

/// An ordered map of name to StoredTensor, plus string metadata: what state_dict() returns and
/// save_safetensors writes. Names keep the order they were added in.
///
/// Entries own their elements or borrow them (borrow()): state_dict() of an object that holds
/// tensors (AveragedModel, BatchNormStats) borrows them, as PyTorch's state_dict() shares storage,
/// so it copies nothing and save_safetensors streams the object's memory to disk. Such a StateDict
/// shows the object's values when it is read, and lives no longer than the object: keep a snapshot
/// with owned() (PyTorch's copy.deepcopy(state_dict)).
class StateDict {
 public:
  using Entry = std::pair<std::string, StoredTensor>;  ///< a name and its tensor

  /// Adds a tensor; a name already present is refused.
  void insert(std::string name, StoredTensor tensor) {
    if (name.empty() || name == "__metadata__")
      throw InvalidArgument("polyak::StateDict: invalid name '" + name + "'");
    if (index_.count(name)) throw InvalidArgument("polyak::StateDict: '" + name + "' is already in it");
    index_[name] = entries_.size();
    entries_.emplace_back(std::move(name), std::move(tensor));
  }

  /// Copies a view's elements in, in row-major order whatever its storage order.
  template <class T>
  void insert(std::string name, const TensorView<T>& view) {
    insert(std::move(name), view.data(), view.shape(), view.storage_order());
  }

  /// Adds a view's elements without copying them: the entry reads the view's memory, which must
  /// outlive this StateDict (and its copies) and not be resized.
  template <class T>
  void borrow(std::string name, const TensorView<T>& view) {
    insert(std::move(name), StoredTensor::borrow(view.data(), view.shape(), view.storage_order()));
  }

  /// A copy whose every entry owns its elements: a snapshot that no later change of the objects
  /// borrowed from can alter.
  StateDict owned() const {
    StateDict out;
    for (const auto& [name, tensor] : entries_) out.insert(name, tensor.owned());
    out.metadata = metadata;
    return out;
  }

  /// Copies `data` in: the elements of a tensor of `shape` stored in `order` (row-major by default),
  /// of any type dtype_of knows (std::int64_t too).
  template <class T>
  void insert(std::string name, const T* data, std::vector<std::int64_t> shape,
              StorageOrder order = StorageOrder::RowMajor) {
    StoredTensor t;
    t.dtype = dtype_of<T>();
    t.shape = std::move(shape);
    t.bytes.resize(t.numel() * sizeof(T));
    detail::for_each_row_major(t.shape, order, [&](std::size_t i, std::size_t from) {
      std::memcpy(t.bytes.data() + i * sizeof(T), data + from, sizeof(T));
    });
    insert(std::move(name), std::move(t));
  }

  /// A one-element tensor of shape [], for counters and settings.
  template <class T>
  void insert_scalar(std::string name, T value) {
    StoredTensor t;
    t.dtype = dtype_of<T>();
    t.bytes.resize(sizeof(T));
    std::memcpy(t.bytes.data(), &value, sizeof(T));
    insert(std::move(name), std::move(t));
  }

  /// Adds every entry and metadata item of `other`, names prefixed.
  void merge(const std::string& prefix, const StateDict& other) {
    for (const auto& [name, tensor] : other) insert(prefix + name, tensor);
    for (const auto& [key, value] : other.metadata) metadata[prefix + key] = value;
  }

  /// The entries and metadata whose names start with `prefix`, without it.
  StateDict extract(const std::string& prefix) const {
    StateDict out;
    for (const auto& [name, tensor] : entries_) {
      if (name.compare(0, prefix.size(), prefix) == 0) out.insert(name.substr(prefix.size()), tensor);
    }
    for (const auto& [key, value] : metadata) {
      if (key.compare(0, prefix.size(), prefix) == 0) out.metadata[key.substr(prefix.size())] = value;
    }
    return out;
  }

  /// Whether it holds a tensor named `name`.
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  /// How many tensors it holds.
  std::size_t size() const noexcept { return entries_.size(); }

  /// The tensor named `name`; FormatError when there is none.
  const StoredTensor& at(const std::string& name) const {
    const auto found = index_.find(name);
    if (found == index_.end()) throw FormatError("polyak: the state has no tensor '" + name + "'");
    return entries_[found->second].second;
  }

  /// Checks that `name` holds a tensor of T with `shape`, naming what differs.
  template <class T>
  const StoredTensor& expect(const std::string& name, const std::vector<std::int64_t>& shape) const {
    const StoredTensor& t = at(name);
    if (t.dtype != dtype_of<T>()) {
      throw FormatError("polyak: '" + name + "' is " + dtype_name(t.dtype) + ", expected " +
                        dtype_name(dtype_of<T>()));
    }
    if (t.shape != shape) {
      throw FormatError("polyak: '" + name + "' has shape " + detail::shape_string(t.shape) + ", expected " +
                        detail::shape_string(shape));
    }
    return t;
  }

  /// Copies `name` into a view of the same dtype and shape, in the view's storage order.
  template <class T>
  void copy_to(const std::string& name, const TensorView<T>& view) const {
    copy_to(name, view.data(), view.shape(), view.storage_order());
  }

  /// Copies `name`, which must be of T and `shape`, into `data` stored in `order`.
  template <class T>
  void copy_to(const std::string& name, T* data, const std::vector<std::int64_t>& shape,
               StorageOrder order = StorageOrder::RowMajor) const {
    const StoredTensor& t = expect<T>(name, shape);
    if (order == StorageOrder::RowMajor || shape.size() <= 1) {  // (memmove: it may borrow `data` itself)
      t.for_each_chunk([&, at = std::size_t{0}](const std::byte* from, std::size_t length) mutable {
        std::memmove(reinterpret_cast<std::byte*>(data) + at, from, length);
        at += length;
      });
      return;
    }
    std::vector<std::byte> row_major;  // a tensor borrowed from `data` must be read before it is written
    const std::byte* from = t.contiguous();
    if (from == nullptr || from == reinterpret_cast<const std::byte*>(data)) {
      row_major = t.owned().bytes;
      from = row_major.data();
    }
    detail::for_each_row_major(shape, order, [&](std::size_t i, std::size_t to) {
      std::memcpy(data + to, from + i * sizeof(T), sizeof(T));
    });
  }

  /// The value of a one-element tensor of T.
  template <class T>
  T scalar(const std::string& name) const {
    const StoredTensor& t = expect<T>(name, {});
    T value;
    t.elements([&](std::size_t, const std::byte* element) { std::memcpy(&value, element, sizeof(T)); });
    return value;
  }

  /// The entries, in the order inserted.
  std::vector<Entry>::const_iterator begin() const noexcept { return entries_.begin(); }
  /// The end of the entries.
  std::vector<Entry>::const_iterator end() const noexcept { return entries_.end(); }

  /// Text settings beside the tensors (a safetensors file's __metadata__): the averaging function's
  /// settings, say.
  std::map<std::string, std::string> metadata;

 private:
  std::vector<Entry> entries_;
  std::map<std::string, std::size_t> index_;
};

}  // namespace polyak
