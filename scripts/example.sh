#!/usr/bin/env bash
# Builds and runs polyak's flagship example, examples/swa_digits: SWA and EMA on handwritten digits.
#   usage (as root on a fresh Debian machine): bash scripts/example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh g++ cmake make libeigen3-dev nlohmann-json3-dev libyaml-cpp-dev gnuplot-nox
cmake -S . -B build/example -DCMAKE_BUILD_TYPE=Release -DPOLYAK_BUILD_TESTS=OFF -DPOLYAK_BUILD_EXAMPLES=ON >/dev/null
cmake --build build/example -j "$(nproc)" --target swa_digits polyak-merge polyak-post-hoc-ema
./build/example/examples/swa_digits/swa_digits examples/data/digits.csv build/example/swa_digits_out
