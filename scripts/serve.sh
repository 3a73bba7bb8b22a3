#!/usr/bin/env bash
# Set up and start the server: libopus, the Python package, the models when absent, then serve.
# Extra arguments go to `asr-server serve` (e.g. --port 8000). Set EXTRAS=torch for the torch backend
# (also needed when the models must be exported from the hubs' PyTorch weights).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "${EXTRAS:-torch}"
# Idempotent: downloads and exports only what is missing, and touches no network when all is present.
.venv/bin/asr-server models pull
exec .venv/bin/asr-server serve "$@"
