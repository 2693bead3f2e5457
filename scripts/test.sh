#!/usr/bin/env bash
# Builds polyak's tests and runs them: the unit and reference tests, MPI tests through mpirun, the
# examples, the checkpoint tests (resume, crash, Python interop), the compile-fail cases, the
# header-alone build, the install / add_subdirectory consumers and the benchmarks' smoke runs; then
# the suite again under AddressSanitizer and UndefinedBehaviorSanitizer; then a minute of fuzzing
# the safetensors reader; then the format check.
#   usage (as root on a fresh Debian machine): bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh g++ cmake make libeigen3-dev catch2 clang-format libopenmpi-dev openmpi-bin \
  libbenchmark-dev nlohmann-json3-dev python3-numpy clang libclang-rt-14-dev libtorch-dev

jobs=$(nproc)
run_suite() {  # build dir, compiler flags, extra cmake arguments...
  local dir=$1 flags=$2; shift 2
  # Optimized (the examples run as tests) but with assertions on: no NDEBUG. Line tables only (-g1):
  # enough for the sanitizers' stack traces, and full debug info doubles the build (libtorch's most).
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$flags" \
    -DPOLYAK_BUILD_EXAMPLES=ON -DPOLYAK_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
  ctest --test-dir "$dir" -j "$jobs" --output-on-failure "${ctest_args[@]}"
}

echo "== tests"
ctest_args=()
run_suite build/test "-O2 -g1" -DPOLYAK_BUILD_BENCHMARKS=ON
echo "== tests under AddressSanitizer + UndefinedBehaviorSanitizer"
# (the compile-fail, consumer and header-alone checks ran above and test no new code here; benchmarks
# are not built)
ctest_args=(-E "^(compile_fail|consumer|benchmark)\\.")
# -O1, as the sanitizers' manuals advise: instrumented -O2 takes twice as long to build.
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 run_suite build/sanitize "-O1 -g1" \
  -DPOLYAK_SANITIZE=ON -DPOLYAK_BUILD_BENCHMARKS=OFF

echo "== fuzzing load_safetensors (libFuzzer + ASan + UBSan, 60 s)"
bash tests/fuzz/run.sh 60

echo "== clang-format"
git ls-files '*.hpp' '*.cpp' | xargs clang-format --dry-run --Werror
echo "polyak: all checks passed"
