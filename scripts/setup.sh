#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for asr-server: libopus, a virtual environment, the package.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh torch,test   (default: none, ONNX serving only)
# Idempotent: re-running installs only what is missing. Honors PYTHON (default python3.11, else python3)
# and VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"

have_libopus() { ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0'; }
if ! have_libopus; then
    echo "setup: installing libopus0 (apt)" >&2
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libopus0 >/dev/null
fi

python="${PYTHON:-}"
if [ -z "$python" ]; then
    python=$(command -v python3.11 || command -v python3)
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv with $($python --version)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "setup: pip install -e '$spec'" >&2
"$venv/bin/python" -m pip install -q -e "$spec"
# The Silero VAD ONNX file ships in the silero-vad package; its torch dependency serves only the
# package's own Python API, so ONNX serving takes the file without it.
"$venv/bin/python" -m pip show -q silero-vad >/dev/null 2>&1 || "$venv/bin/python" -m pip install -q --no-deps "silero-vad>=5.1"
