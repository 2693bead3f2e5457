#!/usr/bin/env bash
# Builds the safetensors fuzzer with clang (libFuzzer, AddressSanitizer, UndefinedBehaviorSanitizer)
# and runs it for a bounded time from the committed seed corpus.
#   usage: bash tests/fuzz/run.sh [seconds, default 60]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}
out=build/fuzz
mkdir -p "$out/corpus"
cp tests/fuzz/corpus/* "$out/corpus/"
clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -Iinclude -I/usr/include/eigen3 tests/fuzz/fuzz_safetensors.cpp -o "$out/fuzz_safetensors"
# Leaks checked, inputs up to 64 KiB; libFuzzer exits non-zero on any finding.
status=0
"$out/fuzz_safetensors" -max_total_time="$seconds" -max_len=65536 -detect_leaks=1 -print_final_stats=1 \
  "$out/corpus" >"$out/log.txt" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then
  tail -60 "$out/log.txt"
  exit "$status"
fi
grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$out/log.txt"
echo "fuzz: no crash, no leak, only FormatError in $seconds s"
