// SPDX-License-Identifier: MIT
// StateDict: a checkpoint in memory, named owned tensors plus string metadata. What every polyak
// type's state_dict() returns and load_state_dict() takes; polyak/serialization.hpp writes and reads
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

#include "polyak/error.hpp"
#include "polyak/scalar_type.hpp"
#include "polyak/tensor_view.hpp"

namespace polyak {

/// One owned tensor of a checkpoint: element type, logical shape, and its elements in row-major
/// order as little-endian bytes.
struct StoredTensor {
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;

  std::size_t numel() const {
    std::size_t n = 1;
    for (const auto extent : shape) n *= static_cast<std::size_t>(extent);
    return n;
  }
};

namespace detail {

/// Calls visit(i, value) with each element of `t` as a double, row-major.
template <class Visit>
void for_each_double(const StoredTensor& t, Visit&& visit) {
  with_scalar_type(t.dtype, [&](auto zero) {
    using T = decltype(zero);
    const std::size_t n = t.numel();
    for (std::size_t i = 0; i < n; ++i) {
      T v;
      std::memcpy(&v, t.bytes.data() + i * sizeof(T), sizeof(T));
      visit(i, static_cast<double>(v));
    }
  });
}

}  // namespace detail

/// The elements of `t` as doubles, row-major; exact for every dtype (for I64 up to 2^53).
inline std::vector<double> to_doubles(const StoredTensor& t) {
  std::vector<double> out(t.numel());
  detail::for_each_double(t, [&](std::size_t i, double v) { out[i] = v; });
  return out;
}

/// Stores `values` (row-major, t.numel() of them) into `t`, each rounded once to t's dtype.
inline void assign_doubles(StoredTensor& t, const std::vector<double>& values) {
  if (values.size() != t.numel())
    throw InvalidArgument("polyak::assign_doubles: " + std::to_string(values.size()) + " values for " +
                          std::to_string(t.numel()) + " elements");
  t.bytes.resize(values.size() * dtype_size(t.dtype));
  detail::with_scalar_type(t.dtype, [&](auto zero) {
    using T = decltype(zero);
    for (std::size_t i = 0; i < values.size(); ++i) {
      T v;
      if constexpr (std::is_same_v<T, std::int64_t>) {
        v = static_cast<std::int64_t>(std::llround(values[i]));
      } else if constexpr (std::is_same_v<T, double>) {
        v = values[i];
      } else if constexpr (std::is_same_v<T, float>) {
        v = static_cast<float>(values[i]);
      } else {  // half, bfloat16: Eigen converts from float; double -> float -> 16 bits can double-round
        v = static_cast<T>(values[i]);
      }
      std::memcpy(t.bytes.data() + i * sizeof(T), &v, sizeof(T));
    }
  });
}

namespace detail {

static_assert(sizeof(float) == 4 && sizeof(double) == 8 && std::numeric_limits<float>::is_iec559,
              "polyak's checkpoints assume IEEE float and double");

inline bool little_endian() {
  const std::uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

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

/// An ordered map of name to StoredTensor, plus string metadata: what state_dict() returns and
/// save_safetensors writes. Names keep the order they were added in.
class StateDict {
 public:
  using Entry = std::pair<std::string, StoredTensor>;

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

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  std::size_t size() const noexcept { return entries_.size(); }

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
      throw FormatError("polyak: '" + name + "' has shape " + shape_string(t.shape) + ", expected " +
                        shape_string(shape));
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
    detail::for_each_row_major(shape, order, [&](std::size_t i, std::size_t to) {
      std::memcpy(data + to, t.bytes.data() + i * sizeof(T), sizeof(T));
    });
  }

  /// The value of a one-element tensor of T.
  template <class T>
  T scalar(const std::string& name) const {
    const StoredTensor& t = expect<T>(name, {});
    T value;
    std::memcpy(&value, t.bytes.data(), sizeof(T));
    return value;
  }

  std::vector<Entry>::const_iterator begin() const noexcept { return entries_.begin(); }
  std::vector<Entry>::const_iterator end() const noexcept { return entries_.end(); }

  std::map<std::string, std::string> metadata;

 private:
  std::vector<Entry> entries_;
  std::map<std::string, std::size_t> index_;
};

}  // namespace polyak
