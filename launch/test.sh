#!/usr/bin/env bash
# Sets up everything (including the transformers oracle environment) and runs the CPU test suite
# in two tiers (markers in setup.cfg):
#   bash launch/test.sh                  the fast tier: every test not marked `slow` or `integration`
#   bash launch/test.sh --integration    the integration tier: CLI runs in subprocesses, simulated
#                                        meshes, 30B-shape plans, bit-exact 512-token rows
# CI (.ci/run) runs both; `slow` simulations run on request (`pytest -m slow`).
# Test files are spread over CASCADE_TEST_WORKERS processes (pytest-xdist; default: the machine's
# cores, at most 4; 0 runs in one process). A file's tests stay in one worker (--dist loadfile),
# so its module fixtures are built once; files are handed out in collection order, the longest
# first (tests/conftest.py: LONGEST_FIRST), not by xdist's default of most tests first.
# Usage: bash launch/test.sh [--integration] [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
tier="not slow and not integration"
if [[ "${1:-}" == "--integration" ]]; then
    tier="integration and not slow"
    shift
fi
bash launch/setup_env.sh --oracle
export JAX_PLATFORMS=cpu
cores=$(nproc)
workers=${CASCADE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -m "$tier" -q -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
