// SPDX-License-Identifier: MIT
#include "polyak/core/version.hpp"

#include <catch2/catch.hpp>

#include <string>

TEST_CASE("the version's numbers and macros agree", "[version]") {
  CHECK(polyak::version_major == POLYAK_VERSION_MAJOR);
  CHECK(polyak::version_minor == POLYAK_VERSION_MINOR);
  CHECK(polyak::version_patch == POLYAK_VERSION_PATCH);
#ifdef POLYAK_TEST_PROJECT_VERSION  // the version CMake read for the package (tests/CMakeLists.txt)
  const std::string written = std::to_string(polyak::version_major) + "." +
                              std::to_string(polyak::version_minor) + "." +
                              std::to_string(polyak::version_patch);
  CHECK(written == POLYAK_TEST_PROJECT_VERSION);
#endif
}
