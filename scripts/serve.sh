#!/usr/bin/env bash
# Set up and start the server: libopus, the serving lock (requirements.txt, no torch), the models when
# absent, then serve. Extra arguments go to `asr-server serve` (e.g. --port 8000). SETUP=torch installs
# the torch lock instead (the torch backend, or exporting from PyTorch weights when a hub has no ONNX).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "${SETUP:-serve}"
# Idempotent: downloads only what is missing, and touches no network when all is present.
.venv/bin/asr-server models pull
exec .venv/bin/asr-server serve "$@"
