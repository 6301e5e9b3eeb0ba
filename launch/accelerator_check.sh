#!/usr/bin/env bash
# One-command accelerator check: ViT-B/32 bf16 (+ RoCLIP) on the GPUs or TPU chips of one host.
#
#   launch/accelerator_check.sh
#
# 1. The dry run (`roclip_jax.main --config.dry_run=True`) compiles the CLIP and RoCLIP matching steps
#    at two probe batches; their peak memory per device, fitted linearly in the batch, picks the
#    largest power-of-two batch per device that fits in FIT_FRACTION of the device memory, and a
#    third dry run confirms it (halving until one fits).
# 2. The throughput benchmark (`roclip_jax.bench.throughput`) times the real train steps at that batch
#    (halving again if the step itself runs out of memory).
# 3. A summary: pairs/s per device, MFU (bf16 dense peak of the device), peak memory and the RoCLIP
#    pool lookup's share of a matching step.
# The whole check stays under 8 minutes on an H100/H200 or a TPU v4/v5e host (BUDGET_S; it stops with
# an error if a phase would overrun). It refuses a CPU-only host: there is nothing to measure there.
#
# Environment (defaults in brackets):
#   PYTHON               the interpreter with roclip_jax installed         [python]
#   CONFIG               config and variant                                [configs/vitb32.py:defense=roclip,bf16]
#   PROBE_BATCH          per-device batch of the first dry run             [128]
#   MAX_BATCH            largest per-device batch tried                     [4096]
#   FIT_FRACTION         share of device memory the dry-run peak may use    [0.85]
#   STEPS                timed steps of the throughput benchmark            [20]
#   BUDGET_S             wall-clock budget of the whole check, seconds      [480]
#   ACCEL_CHECK_ALLOW_CPU=1  run on a CPU anyway (a smoke test of this script: use a tiny CONFIG,
#                        e.g. CONFIG=configs/demo.py PROBE_BATCH=4 MAX_BATCH=16 STEPS=2)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-configs/vitb32.py:defense=roclip,bf16}
PROBE_BATCH=${PROBE_BATCH:-128}
MAX_BATCH=${MAX_BATCH:-4096}
FIT_FRACTION=${FIT_FRACTION:-0.85}
STEPS=${STEPS:-20}
BUDGET_S=${BUDGET_S:-480}
WORKDIR=$(mktemp -d)
trap 'rm -rf "$WORKDIR"' EXIT
SECONDS=0

fail() {
  echo "accelerator_check: $*" >&2
  exit 1
}

# ---------------------------------------------------------------- the host's devices
read -r PLATFORM COUNT MEMORY KIND < <("$PYTHON" -c '
import os, jax
devices = jax.devices()
stats = devices[0].memory_stats() or {}
memory = stats.get("bytes_limit")
if memory is None and devices[0].platform == "cpu":  # No device memory: the host RAM available.
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // len(devices)
print(devices[0].platform, len(devices), int(memory or 0), devices[0].device_kind.replace(" ", "_"))
') || fail "could not start JAX with $PYTHON; install the repository (pip install -e .) and the JAX build for this accelerator."
KIND=${KIND//_/ }
if [[ "$PLATFORM" == "cpu" && "${ACCEL_CHECK_ALLOW_CPU:-0}" != "1" ]]; then
  fail "JAX sees only CPU devices ($COUNT x $KIND); this check needs a GPU or TPU host. Install the CUDA or TPU \
build of jax (pip install -U 'jax[cuda12]' or 'jax[tpu]') and check that jax.devices() lists the accelerator. \
(ACCEL_CHECK_ALLOW_CPU=1 runs it on the CPU as a smoke test of this script; its figures mean nothing.)"
fi
if ((MEMORY <= 0)); then
  fail "$KIND reports no memory limit (memory_stats()['bytes_limit']); cannot size the batch."
fi
echo "accelerator_check: $COUNT x $KIND ($PLATFORM), $(awk -v m="$MEMORY" 'BEGIN{printf "%.1f", m/2^30}') GiB per device; config $CONFIG"

# The step's peak memory per device (GiB, the largest over the compiled steps) for a per-device batch, or
# nothing if it does not compile (out of memory at compile time).
dry_run_peak() {
  local per_device=$1 left=$((BUDGET_S - SECONDS)) log="$WORKDIR/dry_run_$1.log"
  ((left > 60)) || fail "out of time (${SECONDS}s of ${BUDGET_S}s) before the dry run at batch $per_device per device."
  if ! timeout "$left" "$PYTHON" -m roclip_jax.main --config="$CONFIG" --workdir="$WORKDIR/run" \
    --config.dry_run=True --config.data.source=demo --config.data.batch_size=$((per_device * COUNT)) \
    --config.model.dtype=bfloat16 >"$log" 2>&1; then
    grep -qiE "RESOURCE_EXHAUSTED|out of memory" "$log" && return 0
    tail -n 20 "$log" >&2
    fail "the dry run at batch $per_device per device failed (log above)."
  fi
  grep -qE "peak memory [0-9.]+ GiB" "$log" || fail "the dry run printed no peak memory (log: $(tail -n 5 "$log"))."
  grep -oE "peak memory [0-9.]+ GiB" "$log" | awk '{print $3}' | sort -g | tail -n 1
}

fits() { # fits PEAK_GIB: whether it fits FIT_FRACTION of the device memory
  [[ -n "$1" ]] && awk -v p="$1" -v m="$MEMORY" -v f="$FIT_FRACTION" 'BEGIN{exit !(p * 2^30 <= f * m)}'
}

# ---------------------------------------------------------------- 1. dry runs: the largest batch that fits
probe=$PROBE_BATCH
peak1=$(dry_run_peak "$probe")
while ! fits "$peak1"; do
  ((probe > 1)) || fail "even batch 1 per device does not fit in $KIND's memory."
  probe=$((probe / 2))
  peak1=$(dry_run_peak "$probe")
done
peak2=$(dry_run_peak $((2 * probe)))
if fits "$peak2"; then
  # Memory is affine in the batch (weights + optimizer state, plus activations per example).
  batch=$(awk -v b="$probe" -v p1="$peak1" -v p2="$peak2" -v m="$MEMORY" -v f="$FIT_FRACTION" -v max="$MAX_BATCH" 'BEGIN{
    per = (p2 - p1) / b; fixed = p1 - per * b; best = 2 * b
    for (c = 4 * b; c <= max; c *= 2) if (per <= 0 || fixed + per * c <= f * m / 2^30) best = c
    print best}')
  peak=$peak2
  if ((batch > 2 * probe)); then
    peak=$(dry_run_peak "$batch")
    while ! fits "$peak" && ((batch > 2 * probe)); do
      batch=$((batch / 2))
      peak=$(dry_run_peak "$batch")
    done
    if ! fits "$peak"; then batch=$((2 * probe)) peak=$peak2; fi
  fi
else
  batch=$probe peak=$peak1
fi
echo "accelerator_check: batch $batch per device fits (dry-run peak $peak GiB; ${SECONDS}s so far)"

# ---------------------------------------------------------------- 2. throughput at that batch
bench_log="$WORKDIR/throughput.log"
while :; do
  left=$((BUDGET_S - SECONDS))
  ((left > 30)) || fail "out of time (${SECONDS}s of ${BUDGET_S}s) before the throughput benchmark."
  if timeout "$left" "$PYTHON" -m roclip_jax.bench.throughput --config="$CONFIG" --config.model.dtype=bfloat16 \
    --batch=$((batch * COUNT)) --steps="$STEPS" --torch=off >"$bench_log" 2>&1; then
    break
  fi
  if grep -qiE "RESOURCE_EXHAUSTED|out of memory" "$bench_log" && ((batch > 1)); then
    batch=$((batch / 2))
    echo "accelerator_check: out of memory in the benchmark; retrying at batch $batch per device"
    continue
  fi
  tail -n 20 "$bench_log" >&2
  fail "the throughput benchmark failed (log above)."
done
cat "$bench_log"

# ---------------------------------------------------------------- 3. summary
# The first number in the benchmark's first match of PATTERN (empty if none; `|| true`: a missing figure
# is reported below, not by `set -e`).
number() { { grep -m1 -oE "$1" "$bench_log" | grep -oE "[0-9][0-9,]*\.?[0-9]*" | head -n 1 | tr -d ,; } || true; }
pairs=$(number "[0-9,.]+ pairs/s per device")
mfu=$(number "MFU: [0-9.]+%")
mfu_note="bf16 dense peak of $KIND"
if [[ -z "$mfu" ]]; then # No rated peak (a CPU): the share of a measured matmul peak.
  mfu=$(number "[0-9.]+% of a measured")
  mfu_note="of a measured matmul peak, not a rated one"
fi
memory=$(number "peak memory per device: [0-9.]+ GiB")
share=$(number "= [0-9.]+% of the matching step")
[[ -n "$pairs" && -n "$mfu" && -n "$memory" && -n "$share" ]] || fail "could not read the benchmark's figures from its output (above)."
echo "== accelerator check: $COUNT x $KIND ($PLATFORM), config $CONFIG, bfloat16 =="
echo "batch per device: $batch (dry-run peak $peak GiB)"
echo "pairs/s per device: $pairs"
echo "MFU: $mfu% ($mfu_note)"
echo "peak memory per device: $memory GiB"
echo "pool lookup share of a matching step: $share%"
echo "elapsed: ${SECONDS} s"
