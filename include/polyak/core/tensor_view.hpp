// SPDX-License-Identifier: MIT
// Non-owning, named views onto the training code's own tensors.
//
// A TensorView is a pointer, a logical shape and a storage order. A ParameterList is the ordered,
// named list of views that stands for a model: polyak never owns or copies the training code's
// tensors, it reads and writes them through these views.
#pragma once

#include <cstddef>   // std::size_t, std::ptrdiff_t
#include <cstdint>   // std::int64_t, std::uintptr_t
#include <iterator>  // std::prev
#include <limits>
#include <map>        // ParameterList's memory ranges, to refuse tensors that share memory
#include <memory>     // std::shared_ptr: a ViewSource's keep_alive
#include <stdexcept>  // std::invalid_argument
#include <string>
#include <type_traits>
#include <utility>  // std::move
#include <vector>

#include <Eigen/Core>

#include "polyak/core/error.hpp"
#include "polyak/core/detail/eigen_tensor_fwd.hpp"  // Eigen::Tensor, Eigen::TensorMap, without their module
#include "polyak/core/scalar_type.hpp"

namespace polyak {

/// How a tensor's elements are laid out in memory. PyTorch, libtorch and safetensors are row-major;
/// Eigen's Matrix and Tensor default to column-major. Averaging never cares (it is element-wise);
/// checkpoints and structure checks do.
enum class StorageOrder { RowMajor, ColMajor };

namespace detail {
/// "[64, 3, 3, 3]": a shape as error messages print it.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}
}  // namespace detail

/// A flat Eigen array over one tensor's storage, the form averaging functions receive.
template <class S>
using ArrayMap = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>;
/// A flat Eigen array over one tensor's storage, read-only: the current weights a rule receives.
template <class S>
using ConstArrayMap = Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>;

/// Where a view's storage came from, when polyak can ask it, before each use, whether the storage is
/// still where the view was made. A view holds a pointer: if the object it was made from reallocates
/// (an Eigen Matrix resized, a libtorch tensor replaced by torch::load or cast by module->to()), the
/// pointer dangles, and using it would read freed memory. AveragedModel and the model averagers ask
/// every view's source first and refuse a stale one by name (ParameterList::check_storage).
///
/// ParameterList::add fills it in for an Eigen Matrix, Array or Tensor (which own their storage;
/// a Map or a raw pointer has no object to ask), and polyak::libtorch::tensors for each tensor.
/// What it cannot catch: an object destroyed after its view was made (asking it would itself read
/// freed memory). Keep the model's objects alive, and their sizes fixed, while views of them are used.
struct ViewSource {
  /// The object the storage belongs to (an Eigen object, or what keep_alive holds).
  const void* object = nullptr;
  /// True while `object` still keeps its elements at `data`, `numel` of them.
  bool (*is_current)(const void* object, const void* data, std::size_t numel) = nullptr;
  /// Keeps `object` alive as long as the view (libtorch: a handle on the tensor); empty for Eigen
  /// objects, which the training code owns.
  std::shared_ptr<const void> keep_alive;
};

/// A non-owning view of one contiguous tensor: pointer, logical shape, storage order.
/// Mirrors what a libtorch tensor's `data_ptr()` and `sizes()` give (row-major by default).
template <class T>
class TensorView {
  static_assert(is_supported_scalar_v<T>,
                "polyak::TensorView: the scalar type must be float, double, Eigen::half or Eigen::bfloat16");

 public:
  using Scalar = T;                         ///< the element type
  using Shape = std::vector<std::int64_t>;  ///< extents, outermost first

  TensorView() = default;

  /// `data` must hold the product of `shape` elements, contiguous in `order`. A negative extent, or
  /// a shape whose element count (multiplied left to right, as safetensors counts it) or byte count
  /// overflows, is refused. `source`, where given, lets polyak check before each use that the
  /// storage has not moved (see ViewSource).
  TensorView(T* data, Shape shape, StorageOrder order = StorageOrder::RowMajor, ViewSource source = {})
      : data_(data), shape_(std::move(shape)), order_(order), source_(std::move(source)) {
    constexpr auto max_elements =
        static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max()) / sizeof(T);
    numel_ = 1;
    for (const std::int64_t extent : shape_) {
      if (extent < 0) {
        throw InvalidArgument("polyak::TensorView: negative extent " + std::to_string(extent) + " in shape " +
                              detail::shape_string(shape_));
      }
      const auto x = static_cast<std::size_t>(extent);
      if (x != 0 && numel_ > max_elements / x) {
        throw InvalidArgument("polyak::TensorView: the element count of shape " +
                              detail::shape_string(shape_) + " overflows");
      }
      numel_ *= x;
    }
    if (data_ == nullptr && numel_ != 0) {
      throw InvalidArgument("polyak::TensorView: null data for a tensor of shape " +
                            detail::shape_string(shape_));
    }
  }

  /// The first element.
  T* data() const noexcept { return data_; }
  /// The element count: the product of the shape.
  std::size_t numel() const noexcept { return numel_; }
  /// The logical shape.
  const Shape& shape() const noexcept { return shape_; }
  /// How the elements lie in memory (row-major as libtorch and safetensors; column-major as Eigen's default).
  StorageOrder storage_order() const noexcept { return order_; }

  /// The storage as one flat array, in memory order.
  ArrayMap<T> flat() const { return ArrayMap<T>(data_, static_cast<Eigen::Index>(numel_)); }

  /// False when the view's source says its storage has moved since the view was made; true when it
  /// has not, or when the view has no source to ask.
  bool storage_is_current() const {
    return source_.is_current == nullptr || source_.is_current(source_.object, data_, numel_);
  }

 private:
  T* data_ = nullptr;
  Shape shape_;
  StorageOrder order_ = StorageOrder::RowMajor;
  std::size_t numel_ = 0;
  ViewSource source_;
};

namespace detail {

template <class>
inline constexpr bool always_false_v = false;

template <class X>
using remove_cvref_t = std::remove_cv_t<std::remove_reference_t<X>>;

template <class X>
struct is_tensor_view : std::false_type {};
template <class T>
struct is_tensor_view<TensorView<T>> : std::true_type {};

template <class X>
inline constexpr bool is_eigen_dense_v =
    std::is_base_of_v<Eigen::DenseBase<remove_cvref_t<X>>, remove_cvref_t<X>>;

template <class X>
struct eigen_tensor_traits : std::false_type {
  static constexpr bool owns = false;
};
template <class S, int N, int Options, class Index>
struct eigen_tensor_traits<Eigen::Tensor<S, N, Options, Index>> : std::true_type {
  using Scalar = S;
  static constexpr bool owns = true;
  static constexpr bool row_major = (Options & Eigen::RowMajor) != 0;
};
template <class S, int N, int Options, class Index, int MapOptions, template <class> class MakePointer>
struct eigen_tensor_traits<Eigen::TensorMap<Eigen::Tensor<S, N, Options, Index>, MapOptions, MakePointer>>
    : std::true_type {
  using Scalar = S;
  static constexpr bool owns = false;
  static constexpr bool row_major = (Options & Eigen::RowMajor) != 0;
};

/// The ViewSource of an Eigen object that owns its storage (Matrix, Array, Tensor: it may be resized);
/// none for a Map, a Block or a TensorMap, which are often temporaries and cannot reallocate.
template <class D>
ViewSource source_of(D& object) {
  if constexpr (std::is_base_of_v<Eigen::PlainObjectBase<D>, D> || eigen_tensor_traits<D>::owns) {
    return {&object,
            [](const void* o, const void* data, std::size_t numel) {
              const D& x = *static_cast<const D*>(o);
              return static_cast<const void*>(x.data()) == data &&
                     static_cast<std::size_t>(x.size()) == numel;
            },
            {}};
  } else {
    return {};
  }
}

/// A view of a contiguous, writable Eigen Matrix, Array, Map or Block.
template <class X>
TensorView<typename remove_cvref_t<X>::Scalar> view_of_dense(const std::string& name, X&& x) {
  using D = remove_cvref_t<X>;
  static_assert((D::Flags & Eigen::DirectAccessBit) != 0,
                "polyak: this Eigen expression is not stored in memory (a sum, a product, a cast...): "
                "evaluate it into a Matrix or Array first, or view the storage it reads");
  static_assert(!std::is_const_v<std::remove_reference_t<X>> && (D::Flags & Eigen::LvalueBit) != 0,
                "polyak: views are written through (copy_to, swap): pass a non-const Matrix, Array or "
                "Map, not a const one or a Map of const data");
  static_assert(!(std::is_rvalue_reference_v<X&&> && std::is_base_of_v<Eigen::PlainObjectBase<D>, D>),
                "polyak: a temporary Eigen Matrix or Array would dangle: pass the model's own object");
  static_assert(D::InnerStrideAtCompileTime == Eigen::Dynamic || D::InnerStrideAtCompileTime == 1 ||
                    D::InnerSizeAtCompileTime == 1,
                "polyak: this Eigen object is strided (for instance a row of a column-major matrix): "
                "views must be contiguous; copy it into its own Matrix, or view the whole matrix");

  // Contiguous: consecutive inner elements adjacent, consecutive outer slices back to back.
  const Eigen::Index inner_size = x.innerSize();
  const Eigen::Index outer_size = x.outerSize();
  const bool contiguous =
      (inner_size <= 1 || x.innerStride() == 1) && (outer_size <= 1 || x.outerStride() == inner_size);
  if (!contiguous) {
    throw InvalidArgument("polyak: tensor '" + name + "' is a strided " + std::to_string(x.rows()) + "x" +
                          std::to_string(x.cols()) + " view (inner stride " +
                          std::to_string(x.innerStride()) + ", outer stride " +
                          std::to_string(x.outerStride()) +
                          "); views must be contiguous: copy it into its own Matrix, or view the whole "
                          "storage");
  }

  // Vectors get one dimension, as a PyTorch bias has; everything else is rows x cols.
  typename TensorView<typename D::Scalar>::Shape shape;
  if constexpr (D::ColsAtCompileTime == 1) {
    shape = {static_cast<std::int64_t>(x.rows())};
  } else if constexpr (D::RowsAtCompileTime == 1) {
    shape = {static_cast<std::int64_t>(x.cols())};
  } else {
    shape = {static_cast<std::int64_t>(x.rows()), static_cast<std::int64_t>(x.cols())};
  }
  return {x.data(), std::move(shape), D::IsRowMajor ? StorageOrder::RowMajor : StorageOrder::ColMajor,
          source_of(x)};
}

/// A view of an Eigen::Tensor or Eigen::TensorMap (always contiguous).
template <class X>
TensorView<typename eigen_tensor_traits<remove_cvref_t<X>>::Scalar> view_of_tensor(X&& x) {
  using Traits = eigen_tensor_traits<remove_cvref_t<X>>;
  static_assert(!std::is_const_v<std::remove_reference_t<X>> && !std::is_const_v<typename Traits::Scalar>,
                "polyak: views are written through (copy_to, swap): pass a non-const Tensor or TensorMap");
  static_assert(!(std::is_rvalue_reference_v<X&&> && Traits::owns),
                "polyak: a temporary Eigen::Tensor would dangle: pass the model's own object");
  typename TensorView<typename Traits::Scalar>::Shape shape;
  for (const auto extent : x.dimensions()) shape.push_back(static_cast<std::int64_t>(extent));
  return {x.data(), std::move(shape), Traits::row_major ? StorageOrder::RowMajor : StorageOrder::ColMajor,
          source_of(x)};
}

/// The view of anything ParameterList::add accepts.
template <class X>
auto view_of(const std::string& name, X&& x) {
  using D = remove_cvref_t<X>;
  if constexpr (is_tensor_view<D>::value) {
    return D(x);
  } else if constexpr (is_eigen_dense_v<D>) {
    return view_of_dense(name, std::forward<X>(x));
  } else if constexpr (eigen_tensor_traits<D>::value) {
    return view_of_tensor(std::forward<X>(x));
  } else {
    static_assert(always_false_v<D>,
                  "polyak: cannot view this type: pass a contiguous Eigen Matrix, Array or Map, an "
                  "Eigen::Tensor or TensorMap, or a polyak::TensorView(pointer, shape)");
  }
}

}  // namespace detail

/// One named entry of a ParameterList: a view plus whether it is a parameter or a buffer.
template <class T>
class NamedTensor {
 public:
  /// The entry `name`, viewing `view`, a buffer where `is_buffer`.
  NamedTensor(std::string name, TensorView<T> view, bool is_buffer)
      : name_(std::move(name)), view_(std::move(view)), is_buffer_(is_buffer) {}

  /// Its name, as the model names it.
  const std::string& name() const noexcept { return name_; }
  /// Its view.
  const TensorView<T>& view() const noexcept { return view_; }
  /// Whether it is a buffer (not trained) rather than a parameter.
  bool is_buffer() const noexcept { return is_buffer_; }

  ///@{
  /// The view's data, numel, shape, storage order and flat array (see TensorView).
  T* data() const noexcept { return view_.data(); }
  std::size_t numel() const noexcept { return view_.numel(); }
  const typename TensorView<T>::Shape& shape() const noexcept { return view_.shape(); }
  StorageOrder storage_order() const noexcept { return view_.storage_order(); }
  ArrayMap<T> flat() const { return view_.flat(); }
  ///@}

 private:
  std::string name_;
  TensorView<T> view_;
  bool is_buffer_;
};

/// The ordered, named, non-owning list of a model's tensors: its parameters, and its buffers (state
/// that is not trained, such as batch-norm running statistics). Mirrors a torch.nn.Module's
/// named_parameters() and named_buffers(); the order of add / add_buffer calls is the order kept.
template <class T>
class ParameterList {
 public:
  using Scalar = T;                   ///< the element type
  using value_type = NamedTensor<T>;  ///< an entry
  using const_iterator =
      typename std::vector<NamedTensor<T>>::const_iterator;  ///< iterates the entries in order

  /// Adds a parameter. `tensor` is a contiguous Eigen Matrix, Array, Map or Block, an Eigen::Tensor
  /// or TensorMap, or a TensorView; its scalar type must be T.
  template <class Tensor>
  ParameterList& add(std::string name, Tensor&& tensor) {
    return add_entry(std::move(name), std::forward<Tensor>(tensor), /*is_buffer=*/false);
  }

  /// Adds a buffer: averaged by AveragedModel only with use_buffers, copied otherwise.
  template <class Tensor>
  ParameterList& add_buffer(std::string name, Tensor&& tensor) {
    return add_entry(std::move(name), std::forward<Tensor>(tensor), /*is_buffer=*/true);
  }

  /// The number of tensors, parameters and buffers together.
  std::size_t size() const noexcept { return entries_.size(); }
  /// Whether it holds no tensor.
  bool empty() const noexcept { return entries_.empty(); }

  /// The number of scalars over all tensors.
  std::size_t numel() const noexcept {
    std::size_t total = 0;
    for (const auto& entry : entries_) total += entry.numel();
    return total;
  }

  /// Entry `i`, in the order added.
  const NamedTensor<T>& operator[](std::size_t i) const { return entries_[i]; }
  /// The entries, in the order added.
  const_iterator begin() const noexcept { return entries_.begin(); }
  /// The end of the entries.
  const_iterator end() const noexcept { return entries_.end(); }

  /// Why the views cannot be used: "" when every tensor's storage is where its view was made, else
  /// the first tensor whose storage moved (see ViewSource). What every polyak call that reads or
  /// writes through the views asks first. Allocates nothing when there is nothing to say.
  std::string stale_view() const {
    for (const auto& entry : entries_) {
      if (!entry.view().storage_is_current()) {
        return "tensor '" + entry.name() +
               "' was resized, moved or replaced after its view was made, so the view points at memory the "
               "tensor no longer uses: make the ParameterList again from the model as it is now";
      }
    }
    return {};
  }

  /// The name of this list's tensor whose memory overlaps the `bytes` bytes at `begin`, or nullptr:
  /// the averagers refuse a tensor listed in two lists of one call, as add() refuses one listed
  /// twice in one list (it would be averaged twice).
  const std::string* overlapping(const void* begin, std::size_t bytes) const {
    const auto first = reinterpret_cast<std::uintptr_t>(begin), last = first + bytes;
    if (first == last) return nullptr;
    const auto next = ranges_.upper_bound(first);  // (ranges within a list are disjoint)
    if (next != ranges_.end() && next->first < last) return &entries_[next->second.second].name();
    if (next != ranges_.begin() && std::prev(next)->second.first > first)
      return &entries_[std::prev(next)->second.second].name();
    return nullptr;
  }

  /// Throws InvalidArgument naming the first tensor whose storage moved since its view was made.
  void check_storage() const {
    const std::string problem = stale_view();
    if (!problem.empty()) throw InvalidArgument("polyak::ParameterList: " + problem);
  }

 private:
  template <class Tensor>
  ParameterList& add_entry(std::string name, Tensor&& tensor, bool is_buffer) {
    auto view = detail::view_of(name, std::forward<Tensor>(tensor));
    static_assert(std::is_same_v<typename decltype(view)::Scalar, T>,
                  "polyak::ParameterList<T>::add: the tensor's scalar type differs from T");
    if (name.empty()) throw InvalidArgument("polyak::ParameterList: a tensor needs a non-empty name");
    for (const auto& entry : entries_) {
      if (entry.name() == name) {
        throw InvalidArgument("polyak::ParameterList: the name '" + name + "' is already in the list");
      }
    }
    // A tensor listed twice (tied weights) would be averaged twice, and swap() would undo itself on
    // it: refused, as PyTorch's parameters() lists a shared tensor once.
    const auto begin = reinterpret_cast<std::uintptr_t>(view.data());
    const auto end = begin + view.numel() * sizeof(T);
    if (begin != end) {
      auto next = ranges_.upper_bound(begin);
      const auto shared = [&](std::size_t other) {
        throw InvalidArgument("polyak::ParameterList: tensor '" + name + "' shares memory with '" +
                              entries_[other].name() +
                              "' (tied weights?): list a shared tensor once, as PyTorch's "
                              "parameters() does");
      };
      if (next != ranges_.end() && next->first < end) shared(next->second.second);
      if (next != ranges_.begin() && std::prev(next)->second.first > begin)
        shared(std::prev(next)->second.second);
      ranges_.emplace(begin, std::make_pair(end, entries_.size()));
    }
    entries_.emplace_back(std::move(name), std::move(view), is_buffer);
    return *this;
  }

  std::vector<NamedTensor<T>> entries_;
  std::map<std::uintptr_t, std::pair<std::uintptr_t, std::size_t>> ranges_;  ///< begin -> (end, index), bytes
};

}  // namespace polyak
