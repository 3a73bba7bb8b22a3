#!/usr/bin/env bash
# Set up and run the whole test suite (offline): libopus, the test lock, then the lock check, lint,
# format and type checks, and pytest. The tiny stand-in models are built on first use into
# build/test-models/ (cached). Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
scripts/setup.sh test
python3 scripts/lock.py --check
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
