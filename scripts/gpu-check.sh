#!/usr/bin/env bash
# The whole GPU check in one run of at most --deadline seconds (540: 9 minutes), every table into one
# folder (--out) with the machine and the commands in its README.md. docs/gpu-check.md says what each
# step answers. The steps, each under the time left (a step that would start too late is skipped):
#   1. models: the full-size random-weight stand-ins, built or reused (build/bench-models);
#   2. shapes: python -m benchmarks.gpu_shapes: ONNX Runtime's CUDA provider with IO binding, and
#      torch with one CUDA graph per length bucket, against the calls the server makes today;
#   3. capacity-shared: one engine per GPU shared by every front-end worker: Ray Serve on the box,
#      one replica per model holding the GPU, @serve.batch up to 64, `serve --workers auto` in front;
#   4. capacity-onnx-cuda: the same ramp on ONNX Runtime's CUDA provider, an engine per worker;
#   5. capacity-torch: the same ramp on torch, an engine (and a CUDA context) per worker: the shape
#      measured on the H200 on 2026-12-04, the baseline of the two above;
#   6. bench_gpu: python -m benchmarks.gpu: torch batch scaling at batch 1/8/32/128, fp32 and fp16.
# The ramps go to 2,000 continuous talkers with the load generator on its own cores (the second half
# of the box's CPUs unless --server-cpus says otherwise).
#
#   scripts/gpu-check.sh                         # on a GPU box
#   scripts/gpu-check.sh --wheels .whl           # ... installing wheels first (the box has no network):
#                                                #     onnxruntime-gpu and ray at our locks' versions
#   scripts/gpu-check.sh --device cpu --small    # here, on a CPU: the same steps at small sizes (the dry run)
#
# Options: --device cuda|cuda:N|cpu  --out DIR  --small  --ramp N,N,..  --duration S  --python PY
#          --deadline S (the whole run)  --budget S (seconds per model in bench_gpu)  --wheels DIR
#          --server-cpus LIST (pin the server there and the load generator elsewhere, e.g. 0-7)
#          --procs N (load generator processes)
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda OUT="build/gpu-check/$(date -u +%Y%m%d-%H%M%S)" SMALL=0 RAMP="" DURATION="" PY=.venv/bin/python
BUDGET="" DEADLINE=540 WHEELS="" SERVER_CPUS="" PROCS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --small) SMALL=1; shift ;;
    --ramp) RAMP="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --deadline) DEADLINE="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --server-cpus) SERVER_CPUS="$2"; shift 2 ;;
    --procs) PROCS="$2"; shift 2 ;;
    *) echo "gpu-check: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -x "$PY" ] || PY=python3
T0=$(date +%s)
if [ "$SMALL" = 1 ]; then
  SIZE=tiny MODELS=build/gpu-check-models BATCHES=1,8 PRECISIONS=fp32 BUDGET=${BUDGET:-60}
  RAMP=${RAMP:-4,8} DURATION=${DURATION:-15} SHAPE_BATCHES=1,4 BUCKETS=2,4 ASR_BATCH=4
else
  SIZE=full MODELS=build/bench-models BATCHES=1,8,32,128 PRECISIONS=fp32,fp16 BUDGET=${BUDGET:-60}
  RAMP=${RAMP:-250,500,1000,2000} DURATION=${DURATION:-15} SHAPE_BATCHES=1,8,32,64 BUCKETS=2,4,8 ASR_BATCH=64
fi
CORES=$(nproc)
if [ -z "$SERVER_CPUS" ] && [ "$CORES" -ge 8 ]; then  # the generator on its own cores: the second half
  SERVER_CPUS="0-$(( CORES / 2 - 1 ))" PROCS=${PROCS:-$(( CORES / 2 ))}
fi
LOAD=()
[ -n "$SERVER_CPUS" ] && LOAD+=(--server-cpus "$SERVER_CPUS")
[ -n "$PROCS" ] && LOAD+=(--procs "$PROCS")
mkdir -p "$OUT"
SUMMARY="$OUT/README.md"
STATUS=0

left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }

step() {  # step NAME COMMAND...: run under the time left, keep its output in OUT/NAME.log, note its status and time
  local name="$1"; shift
  local t=$(date +%s) remain=$(left)
  if [ "$remain" -lt 20 ]; then
    echo "| $name | skipped: ${remain} s left of --deadline $DEADLINE | - | - |" >>"$SUMMARY"
    STATUS=1
    return 1
  fi
  echo "gpu-check: $name ($remain s left): $*" >&2
  timeout --signal=INT --kill-after=15 "$remain" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc = 0 ] || STATUS=1
  [ $rc = 124 ] && echo "(stopped at the deadline)" >>"$OUT/$name.log"
  printf '| %s | `%s` | %s | %d s |\n' "$name" "$*" "$rc" "$(( $(date +%s) - t ))" >>"$SUMMARY"
  tail -n 3 "$OUT/$name.log" >&2
  return $rc
}

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- machine: $(uname -srm), $CORES cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- device $DEVICE, models $SIZE ($MODELS), checkout $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- ramp $RAMP continuous talkers, $DURATION s a step; server CPUs ${SERVER_CPUS:-all} (the generator on the others)"
  echo
  echo "| step | command | exit | time |"
  echo "| --- | --- | ---: | ---: |"
} >"$SUMMARY"

if [ -n "$WHEELS" ]; then  # the box has no network: what it lacks comes as wheels
  step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$OUT/site" \
    "$WHEELS"/*.whl && export PYTHONPATH="$PWD/$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step models "$PY" -m benchmarks.standins --size "$SIZE" --out "$MODELS"
step shapes "$PY" -m benchmarks.gpu_shapes --device "$DEVICE" --models "$MODELS" --batches "$SHAPE_BATCHES" \
  --buckets "$BUCKETS" --budget-s "$BUDGET" --out "$OUT/shapes.md"

ramp() {  # ramp NAME --set KEY=VALUE...: the load test against `serve --workers auto` with these settings
  local name="$1"; shift
  step "$name" "$PY" -m benchmarks.capacity --models "$MODELS" --ramp "$RAMP" --duration "$DURATION" \
    --set workers=auto "$@" --no-stop "${LOAD[@]}" --out "$OUT/$name"
}

GPUS=0
[ "$DEVICE" != cpu ] && GPUS=1
if ! "$PY" -c 'import ray' 2>/dev/null; then
  echo "| capacity-shared | skipped: no ray here (install requirements/ray.txt, or its wheels with --wheels) | - | - |" >>"$SUMMARY"
elif [ "$(left)" -lt 20 ]; then
  step capacity-shared true  # too late to start Ray: noted as skipped
else
  RAY=("$PY" -m ray.scripts.scripts)
  PIN=()
  [ -n "$SERVER_CPUS" ] && PIN=(taskset -c "$SERVER_CPUS")
  # Ray's own processes (and so the replicas) run on the server's cores; it stops whatever happens
  trap '"${RAY[@]}" stop --force >/dev/null 2>&1' EXIT
  if "${PIN[@]}" "${RAY[@]}" start --head --num-cpus "$CORES" --num-gpus "$GPUS" --disable-usage-stats \
      --include-dashboard false >"$OUT/ray-start.log" 2>&1; then
    ramp capacity-shared --set inference.mode=ray --set inference.address=auto --set "engine.device=$DEVICE" \
      --set "inference.asr.num_gpus=$GPUS" --set "inference.speaker.num_gpus=$GPUS" \
      --set "inference.asr.max_batch_size=$ASR_BATCH" --set "inference.asr.max_ongoing_requests=$(( ASR_BATCH * 2 ))" \
      --set "inference.max_in_flight=$(( ASR_BATCH * 2 ))"
  else
    echo "| capacity-shared | skipped: ray start failed (ray-start.log) | - | - |" >>"$SUMMARY"
    STATUS=1
  fi
  "${RAY[@]}" stop --force >/dev/null 2>&1
fi
if [ "$DEVICE" = cpu ]; then
  ramp capacity-onnx --set engine.backend=onnx
elif "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
  ramp capacity-onnx-cuda --set engine.backend=onnx --set "engine.device=$DEVICE"
else
  echo "| capacity-onnx-cuda | skipped: onnxruntime has no CUDAExecutionProvider here (requirements/gpu.txt, or --wheels) | - | - |" >>"$SUMMARY"
fi
ramp capacity-torch --set engine.backend=torch --set "engine.device=$DEVICE"
step bench_gpu "$PY" -m benchmarks.gpu --device "$DEVICE" --models "$MODELS" --batches "$BATCHES" \
  --precisions "$PRECISIONS" --budget-s "$BUDGET" --out "$OUT/bench_gpu.md" --json "$OUT/bench_gpu.json"

{
  echo
  echo "Total $(( $(date +%s) - T0 )) s of --deadline $DEADLINE. Tables: shapes.md, capacity-*/, bench_gpu.md (each step's full output in its .log)."
  for f in "$OUT"/shapes.md "$OUT"/capacity-*/summary.md "$OUT"/bench_gpu.md; do
    [ -f "$f" ] && { echo; echo "## ${f#"$OUT"/}"; echo; cat "$f"; }
  done
} >>"$SUMMARY"
echo "gpu-check: done in $(( $(date +%s) - T0 )) s, status $STATUS: $SUMMARY" >&2
exit $STATUS
