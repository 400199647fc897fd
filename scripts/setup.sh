#!/usr/bin/env bash
# Set up ben2q on a fresh machine: .venv, CPU torch 2.13.0 first (so no CUDA build is pulled),
# then ben2q with its test extras; finally run the main job once on an example image.
# Usage: bash scripts/setup.sh [--no-example]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "ben2q needs Python 3.11+"'
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian ships venv/ensurepip separately.
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$PY" -m venv .venv
    else
      echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"

if [ "${1:-}" != "--no-example" ]; then
  # The main job, with the tiny network (deterministic weights) since the real checkpoint
  # needs the Hugging Face hub; set BEN2Q_WEIGHTS=/path/BEN2_Base.pth for the real model.
  BEN2Q_MODEL_SPEC="${BEN2Q_MODEL_SPEC:-tiny}" .venv/bin/ben2q remove \
    tests/fixtures/a_input.png --output-dir ben2_outputs
  echo "wrote ben2_outputs/a_input.png"
fi
