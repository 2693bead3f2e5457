// SPDX-License-Identifier: MIT
// What the core knows of checkpoints: two names. The state_dict() / load_state_dict() members of
// the core's types forward to StateIO<Type>, which the checkpoint layer defines
// (polyak/checkpoint/state_io.hpp); a program that never saves state never compiles checkpoint code.
#pragma once

#include <type_traits>

namespace polyak {

class StateDict;

/// How a stateful type's state goes into a StateDict and comes back (save, load). Specialized by
/// the checkpoint layer for each of polyak's stateful types.
template <class T>
struct StateIO;

namespace detail {

template <class T, class = void>
struct is_complete : std::false_type {};
template <class T>
struct is_complete<T, std::void_t<decltype(sizeof(T))>> : std::true_type {};

/// True for an adapter's stateful type, whose StateIO is in the adapter's checkpoint header
/// (specialized there); false for the core's types, whose StateIO is in polyak/checkpoint/state_io.hpp.
template <class T>
struct state_io_in_adapter : std::false_type {};

/// StateIO<T>, looked up where state_dict() is called (Dict makes it dependent), with a message
/// that says what to include when the checkpoint layer is missing.
template <class T, class Dict>
struct state_io_for {
  static_assert(is_complete<Dict>::value,
                "polyak: state_dict() and load_state_dict() belong to the checkpoint layer: "
                "#include <polyak/checkpoint.hpp> (CMake target polyak::checkpoint)");
  static_assert(!is_complete<Dict>::value || is_complete<StateIO<T>>::value || state_io_in_adapter<T>::value,
                "polyak: the core's state_dict() and load_state_dict() are in "
                "#include <polyak/checkpoint/state_io.hpp> (or all of <polyak/checkpoint.hpp>)");
  static_assert(!is_complete<Dict>::value || is_complete<StateIO<T>>::value || !state_io_in_adapter<T>::value,
                "polyak: this type's state_dict() and load_state_dict() are in its adapter's checkpoint "
                "header: for polyak::libtorch::AveragedModel, #include <polyak/torch/checkpoint.hpp>");
  using type = StateIO<T>;
};
template <class T, class Dict>
using state_io = typename state_io_for<T, Dict>::type;

}  // namespace detail

}  // namespace polyak

/// The two members every stateful core type declares: PyTorch's names, defined by StateIO<Type>.
#define POLYAK_DETAIL_STATE_MEMBERS(Type)                       \
  template <class Dict = ::polyak::StateDict>                   \
  Dict state_dict() const {                                     \
    return ::polyak::detail::state_io<Type, Dict>::save(*this); \
  }                                                             \
  template <class Dict = ::polyak::StateDict>                   \
  void load_state_dict(const Dict& state) {                     \
    ::polyak::detail::state_io<Type, Dict>::load(*this, state); \
  }                                                             \
  template <class>                                              \
  friend struct ::polyak::StateIO
