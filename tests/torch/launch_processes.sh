#!/bin/sh
# Starts N processes of a program the way torchrun starts a job on one machine: each learns RANK,
# LOCAL_RANK and WORLD_SIZE from its environment, and the store to meet at from POLYAK_TEST_STORE
# ("file:<path>" or "tcp:<folder>", see tests/torch/test_c10d.cpp), in a fresh folder
# (POLYAK_TEST_FOLDER) removed afterwards. Fails if any process fails, showing each one's output.
#   usage: launch_processes.sh N file|tcp PROGRAM [ARGUMENT...]
set -u
[ $# -ge 3 ] || { echo "usage: $0 N file|tcp PROGRAM [ARGUMENT...]" >&2; exit 2; }
n=$1 kind=$2
shift 2
folder=$(mktemp -d)
trap 'rm -rf "$folder"' EXIT
case $kind in
  file) store="file:$folder/store" ;;
  tcp) store="tcp:$folder" ;;
  *) echo "$0: the store is file or tcp, not '$kind'" >&2; exit 2 ;;
esac
pids=""
r=0
while [ "$r" -lt "$n" ]; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=$n POLYAK_TEST_STORE=$store POLYAK_TEST_FOLDER=$folder \
    "$@" >"$folder/output.$r" 2>&1 &
  pids="$pids $!"
  r=$((r + 1))
done
failed=0
r=0
for pid in $pids; do
  if ! wait "$pid"; then
    failed=1
    echo "== rank $r failed:"
    cat "$folder/output.$r"
  fi
  r=$((r + 1))
done
[ "$failed" -eq 0 ] && echo "all $n processes passed ($kind store)"
exit "$failed"
