#!/usr/bin/env bash
# The device average's benchmark: bench_torch (polyak's libtorch::AveragedModel against torch's own
# loops and copy_ bandwidth, on the CPU and on CUDA where a GPU is present) and PyTorch's
# AveragedModel on the same device, as one table.
#   usage: bash benchmarks/run_torch.sh [max size, default 1e8]
# Builds against the libtorch that CMake finds: Debian's libtorch-dev (installed where missing, with
# python3-torch), or the one a pip PyTorch ships when its python is first on PATH (on a GPU
# machine: `PATH=/path/to/that/python/bin:$PATH bash benchmarks/run_torch.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
max_size=${1:-1e8}
python=$(command -v python3)
prefix=$("$python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
if [[ -z "$prefix" || "$python" == /usr/bin/python3 ]]; then
  bash scripts/install-deps.sh g++ cmake make libeigen3-dev libbenchmark-dev nlohmann-json3-dev libtorch-dev \
    python3-torch
  prefix="" python=/usr/bin/python3
fi
cmake -S . -B build/bench-torch -DCMAKE_BUILD_TYPE=Release -DPOLYAK_BUILD_TESTS=OFF -DPOLYAK_BUILD_EXAMPLES=OFF \
  -DPOLYAK_BUILD_BENCHMARKS=ON ${prefix:+-DCMAKE_PREFIX_PATH="$prefix"} >/dev/null
cmake --build build/bench-torch -j "$(nproc)" --target bench_torch
out=build/bench-torch/results
mkdir -p "$out"
./build/bench-torch/benchmarks/bench_torch --polyak_max_size="$max_size" --benchmark_repetitions=3 \
  --benchmark_report_aggregates_only=true --benchmark_out_format=json --benchmark_out="$out/torch.json" >&2
"$python" benchmarks/compare_pytorch.py - --torch-json "$out/torch.json" | tee "$out/table.md"
