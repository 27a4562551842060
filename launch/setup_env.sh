#!/usr/bin/env bash
# Sets up cascade-jax on a fresh machine (idempotent; a ready environment costs ~1 s):
#   .venv         Python 3.12 with the project (pip install -e .) and its test tools
#   .oracle-venv  Python 3.11 with CPU torch + transformers, the numerical oracle   (--oracle)
#   bubblewrap    the sandbox for model-written code (Debian package; needs root or sudo)
# Usage: bash launch/setup_env.sh [--oracle]
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # find_python 3.12 -> path of a working python3.12 (PATH first, then pyenv's builds)
  local v=$1 c
  for c in "$(command -v "python$v" 2>/dev/null)" "$HOME"/.pyenv/versions/"$v"*/bin/"python$v"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c "" >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  echo "error: python$v not found (install it, e.g. with pyenv)" >&2; return 1
}

# A ready environment is not reinstalled: pip runs only when the files that define it changed
# since the last successful install (a hash of them is stamped into the venv).
stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

if [ ! -x .venv/bin/python ]; then
  "$(find_python 3.12)" -m venv .venv
fi
want=$(stamp_of requirements.txt requirements-test.txt setup.cfg pyproject.toml)
if [ "$(cat .venv/.cascade-stamp 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > .venv/.cascade-stamp
fi

if [ "${1:-}" = "--oracle" ]; then
  if [ ! -x .oracle-venv/bin/python ]; then
    "$(find_python 3.11)" -m venv .oracle-venv
  fi
  want=$(stamp_of requirements-oracle.txt)
  if [ "$(cat .oracle-venv/.cascade-stamp 2>/dev/null)" != "$want" ]; then
    .oracle-venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-oracle.txt
    echo "$want" > .oracle-venv/.cascade-stamp
  fi
fi

if ! command -v bwrap >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
    || echo "warning: could not install bubblewrap; the code sandbox will refuse to run" >&2
fi
