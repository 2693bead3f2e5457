#!/usr/bin/env bash
# What including polyak costs a translation unit: the median of 5 compiles (g++ -std=c++17 -O2 -c)
# of a file holding one #include, for Eigen/Core alone, polyak/core/averaged_model.hpp, the core umbrella
# polyak/polyak.hpp and the checkpoint layer; with a revision, that revision's umbrella too, in the
# same run (a worktree under /tmp).
#   usage: bash benchmarks/compile_time.sh [REVISION]     e.g. d6a3936, the umbrella before issue 13
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"; [[ -z ${old:-} ]] || git worktree remove --force "$old"' EXIT
measure() {  # include root, header
  local times=() start
  echo "#include <$2>" >"$work/tu.cpp"
  for _ in 1 2 3 4 5; do
    start=$(date +%s%N)
    g++ -std=c++17 -O2 -c -I"$1/include" -I/usr/include/eigen3 "$work/tu.cpp" -o "$work/tu.o"
    times+=($((($(date +%s%N) - start) / 1000000)))
  done
  printf '%s\n' "${times[@]}" | sort -n | sed -n 3p
}
if (($#)); then
  old="$work-old"
  git worktree add -q "$old" "$1"
  printf '%-40s %6s ms\n' "polyak/polyak.hpp at $1" "$(measure "$old" polyak/polyak.hpp)"
fi
for header in Eigen/Core polyak/core/averaged_model.hpp polyak/polyak.hpp polyak/checkpoint.hpp; do
  printf '%-40s %6s ms\n' "$header" "$(measure . "$header")"
done
