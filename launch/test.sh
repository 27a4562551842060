#!/usr/bin/env bash
# Sets up everything (including the transformers oracle environment) and runs the CPU test suite,
# its test files spread over CASCADE_TEST_WORKERS processes (pytest-xdist; default: the machine's
# cores, at most 4; 0 runs in one process). A file's tests stay in one worker (--dist loadfile),
# so its module fixtures are built once; files are handed out in collection order, the longest
# first (tests/conftest.py: LONGEST_FIRST), not by xdist's default of most tests first.
# Usage: bash launch/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh --oracle
export JAX_PLATFORMS=cpu
cores=$(nproc)
workers=${CASCADE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -m "not slow" -q -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
