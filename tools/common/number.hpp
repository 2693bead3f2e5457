// SPDX-License-Identifier: MIT
// The tools' reading of numbers from the command line and from checkpoint metadata.
#pragma once

#include <charconv>
#include <cstdint>
#include <string_view>
#include <system_error>

namespace polyak_tools {

/// Reads `text` whole as a T (double or std::int64_t): false for an empty text, one with anything
/// before or after the number ("0.5abc", " 1"), or one out of T's range ("1e999").
template <class T>
bool parse_number(std::string_view text, T& value) {
  T parsed{};
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), parsed);
  if (text.empty() || error != std::errc() || end != text.data() + text.size()) return false;
  value = parsed;
  return true;
}

/// Reads `text` whole as a count: digits only, so that "-0" is refused as "-1" is (std::from_chars
/// takes a minus sign, and -0 would read as 0).
inline bool parse_count(std::string_view text, std::int64_t& value) {
  return !text.empty() && text.front() >= '0' && text.front() <= '9' && parse_number(text, value);
}

}  // namespace polyak_tools
