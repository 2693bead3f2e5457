// SPDX-License-Identifier: MIT
// Numbers as text, exactly: the shortest text that reads back to the same double, and a parser that
// accepts a whole text holding one number and nothing else. The one place polyak turns numbers into
// text and back (checkpoint settings, command-line arguments).
#pragma once

#include <charconv>  // std::to_chars, std::from_chars: locale-free, exact round trip
#include <cstdint>   // std::int64_t
#include <string>
#include <string_view>
#include <system_error>  // std::errc

namespace polyak {
namespace detail {

/// The shortest text that std::from_chars (and parse_number) reads back to exactly `value`:
/// "0.999", "1e-08", "nan", "inf".
inline std::string number_text(double value) {
  char text[32];
  const auto end = std::to_chars(text, text + sizeof text, value).ptr;
  return std::string(text, end);
}

inline std::string number_text(std::int64_t value) {
  char text[24];
  const auto end = std::to_chars(text, text + sizeof text, value).ptr;
  return std::string(text, end);
}

/// Whether `value` lies in [0, 1] (NaN does not): the one range check of decays, momenta, densities.
constexpr bool in_unit_interval(double value) noexcept { return value >= 0.0 && value <= 1.0; }

/// The message of a setting that must lie in [0, 1] (a decay, a momentum): "" when it does, else
/// "<name> <value> is outside [0, 1]" with the value printed exactly (1.0000001 is not "1.000000").
/// NaN lies outside.
inline std::string unit_interval_problem(double value, const char* name) {
  if (in_unit_interval(value)) return {};
  return std::string(name) + " " + number_text(value) + " is outside [0, 1]";
}

/// a == b, exactly, where exact equality is meant (a saved setting against the model's, a bisection
/// that has run out of digits), written without == so that clang's -Wfloat-equal stays quiet in
/// users' builds. NaN equals nothing, as with ==.
constexpr bool exactly_equal(double a, double b) noexcept { return a <= b && a >= b; }

/// Reads `text` whole as a double: false for an empty text, one with anything before or after the
/// number ("0.5abc", " 1", "1,"), or one out of double's range ("1e999"). "nan" and "inf" parse; a
/// caller that wants finite values checks.
inline bool parse_number(std::string_view text, double& value) {
  double parsed = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), parsed);
  if (error != std::errc() || end != text.data() + text.size() || text.empty()) return false;
  value = parsed;
  return true;
}

/// Reads `text` whole as a decimal std::int64_t: false for anything else ("1.7", "12x", "" and values
/// out of range included).
inline bool parse_number(std::string_view text, std::int64_t& value) {
  std::int64_t parsed = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), parsed);
  if (error != std::errc() || end != text.data() + text.size() || text.empty()) return false;
  value = parsed;
  return true;
}

}  // namespace detail
}  // namespace polyak
