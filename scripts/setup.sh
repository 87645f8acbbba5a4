#!/usr/bin/env bash
# Creates (or refreshes) the project's virtualenv in $VENV (default .venv) with Python 3.12
# and the pinned stack, then installs this package in editable mode. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python312() {
  for cand in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3.12"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2]==(3,12)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local p; p=$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || true)
    [ -n "$p" ] && { echo "$p"; return 0; }
  fi
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python312) || { echo "error: Python 3.12 not found (megatron-core 0.19 needs >=3.12). Install it (e.g. 'pyenv install 3.12.1') and rerun." >&2; exit 1; }
  echo "setup: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "setup: ready ($("$VENV/bin/python" --version), torch $("$VENV/bin/python" -c 'import torch;print(torch.__version__)'))"
