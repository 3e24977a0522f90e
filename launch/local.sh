#!/usr/bin/env bash
# Runs N training processes on this machine as N hosts (CPU, gloo collectives), each with
# DEVICES fake CPU devices. Extra arguments go to magicvideo_jax.main.
#
#   DEVICES=2 PYTHON=.venv/bin/python launch/local.sh 2 --config=configs/tiny.py --workdir=/tmp/mh
#
# Every process writes its log to WORKDIR_LOGS/process_<i>.log (default: /tmp/magicvideo_jax_local).
# The script exits non-zero if any process fails.
set -euo pipefail
N="${1:?usage: launch/local.sh NUM_PROCESSES [main.py flags...]}"
shift
DEVICES="${DEVICES:-1}"
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
LOGS="${WORKDIR_LOGS:-/tmp/magicvideo_jax_local}"
PYTHON="${PYTHON:-python}"
mkdir -p "$LOGS"
cd "$(dirname "$0")/.."
pids=()
for ((i = 0; i < N; i++)); do
  # Each process sees only its own fake devices.
  env -u XLA_FLAGS "$PYTHON" -m magicvideo_jax.main \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" \
    --num_cpu_devices="$DEVICES" "$@" >"$LOGS/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOGS/process_$i.log" >&2
    tail -n 20 "$LOGS/process_$i.log" >&2
    status=1
  fi
done
exit "$status"
