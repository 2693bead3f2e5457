// SPDX-License-Identifier: MIT
// libFuzzer target: parse_safetensors on any bytes either returns a StateDict or throws FormatError;
// anything else (a crash, a sanitizer report, another exception) is a bug.
//   bash tests/fuzz/run.sh [seconds]
#include <polyak/checkpoint/safetensors.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const polyak::StateDict sd = polyak::parse_safetensors(reinterpret_cast<const std::byte*>(data), size);
    for (const auto& [name, tensor] : sd) {
      // What was accepted is self-consistent: its bytes are exactly its elements.
      if (tensor.bytes.size() != tensor.numel() * polyak::dtype_size(tensor.dtype)) __builtin_trap();
    }
  } catch (const polyak::FormatError&) {
  }
  return 0;
}
