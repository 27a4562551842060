#!/usr/bin/env bash
# Sets up everything (including the transformers oracle environment) and runs the CPU test suite.
# Usage: bash launch/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh --oracle
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -m "not slow" -q "$@"
