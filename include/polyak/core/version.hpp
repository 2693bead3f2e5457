// SPDX-License-Identifier: MIT
// polyak's version: the one place it is written; CMake reads it from here.
#pragma once

#define POLYAK_VERSION_MAJOR 0
#define POLYAK_VERSION_MINOR 2
#define POLYAK_VERSION_PATCH 0

namespace polyak {
inline constexpr int version_major = POLYAK_VERSION_MAJOR;
inline constexpr int version_minor = POLYAK_VERSION_MINOR;
inline constexpr int version_patch = POLYAK_VERSION_PATCH;
}  // namespace polyak
