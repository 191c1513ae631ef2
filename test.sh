#!/usr/bin/env bash
# Run the test suite; installs what it needs first (.venv, and Label Studio in .venv-ls for e2e).
# Extra arguments go to pytest, e.g. ./test.sh -k protocol
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$REPO/scripts/bootstrap.sh"
bootstrap_app
bootstrap_label_studio
ensure_redis_server
ensure_postgres
ensure_chromium
cd "$REPO"
exec .venv/bin/python -m pytest "$@"
