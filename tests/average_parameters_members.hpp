// SPDX-License-Identifier: MIT
// The members' scalars of tests/reference/average_parameters.py, repeated here so that the thread
// and MPI tests average what PyTorch averaged there.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace polyak_test {

/// Member r's scalar i (see average_parameters.py): a formula's exact float, or with `extremes` the
/// table's bits at indices i % 9973 == 0 (another on each member) and == 1 (the same on all).
inline float average_parameters_scalar(int r, std::size_t i, bool extremes) {
  static const std::uint32_t table[] = {0x00000001, 0x80000003, 0x007FFFFF, 0x00800000, 0x80800001,
                                        0x01000000, 0x01000001, 0x81800000, 0x01800000, 0x02000001,
                                        0x7F7FFFFF, 0xFF7FFFFF, 0x7E800000, 0x7E000001, 0x7D800000,
                                        0x00000000, 0x80000000, 0x7F800000, 0x3F800000};
  constexpr std::size_t count = sizeof table / sizeof table[0];
  if (extremes && i % 9973 <= 1) {
    const std::size_t shift = i % 9973 == 0 ? static_cast<std::size_t>(r) : 0;
    float value;
    std::memcpy(&value, &table[(i / 9973 + shift) % count], sizeof value);
    return value;
  }
  std::uint64_t h = (i * 2654435761ull + static_cast<std::uint64_t>(r) * 40503 + 12345) & 0xffffffffu;
  h ^= h >> 15;
  h = (h * 2246822519ull) & 0xffffffffu;
  h ^= h >> 13;
  return static_cast<float>(static_cast<double>(h >> 8) * 0x1p-21 - 4.0);
}

/// FNV-1a 64 over the scalars' 32-bit words, one step a word (the script's digest).
inline std::uint64_t fnv1a_words(const std::vector<float>& values) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const float v : values) {
    std::uint32_t word;
    std::memcpy(&word, &v, sizeof word);
    h = (h ^ word) * 0x100000001b3ull;
  }
  return h;
}

}  // namespace polyak_test
