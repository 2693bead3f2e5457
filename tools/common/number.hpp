// SPDX-License-Identifier: MIT
// The tools' reading of numbers from the command line and from checkpoint metadata.
#pragma once

#include <charconv>
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

}  // namespace polyak_tools
