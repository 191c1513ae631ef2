#!/usr/bin/env bash
# Creates or updates the virtualenvs this project needs, idempotently; sourced by start.sh and test.sh.
#   .venv     the backend (torch CPU wheel first: any other torch spec pulls GBs of CUDA wheels)
#   .venv-ls  Label Studio for the end-to-end tests, in its own venv (its pins clash with ours)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

make_venv() {  # make_venv DIR
  local dir="$1"
  if [ -x "$dir/bin/python" ]; then return 0; fi
  if ! "$PYTHON" -m venv "$dir" 2>/dev/null; then
    rm -rf "$dir"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "python3 -m venv failed: installing python3-venv" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$PYTHON" -m venv "$dir"
    else
      echo "error: '$PYTHON -m venv' failed; install your distribution's python3-venv package" >&2
      exit 1
    fi
  fi
  "$dir/bin/python" -m pip install -q --upgrade pip
}

bootstrap_app() {
  local stamp="$REPO/.venv/.installed"
  make_venv "$REPO/.venv"
  if [ ! -f "$stamp" ] || [ "$REPO/requirements.txt" -nt "$stamp" ] || [ "$REPO/requirements-test.txt" -nt "$stamp" ]; then
    echo "installing the backend's dependencies into .venv" >&2
    "$REPO/.venv/bin/pip" install -q "$TORCH_SPEC"
    "$REPO/.venv/bin/pip" install -q -r "$REPO/requirements.txt" -r "$REPO/requirements-test.txt"
    touch "$stamp"
  fi
}

bootstrap_label_studio() {
  local stamp="$REPO/.venv-ls/.installed"
  make_venv "$REPO/.venv-ls"
  if [ ! -f "$stamp" ]; then
    echo "installing Label Studio 1.23 into .venv-ls (end-to-end tests)" >&2
    "$REPO/.venv-ls/bin/pip" install -q "label-studio==1.23.*"
    touch "$stamp"
  fi
}

ensure_redis_server() {  # the queue tests start their own redis-server processes
  if command -v redis-server >/dev/null; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing redis-server (queue-mode tests)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "error: redis-server is missing; install it (Debian/Ubuntu: sudo apt-get install redis-server)" >&2
    exit 1
  fi
}

ensure_postgres() {  # Label Studio on PostgreSQL (tests/test_e2e_postgres.py): the machine's, or one the suite starts
  if (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then return 0; fi
  if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing postgresql (the suite starts its own server for the LS-on-PostgreSQL e2e test)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "warning: no PostgreSQL on 127.0.0.1:5432 and no server binaries: the LS-on-PostgreSQL e2e test" \
         "will be skipped (Debian/Ubuntu: sudo apt-get install postgresql)" >&2
  fi
}

ensure_chromium() {  # the browser e2e test drives Debian's chromium with Playwright (no browser downloads)
  if [ -x /usr/bin/chromium ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (browser e2e test)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "error: /usr/bin/chromium is missing; install it (Debian: sudo apt-get install chromium)," >&2
    echo "       or skip the browser test with: ./test.sh -m 'not browser'" >&2
    exit 1
  fi
}
