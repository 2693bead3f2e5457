#!/usr/bin/env bash
# Builds polyak's tests and runs them, one check after another; each check can also run alone.
#   usage (as root on a fresh Debian machine): bash scripts/test.sh [CHECK...]   (default: all)
# The checks:
#   tests     GCC, C++17: the unit and reference tests, MPI tests through mpirun, the examples, the
#             checkpoint tests (resume, crash, Python interop), the compile-fail cases, the layers,
#             every public header alone (and the core's for Windows with MinGW-w64), the headers'
#             warnings under GCC's and clang's strictest sets, the consumers, the benchmarks' smoke runs
#   sanitize  the suite under AddressSanitizer and UndefinedBehaviorSanitizer (but the examples that
#             train, and the compile-only checks)
#   matrix    the unit tests built and run with Clang at C++17, and with GCC and Clang at C++20
#   fuzz      a minute of libFuzzer on the safetensors reader
#   format    clang-format
set -euo pipefail
cd "$(dirname "$0")/.."
all_checks=(tests sanitize matrix fuzz format)
checks=("$@")
((${#checks[@]})) || checks=("${all_checks[@]}")
for check in "${checks[@]}"; do
  [[ " ${all_checks[*]} " == *" $check "* ]] || { echo "polyak: unknown check '$check' (${all_checks[*]})" >&2; exit 2; }
done
bash scripts/install-deps.sh g++ cmake make libeigen3-dev catch2 clang-format libopenmpi-dev openmpi-bin \
  libbenchmark-dev nlohmann-json3-dev doxygen python3-numpy clang libclang-rt-14-dev libtorch-dev libgloo-dev libdlib-dev libyaml-cpp-dev \
  libblas-dev liblapack-dev libjpeg-dev \
  g++-mingw-w64-x86-64-posix

jobs=$(nproc)
ctest_args=()
run_suite() {  # build dir, compiler flags, extra cmake arguments...
  local dir=$1 flags=$2; shift 2
  # Optimized (the examples run as tests) but with assertions on: no NDEBUG. Line tables only (-g1):
  # enough for the sanitizers' stack traces, and full debug info doubles the build (libtorch's most).
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$flags" \
    -DPOLYAK_BUILD_EXAMPLES=ON -DPOLYAK_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
  ctest --test-dir "$dir" -j "$jobs" --output-on-failure "${ctest_args[@]}"
}

check_tests() {
  ctest_args=()
  run_suite build/test "-O2 -g1" -DPOLYAK_BUILD_BENCHMARKS=ON
}

check_sanitize() {
  # (the compile-fail, configure, consumer and header checks test no new code here; benchmarks are not
  # built)
  ctest_args=(-E "^(compile_fail|configure|consumer|benchmark|header_warnings|header_compile|layers)\\.")
  # -O0: instrumented code builds in 60% of the time -O1 takes (test_power_ema.cpp: 24 s against 39),
  # which is most of this check. The examples that train are not built here (examples/CMakeLists.txt).
  # One translation unit a binary (CMake's unity build): each test file's headers are parsed once a
  # binary, not once a file. The "tests" build compiles each file alone; a name two test files both
  # define at namespace scope fails here, at compile time.
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 run_suite build/sanitize "-O0 -g1" \
    -DPOLYAK_SANITIZE=ON -DPOLYAK_BUILD_BENCHMARKS=OFF -DCMAKE_UNITY_BUILD=ON -DCMAKE_UNITY_BUILD_BATCH_SIZE=0
}

check_matrix() {
  # The unit tests (core and checkpoints; libtorch's and MPI's ran in "tests") in the other cells of
  # {GCC, Clang} x {C++17, C++20}, unoptimized: what differs between them is the compiling. -O0 builds
  # in 36 s where -O1 took 65 (Clang, C++20, 2 cores); the tests then run in 3.5 s. A unity build (one
  # translation unit a binary, as in "sanitize") builds both binaries in 35 s where a file a unit took 76.
  local cell compiler standard
  for cell in clang++:17 g++:20 clang++:20; do
    compiler=${cell%%:*} standard=${cell##*:}
    echo "-- $compiler, C++$standard"
    local dir="build/matrix-$compiler-$standard"
    cmake -S . -B "$dir" -DCMAKE_CXX_COMPILER="$compiler" -DCMAKE_CXX_STANDARD="$standard" \
      -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O0" -DPOLYAK_WERROR=ON -DPOLYAK_WITH_TORCH=OFF \
      -DPOLYAK_BUILD_EXAMPLES=OFF -DCMAKE_UNITY_BUILD=ON -DCMAKE_UNITY_BUILD_BATCH_SIZE=0 >/dev/null
    cmake --build "$dir" -j "$jobs" --target polyak_core_tests polyak_checkpoint_tests
    "$dir/tests/polyak_core_tests" --order rand
    "$dir/tests/polyak_checkpoint_tests" --order rand
  done
}

check_fuzz() {
  bash tests/fuzz/run.sh 60
}

check_format() {
  git ls-files '*.hpp' '*.cpp' | xargs clang-format --dry-run --Werror
}

for check in "${checks[@]}"; do
  echo "== $check"
  started=$SECONDS
  "check_$check"
  echo "== $check: $((SECONDS - started)) s"
done
echo "polyak: checks passed: ${checks[*]}"
