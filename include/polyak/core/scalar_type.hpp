// SPDX-License-Identifier: MIT
// The scalar types polyak averages, and the type each one is averaged in.
#pragma once

#include <cstddef>   // std::size_t
#include <cstdint>   // std::int64_t, std::uint16_t, std::uint32_t
#include <cstring>   // std::memcpy: bit casts
#include <iterator>  // std::size
#include <type_traits>
#include <utility>  // std::index_sequence

#include <Eigen/Core>  // Eigen::half, Eigen::bfloat16

namespace polyak {

/// True for the parameter scalar types polyak accepts: float, double, Eigen::half, Eigen::bfloat16.
template <class T>
inline constexpr bool is_supported_scalar_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, Eigen::half> ||
    std::is_same_v<T, Eigen::bfloat16>;

/// The type an average of T is kept in. 16-bit models are averaged in float: PyTorch keeps the
/// average in the parameter's own dtype, where an EMA with decay 0.999 loses most of each update
/// to rounding. float and double are averaged in themselves.
template <class T>
struct accumulator {
  static_assert(is_supported_scalar_v<T>,
                "polyak: parameters must be float, double, Eigen::half or Eigen::bfloat16");
  /// float for half and bfloat16, T itself otherwise.
  using type =
      std::conditional_t<std::is_same_v<T, Eigen::half> || std::is_same_v<T, Eigen::bfloat16>, float, T>;
};

/// The type an average of T is kept in: accumulator<T>::type.
template <class T>
using accumulator_t = typename accumulator<T>::type;

/// The element types polyak knows, by their safetensors names: the parameter types and the
/// 64-bit integers of counters. The one table of scalar types; everything else (names, sizes, the
/// C++ type of a DType, libtorch's ScalarType) is derived from it.
enum class DType { F32, F64, F16, BF16, I64 };

namespace detail {

/// The C++ types of DType's values, in its order.
template <class... T>
struct type_list {};
using dtype_types = type_list<float, double, Eigen::half, Eigen::bfloat16, std::int64_t>;
inline constexpr const char* dtype_names[] = {"F32", "F64", "F16", "BF16", "I64"};

template <class T, class... Ts>
constexpr int index_of(type_list<Ts...>) {
  constexpr bool same[] = {std::is_same_v<T, Ts>...};
  for (int i = 0; i < static_cast<int>(sizeof...(Ts)); ++i) {
    if (same[i]) return i;
  }
  return -1;
}

// (Hidden from the reference: doxygen takes the recursion for a class deriving from itself.)
/// \cond
template <std::size_t I, class T, class... Ts>
struct type_at : type_at<I - 1, Ts...> {};
template <class T, class... Ts>
struct type_at<0, T, Ts...> {
  using type = T;
};
template <std::size_t I, class... Ts>
auto type_at_list(type_list<Ts...>) -> typename type_at<I, Ts...>::type;
/// \endcond

}  // namespace detail

/// The C++ type of a DType: dtype_type<DType::BF16> is Eigen::bfloat16.
template <DType D>
using dtype_type = decltype(detail::type_at_list<static_cast<std::size_t>(D)>(detail::dtype_types{}));

/// True for the C++ types a DType names (the parameter types and std::int64_t).
template <class T>
inline constexpr bool has_dtype_v = detail::index_of<T>(detail::dtype_types{}) >= 0;

/// The DType of a C++ scalar type.
template <class T>
constexpr DType dtype_of() {
  static_assert(has_dtype_v<T>, "polyak: no DType for this type");
  return static_cast<DType>(detail::index_of<T>(detail::dtype_types{}));
}

/// "F32", "F64", "F16", "BF16" or "I64".
constexpr const char* dtype_name(DType dtype) { return detail::dtype_names[static_cast<int>(dtype)]; }

/// Bytes a DType's element takes.
inline std::size_t dtype_size(DType dtype);

namespace detail {

template <class F, std::size_t... I>
auto with_dtype_type(DType dtype, F&& f, std::index_sequence<I...>) {
  using Result = decltype(f(float{}));
  // Tries each DType in turn; the one that matches calls f.
  if constexpr (std::is_void_v<Result>) {
    const auto call = [&](auto index) {
      if (static_cast<std::size_t>(dtype) != index) return false;
      f(dtype_type<static_cast<DType>(decltype(index)::value)>{});
      return true;
    };
    static_cast<void>((call(std::integral_constant<std::size_t, I>{}) || ...));
  } else {
    Result result{};
    const auto call = [&](auto index) {
      if (static_cast<std::size_t>(dtype) != index) return false;
      result = f(dtype_type<static_cast<DType>(decltype(index)::value)>{});
      return true;
    };
    static_cast<void>((call(std::integral_constant<std::size_t, I>{}) || ...));
    return result;
  }
}

/// Calls f(T{}) with the C++ type of `dtype`; f returns one type (or void) for all of them.
template <class F>
auto with_scalar_type(DType dtype, F&& f) {
  return with_dtype_type(dtype, std::forward<F>(f), std::make_index_sequence<std::size(dtype_names)>{});
}

}  // namespace detail

inline std::size_t dtype_size(DType dtype) {
  return detail::with_scalar_type(dtype, [](auto zero) { return sizeof(zero); });
}

namespace detail {

/// Converts n scalars to their accumulator type. bfloat16 is the upper half of a float, so the
/// conversion is a shift, written so that compilers vectorize it (Eigen's cast converts one by one,
/// which held bfloat16 updates to a third of the memory bandwidth here).
template <class T>
void widen(const T* in, accumulator_t<T>* out, std::size_t n) {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t low;
      std::memcpy(&low, in + i, sizeof low);
      const std::uint32_t bits = static_cast<std::uint32_t>(low) << 16;
      std::memcpy(out + i, &bits, sizeof bits);
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<accumulator_t<T>>(in[i]);
  }
}

/// Converts n accumulator scalars back to T, rounding as a static_cast does. For bfloat16 it is
/// Eigen's round-to-nearest-even (a NaN becomes the quiet NaN of its sign) written without a branch,
/// so that compilers vectorize it.
template <class T>
void narrow(const accumulator_t<T>* in, T* out, std::size_t n) {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint32_t bits;
      std::memcpy(&bits, in + i, sizeof bits);
      const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
      const auto rounded = static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
      const auto quiet = static_cast<std::uint16_t>(((bits >> 16) & 0x8000u) | 0x7fc0u);
      const std::uint16_t low = nan ? quiet : rounded;
      std::memcpy(static_cast<void*>(out + i), &low, sizeof low);
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
  }
}

}  // namespace detail

}  // namespace polyak
