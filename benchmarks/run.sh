#!/usr/bin/env bash
# Runs every benchmark and prints the table of polyak against the machine's limit and PyTorch.
#   usage (as root on Debian): bash benchmarks/run.sh [max size, default 1e8]
# Builds optimized for this machine; needs Google Benchmark, Open MPI, nlohmann-json and
# python3-torch, which it installs where missing. Takes about 15 minutes at the full size.
set -euo pipefail
cd "$(dirname "$0")/.."
max_size=${1:-1e8}
bash scripts/install-deps.sh g++ cmake make libeigen3-dev libbenchmark-dev nlohmann-json3-dev libopenmpi-dev \
  openmpi-bin python3-torch
cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DPOLYAK_BUILD_TESTS=OFF -DPOLYAK_BUILD_EXAMPLES=OFF \
  -DPOLYAK_BUILD_BENCHMARKS=ON >/dev/null
cmake --build build/bench -j "$(nproc)" --target bench_update bench_mpi
out=build/bench/results
mkdir -p "$out"
aggregate=(--benchmark_repetitions=3 --benchmark_report_aggregates_only=true --benchmark_out_format=json)
paired=(--benchmark_out_format=json)  # bench_mpi pairs its runs itself
./build/bench/benchmarks/bench_update --polyak_max_size="$max_size" "${aggregate[@]}" \
  --benchmark_out="$out/update.json" >&2
mpirun -np 2 --oversubscribe --allow-run-as-root ./build/bench/benchmarks/bench_mpi --polyak_max_size="$max_size" "${paired[@]}" \
  --benchmark_out="$out/mpi.json" >&2
/usr/bin/python3 benchmarks/compare_pytorch.py "$out/update.json" "$out/mpi.json" --max-size "$max_size" \
  | tee "$out/table.md"
