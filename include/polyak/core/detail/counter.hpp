// SPDX-License-Identifier: MIT
// Step counters (n_averaged, SWAG's n_updates, the averagers' step): int64, and refused at their
// limit, on load and on step, rather than overflowing (undefined behaviour) into a negative count.
#pragma once

#include <cstdint>  // std::int64_t
#include <limits>
#include <string>

#include "polyak/core/error.hpp"

namespace polyak {
namespace detail {

inline constexpr std::int64_t largest_count = std::numeric_limits<std::int64_t>::max();

/// A counter read from a state: FormatError unless it lies in [0, largest_count), where the next
/// step can still count it.
inline void check_counter(std::int64_t value, const char* name, const std::string& who) {
  if (value < 0 || value == largest_count) {
    throw FormatError(who + ": " + name + " " + std::to_string(value) + " is out of range [0, " +
                      std::to_string(largest_count) + ")");
  }
}

/// Before a counter advances: InvalidArgument, nothing changed, when it is at its largest value;
/// `who` and `where` name the call in the message. (Per step: allocates nothing unless it throws.)
inline void check_can_count(std::int64_t value, const char* name, const char* who, const char* where = "") {
  if (value == largest_count) {
    throw InvalidArgument(std::string(who) + where + ": " + name + " is at its largest value, " +
                          std::to_string(value) + ", and cannot count another step; nothing changed");
  }
}

}  // namespace detail
}  // namespace polyak
