#!/usr/bin/env bash
# The whole GPU check in one run, sized to fit 8 minutes on a GPU box with the packages of requirements/
# (its step budgets; not yet timed on a GPU):
#   1. the full-size random-weight stand-ins, built or reused (build/bench-models);
#   2. python -m benchmarks.gpu: SenseVoice and CAM++ at batch 1/8/32/128, fp32 and fp16;
#   3. a load-test ramp against `serve --workers auto` on the device: the torch backend, and ONNX
#      Runtime's CUDA provider too where onnxruntime-gpu is installed;
# every table into one folder (--out), with the machine and the commands in its README.md.
#
#   scripts/gpu-check.sh                         # on a GPU box
#   scripts/gpu-check.sh --device cpu --small    # here, on a CPU, in about 3 minutes: the same steps, small sizes
#
# Options: --device cuda|cuda:N|cpu  --out DIR  --small  --ramp N,N,..  --duration S  --python PY
#          --budget S (seconds per model in bench_gpu)  --server-cpus LIST (pin the server there and the
#          load generator elsewhere, e.g. 0-7)  --procs N (load generator processes)
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda OUT="build/gpu-check/$(date -u +%Y%m%d-%H%M%S)" SMALL=0 RAMP="" DURATION="" PY=.venv/bin/python
BUDGET="" LOAD=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --small) SMALL=1; shift ;;
    --ramp) RAMP="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --server-cpus|--procs) LOAD+=("$1" "$2"); shift 2 ;;
    *) echo "gpu-check: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -x "$PY" ] || PY=python3
if [ "$SMALL" = 1 ]; then
  SIZE=tiny MODELS=build/gpu-check-models BATCHES=1,8 PRECISIONS=fp32 BUDGET=${BUDGET:-60}
  RAMP=${RAMP:-4,8} DURATION=${DURATION:-15}
else
  SIZE=full MODELS=build/bench-models BATCHES=1,8,32,128 PRECISIONS=fp32,fp16 BUDGET=${BUDGET:-200}
  RAMP=${RAMP:-200,400,800} DURATION=${DURATION:-40}
fi
mkdir -p "$OUT"
SUMMARY="$OUT/README.md"
STATUS=0
T0=$(date +%s)

step() {  # step NAME COMMAND...: run, keep its output in OUT/NAME.log, note its status and time
  local name="$1"; shift
  local t=$(date +%s)
  echo "gpu-check: $name: $*" >&2
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc = 0 ] || STATUS=1
  printf '| %s | `%s` | %s | %d s |\n' "$name" "$*" "$rc" "$(( $(date +%s) - t ))" >>"$SUMMARY"
  tail -n 3 "$OUT/$name.log" >&2
  return $rc
}

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- machine: $(uname -srm), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- device $DEVICE, models $SIZE ($MODELS), checkout $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| step | command | exit | time |"
  echo "| --- | --- | ---: | ---: |"
} >"$SUMMARY"

step models "$PY" -m benchmarks.standins --size "$SIZE" --out "$MODELS"
step bench_gpu "$PY" -m benchmarks.gpu --device "$DEVICE" --models "$MODELS" --batches "$BATCHES" \
  --precisions "$PRECISIONS" --budget-s "$BUDGET" --out "$OUT/bench_gpu.md" --json "$OUT/bench_gpu.json"

ENGINE_DEVICE="$DEVICE"
step capacity-torch "$PY" -m benchmarks.capacity --models "$MODELS" --ramp "$RAMP" --duration "$DURATION" \
  --set workers=auto --set engine.backend=torch --set "engine.device=$ENGINE_DEVICE" --no-stop "${LOAD[@]}" \
  --out "$OUT/capacity-torch"
if "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null \
  && [ "$DEVICE" != cpu ]; then
  step capacity-onnx-cuda "$PY" -m benchmarks.capacity --models "$MODELS" --ramp "$RAMP" --duration "$DURATION" \
    --set workers=auto --set engine.backend=onnx --set "engine.device=$ENGINE_DEVICE" --no-stop "${LOAD[@]}" \
    --out "$OUT/capacity-onnx-cuda"
elif [ "$DEVICE" = cpu ]; then
  step capacity-onnx "$PY" -m benchmarks.capacity --models "$MODELS" --ramp "$RAMP" --duration "$DURATION" \
    --set workers=auto --set engine.backend=onnx --no-stop "${LOAD[@]}" --out "$OUT/capacity-onnx"
else
  echo "| capacity-onnx-cuda | skipped: onnxruntime has no CUDAExecutionProvider here (install requirements/gpu.txt) | - | - |" >>"$SUMMARY"
fi

{
  echo
  echo "Total $(( $(date +%s) - T0 )) s. Tables: bench_gpu.md, capacity-*/ (each step's full output in its .log)."
  for f in "$OUT"/bench_gpu.md "$OUT"/capacity-*/summary.md; do
    [ -f "$f" ] && { echo; echo "## ${f#"$OUT"/}"; echo; cat "$f"; }
  done
} >>"$SUMMARY"
echo "gpu-check: done in $(( $(date +%s) - T0 )) s, status $STATUS: $SUMMARY" >&2
exit $STATUS
