#!/usr/bin/env bash
# What including polyak costs a translation unit: CPU seconds (user + system) and peak memory of
# `g++ -std=c++17 -O2 -c` on a file holding one #include, for Eigen/Core and every module header
# (polyak/polyak.hpp, polyak/checkpoint.hpp, polyak/mpi.hpp, polyak/torch.hpp; the adapters only where
# their packages are installed), and what the checkpoint layer's cost is made of (nlohmann-json alone,
# the core with it, the core with the state header alone). The units are compiled in turn, 5 rounds;
# each unit's figures are medians over the rounds, and the ratios to the core are medians of the
# per-round ratios (this machine's noise hits a round's units alike).
#   usage: bash benchmarks/compile_time.sh        (needs GNU time: Debian's package time)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
flags=(-I/usr/include/eigen3)
command -v mpicxx >/dev/null && flags+=($(mpicxx --showme:compile))
[[ -d /usr/include/torch/csrc/api/include ]] && flags+=(-I/usr/include/torch/csrc/api/include)

units=(Eigen/Core polyak/polyak.hpp polyak/checkpoint.hpp polyak/mpi.hpp polyak/torch.hpp nlohmann/json.hpp
       polyak/polyak.hpp+nlohmann/json.hpp polyak/polyak.hpp+polyak/checkpoint/state_io.hpp)
available() {  # unit: whether its layer's packages are here
  case $1 in
    *mpi.hpp) command -v mpicxx >/dev/null ;;
    *torch.hpp) [[ -d /usr/include/torch/csrc/api/include ]] ;;
    *checkpoint* | *nlohmann*) [[ -f /usr/include/nlohmann/json.hpp ]] ;;
    *) true ;;
  esac
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

for round in 1 2 3 4 5; do
  for i in "${!units[@]}"; do
    available "${units[$i]}" || continue
    tr '+' '\n' <<<"${units[$i]}" | sed 's/.*/#include <&>/' >"$work/tu.cpp"
    /usr/bin/time -f '%U %S %M' -o "$work/time" g++ -std=c++17 -O2 -c -Iinclude "${flags[@]}" "$work/tu.cpp" \
      -o "$work/tu.o"
    read -r user system kb <"$work/time"
    awk "BEGIN { print $user + $system }" >>"$work/cpu.$i"
    echo $((kb / 1024)) >>"$work/mb.$i"
  done
done

printf '%-52s %8s %8s %14s\n' "one #include of" "CPU s" "MB" "CPU / core's"
for i in "${!units[@]}"; do
  if [[ ! -f $work/cpu.$i ]]; then printf '%-52s (not installed)\n' "${units[$i]}"; continue; fi
  ratio=$(paste "$work/cpu.$i" "$work/cpu.1" | awk '{ print $1 / $2 }' | median)
  printf '%-52s %8s %8s %14.2f\n' "${units[$i]}" "$(median <"$work/cpu.$i")" "$(median <"$work/mb.$i")" "$ratio"
done
