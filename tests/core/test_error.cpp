// SPDX-License-Identifier: MIT
#include "polyak/core/error.hpp"

#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "polyak/core/averaging_functions.hpp"

// Each of polyak's exceptions is caught by one handler for polyak::Error and by the standard handler
// a caller has anyway; nothing else is a polyak::Error.
static_assert(std::is_base_of_v<polyak::Error, polyak::InvalidArgument> &&
              std::is_base_of_v<std::invalid_argument, polyak::InvalidArgument>);
static_assert(std::is_base_of_v<polyak::Error, polyak::FormatError> &&
              std::is_base_of_v<std::runtime_error, polyak::FormatError>);
static_assert(std::is_base_of_v<polyak::Error, polyak::RuntimeError> &&
              std::is_base_of_v<std::runtime_error, polyak::RuntimeError>);
static_assert(!std::is_base_of_v<polyak::Error, std::runtime_error>);
static_assert(std::is_abstract_v<polyak::Error>);

namespace {
template <class Exception>
std::string message_through_error(const std::string& text) {
  try {
    throw Exception(text);
  } catch (const polyak::Error& e) {
    return e.what();
  }
}
}  // namespace

TEST_CASE("what() gives the same message through polyak::Error and the standard base", "[error]") {
  CHECK(message_through_error<polyak::InvalidArgument>("an argument") == "an argument");
  CHECK(message_through_error<polyak::FormatError>("a file") == "a file");
  CHECK(message_through_error<polyak::RuntimeError>("the system") == "the system");
  const polyak::FormatError error("format");
  CHECK(std::string(static_cast<const std::runtime_error&>(error).what()) == "format");
  polyak::FormatError copy = error;  // copyable, as the standard exceptions
  CHECK(std::string(copy.what()) == "format");
}

TEST_CASE("a setting the core refuses is an InvalidArgument, caught as either base", "[error]") {
  CHECK_THROWS_AS(polyak::EMA{1.5}, polyak::InvalidArgument);
  CHECK_THROWS_AS(polyak::EMA{1.5}, polyak::Error);
  CHECK_THROWS_AS(polyak::EMA{1.5}, std::invalid_argument);
}
