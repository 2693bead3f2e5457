#!/bin/sh
# Starts N processes of a program on this machine the way torchrun does: RANK, LOCAL_RANK,
# WORLD_SIZE, and MASTER_ADDR / MASTER_PORT (127.0.0.1 and a port no one listens on) in each one's
# environment; the first process serves the store there. Waits for all; fails if any fails. Stopped
# (INT, TERM, HUP), it stops them.
#   usage: examples/libtorch_local_sgd/launch.sh N PROGRAM [ARGUMENT...]
set -u
[ $# -ge 2 ] || { echo "usage: $0 N PROGRAM [ARGUMENT...]" >&2; exit 2; }
n=$1
shift
case $n in
  '' | *[!0-9]* | 0* | ????*) echo "$0: N must be a whole number in [1, 999], not '$n'" >&2; exit 2 ;;
esac
port=""
for try in 1 2 3 4 5 6 7 8 9 10; do
  candidate=$(shuf -i 20000-59999 -n 1)
  if ! ss -ltn "sport = :$candidate" | grep -q LISTEN; then port=$candidate; break; fi
done
[ -n "$port" ] || { echo "$0: found no free port" >&2; exit 1; }
pids=""
trap 'for pid in $pids; do kill -TERM "$pid" 2>/dev/null; done; exit 1' INT TERM HUP
r=0
while [ "$r" -lt "$n" ]; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$@" &
  pids="$pids $!"
  r=$((r + 1))
done
failed=0
for pid in $pids; do wait "$pid" || failed=1; done
exit "$failed"
