#!/usr/bin/env bash
# Builds and runs polyak's flagship example.
#   usage (as root on a fresh Debian machine): bash scripts/example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh g++ cmake make libeigen3-dev
cmake -S . -B build/example -DCMAKE_BUILD_TYPE=Release -DPOLYAK_BUILD_TESTS=OFF >/dev/null
cmake --build build/example -j "$(nproc)" --target quickstart
./build/example/examples/quickstart
