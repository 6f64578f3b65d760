#!/usr/bin/env bash
# Set up and run the tests (the README's second Quickstart command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[dev]"
python3 -m pytest -q -n 2 --durations=15 tests "$@"
