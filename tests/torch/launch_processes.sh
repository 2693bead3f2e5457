#!/bin/sh
# Starts N processes of a program the way torchrun starts a job on one machine: each learns RANK,
# LOCAL_RANK and WORLD_SIZE from its environment, and the store to meet at from POLYAK_TEST_STORE
# ("file:<path>" or "tcp:<folder>", see tests/torch/test_c10d.cpp), in a fresh folder
# (POLYAK_TEST_FOLDER) removed afterwards. Fails if any process fails, showing each failed one's
# exit status and output. Stopped (INT, TERM, HUP), it stops its processes and removes the folder.
#   usage: launch_processes.sh N file|tcp PROGRAM [ARGUMENT...]
set -u
usage="usage: $0 N file|tcp PROGRAM [ARGUMENT...] (1 <= N <= 999)"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
n=$1 kind=$2
shift 2
case $n in
  '' | *[!0-9]* | 0* | ????*) echo "$0: N must be a whole number in [1, 999], not '$n'; $usage" >&2; exit 2 ;;
esac
case $kind in
  file | tcp) ;;
  *) echo "$0: the store is file or tcp, not '$kind'" >&2; exit 2 ;;
esac
folder=$(mktemp -d)
pids=""
stop() {
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null; done
  rm -rf "$folder"
  exit 1
}
trap stop INT TERM HUP
trap 'rm -rf "$folder"' EXIT
if [ "$kind" = file ]; then store="file:$folder/store"; else store="tcp:$folder"; fi
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
  wait "$pid"
  status=$?
  if [ "$status" -ne 0 ]; then
    failed=1
    if [ "$status" -gt 128 ]; then how="killed by signal $((status - 128))"; else how="exit status $status"; fi
    echo "== rank $r failed ($how):"
    cat "$folder/output.$r"
  fi
  r=$((r + 1))
done
[ "$failed" -eq 0 ] && echo "all $n processes passed ($kind store)"
exit "$failed"
