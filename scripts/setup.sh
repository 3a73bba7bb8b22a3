#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for asr-server: libopus, a virtual environment, the locked
# packages for one purpose, then the package itself (no second resolution: the versions are the lock's).
#
#   scripts/setup.sh [serve|torch|gpu|ray|test]     (default: serve)
#     serve   requirements.txt          ONNX Runtime on CPU, no torch
#     torch   requirements/torch.txt    + pulling/exporting PyTorch weights and the torch backend
#     gpu     requirements/gpu.txt      ONNX Runtime with CUDA (onnxruntime-gpu), no torch
#     ray     requirements/ray.txt      + Ray Serve (inference.mode: ray, docs/ray.md), no torch
#     test    requirements/test.txt     + the test suite, load test and benchmarks (and Chromium, apt)
#
# Idempotent: a venv already holding the lock is left as it is. Honors PYTHON (default python3.11,
# else python3) and VENV (default .venv). The locks are regenerated with `python3 scripts/lock.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
purpose="${1:-serve}"
venv="${VENV:-.venv}"

case "$purpose" in
    serve) lock=requirements.txt ;;
    torch|gpu|ray|test) lock="requirements/$purpose.txt" ;;
    *) echo "setup: unknown purpose '$purpose' (use serve, torch, gpu, ray or test)" >&2; exit 2 ;;
esac

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0'; then
    echo "setup: installing libopus0 (apt)" >&2
    apt_install libopus0
fi

# The browser console's tests drive Debian's Chromium headless (Playwright's own browser download is not used).
if [ "$purpose" = test ] && [ ! -x /usr/bin/chromium ]; then
    echo "setup: installing chromium (apt), for the browser console's tests" >&2
    apt_install chromium
fi

python="${PYTHON:-}"
if [ -z "$python" ]; then
    python=$(command -v python3.11 || command -v python3)
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv with $($python --version)" >&2
    "$python" -m venv "$venv"
fi

stamp="$venv/.asr-server-locks"
want="$(sha256sum requirements/build.txt "$lock" pyproject.toml | sha256sum | cut -c1-64) $lock"
if [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
    echo "setup: $venv already holds $lock" >&2
else
    "$venv/bin/python" scripts/install_locked.py requirements/build.txt "$lock"
    echo "setup: pip install --no-deps --no-build-isolation -e ." >&2
    "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e . \
        >>build/setup-pip.log 2>&1 || { echo "setup: installing the package failed; see build/setup-pip.log" >&2; exit 2; }
    echo "$want" >>"$stamp"
fi
