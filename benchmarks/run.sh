#!/usr/bin/env bash
# Runs the benchmarks and prints the tables of polyak against the machine's limit and PyTorch.
#   usage (as root on Debian): bash benchmarks/run.sh [max size, default 1e8] [all | mpi]
# `mpi` runs bench_mpi alone (about 2 minutes at 1e8): average_parameters on 2 processes against the
# bare MPI_Allreduce and against the limit, the collective plus the passes PyTorch's semantics add,
# measured in the same rounds. Builds optimized for this machine; needs Google Benchmark, Open MPI,
# nlohmann-json and python3-torch, which it installs where missing. `all` takes about 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
max_size=${1:-1e8}
which=${2:-all}
case "$which" in
  all | mpi) ;;
  *) echo "usage: bash benchmarks/run.sh [max size] [all | mpi]" >&2; exit 2 ;;
esac
bash scripts/install-deps.sh g++ cmake make libeigen3-dev libbenchmark-dev nlohmann-json3-dev libopenmpi-dev \
  openmpi-bin python3-torch
cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DPOLYAK_BUILD_TESTS=OFF -DPOLYAK_BUILD_EXAMPLES=OFF \
  -DPOLYAK_BUILD_BENCHMARKS=ON >/dev/null
out=build/bench/results
mkdir -p "$out"
mpi() {
  mpirun -np 2 --oversubscribe --allow-run-as-root ./build/bench/benchmarks/bench_mpi --polyak_max_size="$max_size" \
    --benchmark_out_format=json --benchmark_out="$out/mpi.json" >&2  # (bench_mpi pairs its runs itself)
}
if [ "$which" = mpi ]; then
  cmake --build build/bench -j "$(nproc)" --target bench_mpi
  mpi
  /usr/bin/python3 benchmarks/compare_pytorch.py - "$out/mpi.json" | tee "$out/mpi_table.md"
  exit 0
fi
cmake --build build/bench -j "$(nproc)" --target bench_update bench_mpi
aggregate=(--benchmark_repetitions=3 --benchmark_report_aggregates_only=true --benchmark_out_format=json)
./build/bench/benchmarks/bench_update --polyak_max_size="$max_size" "${aggregate[@]}" \
  --benchmark_out="$out/update.json" >&2
mpi
/usr/bin/python3 benchmarks/compare_pytorch.py "$out/update.json" "$out/mpi.json" --max-size "$max_size" \
  | tee "$out/table.md"
