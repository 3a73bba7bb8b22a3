#!/usr/bin/env bash
# Set up and run the whole test suite (offline): libopus, the package with the torch and test extras,
# then pytest. The tiny stand-in models are built on first use into build/test-models/ (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh torch,test
exec .venv/bin/python -m pytest -q "$@"
