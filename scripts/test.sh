#!/usr/bin/env bash
# Set up and run the whole test suite (offline): libopus, the test lock, then the lock check and pytest.
# The tiny stand-in models are built on first use into build/test-models/ (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
scripts/setup.sh test
python3 scripts/lock.py --check
exec .venv/bin/python -m pytest -q "$@"
