// SPDX-License-Identifier: MIT
// polyak's version: the one place it is written; CMake reads it from here.
#pragma once

#define POLYAK_VERSION_MAJOR 0
#define POLYAK_VERSION_MINOR 2
#define POLYAK_VERSION_PATCH 0

namespace polyak {
inline constexpr int version_major = POLYAK_VERSION_MAJOR;  ///< the major version: 0 while the API may change
inline constexpr int version_minor = POLYAK_VERSION_MINOR;  ///< the minor version
inline constexpr int version_patch = POLYAK_VERSION_PATCH;  ///< the patch version
}  // namespace polyak
