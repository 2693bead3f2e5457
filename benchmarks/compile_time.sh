#!/usr/bin/env bash
# What including polyak costs a translation unit: CPU seconds (user + system) and peak memory of
# `g++ -std=c++17 -O2 -c` on a file holding one #include, the median of 5 compiles, for Eigen/Core
# alone and every module header (polyak/polyak.hpp, polyak/checkpoint.hpp, polyak/mpi.hpp,
# polyak/torch.hpp; the adapters only where their packages are installed), and the checkpoint layer's
# cost against the core's. With a revision, that revision's polyak/polyak.hpp too, in the same run.
#   usage: bash benchmarks/compile_time.sh [REVISION]      (needs GNU time: Debian's package time)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"; [[ -z ${old:-} ]] || git worktree remove --force "$old"' EXIT
flags=(-I/usr/include/eigen3)
command -v mpicxx >/dev/null && flags+=($(mpicxx --showme:compile))
[[ -d /usr/include/torch/csrc/api/include ]] && flags+=(-I/usr/include/torch/csrc/api/include)

measure() {  # include root, header[+header...]: prints "cpu_seconds peak_MB" (medians of 5)
  local cpus=() mems=() line
  tr '+' '\n' <<<"$2" | sed 's/.*/#include <&>/' >"$work/tu.cpp"
  for _ in 1 2 3 4 5; do
    /usr/bin/time -f '%U %S %M' -o "$work/time" g++ -std=c++17 -O2 -c -I"$1/include" "${flags[@]}" \
      "$work/tu.cpp" -o "$work/tu.o"
    read -r user system kb <"$work/time"
    cpus+=("$(awk "BEGIN { print $user + $system }")") mems+=($((kb / 1024)))
  done
  line="$(printf '%s\n' "${cpus[@]}" | sort -n | sed -n 3p) $(printf '%s\n' "${mems[@]}" | sort -n | sed -n 3p)"
  echo "$line"
}
report() {  # label, include root, header
  local result
  result=$(measure "$2" "$3")
  printf '%-56s %8s s %7s MB\n' "$1" ${result}
  echo "$result" >"$work/$(echo "$1" | tr '/ +' '___')"
}
available() {  # header: whether its layer's packages are here
  case $1 in
    polyak/mpi.hpp) command -v mpicxx >/dev/null ;;
    polyak/torch.hpp) [[ -d /usr/include/torch/csrc/api/include ]] ;;
    polyak/checkpoint.hpp | *nlohmann* | *checkpoint/*) [[ -f /usr/include/nlohmann/json.hpp ]] ;;
    *) true ;;
  esac
}

printf '%-56s %10s %10s\n' "one #include of" "CPU" "memory"
if (($#)); then
  old="$work-old"
  git worktree add -q "$old" "$1"
  report "polyak/polyak.hpp at $1" "$old" polyak/polyak.hpp
fi
# Then what the checkpoint layer's cost is made of: nlohmann-json alone, the core with it (the floor of
# any header that parses JSON), and the core with the state header alone (no JSON).
for header in Eigen/Core polyak/polyak.hpp polyak/checkpoint.hpp polyak/mpi.hpp polyak/torch.hpp \
  nlohmann/json.hpp polyak/polyak.hpp+nlohmann/json.hpp polyak/polyak.hpp+polyak/checkpoint/state_io.hpp; do
  if available "$header"; then report "$header" . "$header"; else printf '%-56s (not installed)\n' "$header"; fi
done
if [[ -f $work/polyak_checkpoint.hpp ]]; then
  read -r core _ <"$work/polyak_polyak.hpp"
  read -r checkpoint _ <"$work/polyak_checkpoint.hpp"
  awk "BEGIN { printf \"polyak/checkpoint.hpp / polyak/polyak.hpp: %.2f (CPU)\\n\", $checkpoint / $core }"
fi
