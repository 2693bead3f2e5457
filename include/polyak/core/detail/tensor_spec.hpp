// SPDX-License-Identifier: MIT
// The one "first difference between two tensor lists": what AveragedModel, the model averagers
// (across ranks) and the post-hoc EMA reconstruction (across snapshot files) ask before they combine
// tensors element by element.
#pragma once

#include <algorithm>  // std::equal
#include <cstddef>    // std::size_t
#include <cstdint>    // std::int64_t
#include <string>
#include <string_view>
#include <vector>

#include "polyak/core/tensor_view.hpp"  // StorageOrder, shape_string

namespace polyak {
namespace detail {

/// One tensor as two lists are compared, borrowed from its list (nothing is copied). A field left
/// empty ("" for scalar and kind) is not compared.
struct TensorSpec {
  std::string_view name;
  const std::int64_t* shape = nullptr;
  std::size_t rank = 0;
  StorageOrder order = StorageOrder::RowMajor;  // compared for tensors of two or more dimensions
  std::string_view scalar;                      // "F32", "BF16", ...
  std::string_view kind;                        // "parameter" or "buffer"
};

/// The spec of a ParameterList entry (its kind; its scalar type is the list's, not compared).
template <class T>
TensorSpec spec_of(const NamedTensor<T>& entry) {
  return {entry.name(),
          entry.shape().data(),
          entry.shape().size(),
          entry.storage_order(),
          {},
          entry.is_buffer() ? "buffer" : "parameter"};
}

inline std::string shape_string(const TensorSpec& spec) {
  return polyak::detail::shape_string(std::vector<std::int64_t>(spec.shape, spec.shape + spec.rank));
}

/// The first difference between list A (`count_a` tensors, spec_a(i) the i-th, called `label_a` in
/// the message) and list B, in order: a name, a kind, a shape, a storage order or a scalar type, or
/// the count, the count first where it differs (a module with one layer more is that, not a name
/// mismatch somewhere). "" when they match, without allocating. Phrased for B as the reference:
///     tensor 1 'bias' is named 'b' where <label_b> has 'bias'
///     tensor 0 'weight' has shape [4, 3] where <label_b> has [3, 4]
///     <label_a> has 5 tensors, <label_b> 4: the first extra one is 'extra'
///     <label_a> has 12 tensors, <label_b> 10; the first difference: tensor 8 'fc.weight' is named ...
template <class SpecA, class SpecB>
std::string first_mismatch(std::size_t count_a, const SpecA& spec_a, std::string_view label_a,
                           std::size_t count_b, const SpecB& spec_b, std::string_view label_b) {
  const auto text = [](std::string_view s) { return std::string(s); };
  const std::size_t common = count_a < count_b ? count_a : count_b;
  for (std::size_t i = 0; i < common; ++i) {
    const TensorSpec a = spec_a(i), b = spec_b(i);
    std::string problem;  // built only once something differs: a match allocates nothing
    if (a.name != b.name) {
      problem = "is named '" + text(a.name) + "' where " + text(label_b) + " has '" + text(b.name) + "'";
    } else if (!a.kind.empty() && !b.kind.empty() && a.kind != b.kind) {
      problem =
          "is a " + text(a.kind) + " in " + text(label_a) + " and a " + text(b.kind) + " in " + text(label_b);
    } else if (a.rank != b.rank || !std::equal(a.shape, a.shape + a.rank, b.shape)) {
      problem = "has shape " + shape_string(a) + " where " + text(label_b) + " has " + shape_string(b);
    } else if (a.rank > 1 && a.order != b.order) {
      problem = "has another storage order (row- vs column-major) than " + text(label_b);
    } else if (!a.scalar.empty() && !b.scalar.empty() && a.scalar != b.scalar) {
      problem = "is " + text(a.scalar) + " where " + text(label_b) + " has " + text(b.scalar);
    }
    if (!problem.empty()) {
      const std::string difference = "tensor " + std::to_string(i) + " '" + text(b.name) + "' " + problem;
      if (count_a == count_b) return difference;
      return text(label_a) + " has " + std::to_string(count_a) + " tensors, " + text(label_b) + " " +
             std::to_string(count_b) + "; the first difference: " + difference;
    }
  }
  if (count_a != count_b) {
    const bool extra = count_a > count_b;
    const TensorSpec first = extra ? spec_a(common) : spec_b(common);
    return text(label_a) + " has " + std::to_string(count_a) + " tensors, " + text(label_b) + " " +
           std::to_string(count_b) + ": the first " + (extra ? "extra" : "missing") + " one is '" +
           text(first.name) + "'";
  }
  return {};
}

}  // namespace detail
}  // namespace polyak
