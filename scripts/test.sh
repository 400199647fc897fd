#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs the system packages the tests need
# (redis-server, openssl: scripts/setup.sh --system), sets up .venv if needed, then ruff and
# pytest. The tests start their own Redis and S3 (SeaweedFS) servers. Extra args go to pytest.
# Usage: bash scripts/test.sh [pytest args...]     e.g.  bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system
if [ ! -x .venv/bin/pytest ] || [ ! -x .venv/bin/weed ] \
   || ! .venv/bin/python -c "import ben2q, torch, fastapi, schemathesis, kubernetes_validate, jsonpatch" 2>/dev/null; then
  bash scripts/setup.sh --no-example
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
