#!/usr/bin/env bash
# Runs one training as N processes on this machine, talking over 127.0.0.1: a multi-host run to debug
# on a laptop (CPU, fake devices). Every process runs the same command, as on a pod or a cluster.
#
#   launch/local_multiprocess.sh [NUM_PROCESSES] [DEVICES_PER_PROCESS] -- <roclip_jax.main flags>
#   launch/local_multiprocess.sh 2 4 -- --config=configs/demo.py --workdir=/tmp/mp \
#       --config.mesh="(('data', 2), ('fsdp', 4))"
#
# Environment:
#   PYTHON   interpreter (default: .venv/bin/python if present, else python3)
#   PORT     coordinator port on 127.0.0.1 (default: a free one)
#   LOGDIR   per-process logs process_<i>.log (default: a new directory under /tmp)
# Process 0's log is also shown here. Ctrl-C stops every process this script started.
set -euo pipefail

cd "$(dirname "$0")/.."
NUM_PROCESSES=2
DEVICES=4
if [[ $# -gt 0 && "$1" != "--" ]]; then NUM_PROCESSES=$1; shift; fi
if [[ $# -gt 0 && "$1" != "--" ]]; then DEVICES=$1; shift; fi
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi
if [[ $# -eq 0 ]]; then
  echo "usage: $0 [NUM_PROCESSES] [DEVICES_PER_PROCESS] -- --config=... --workdir=... [flags]" >&2
  exit 2
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOGDIR=${LOGDIR:-$(mktemp -d /tmp/roclip_multiprocess.XXXXXX)}
mkdir -p "$LOGDIR"
echo "$NUM_PROCESSES processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOGDIR"

PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES --xla_cpu_enable_concurrency_optimized_scheduler=false" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m roclip_jax.main --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES" \
    --process_id="$i" "$@" >"$LOGDIR/process_$i.log" 2>&1 &
  PIDS+=($!)
done
tail -n +1 -f "$LOGDIR/process_0.log" &
TAIL_PID=$!

STATUS=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ! wait "${PIDS[$i]}"; then
    echo "process $i failed; see $LOGDIR/process_$i.log" >&2
    STATUS=1
    stop_all  # The others would wait for it at the next collective forever.
  fi
done
kill "$TAIL_PID" 2>/dev/null || true
exit $STATUS
