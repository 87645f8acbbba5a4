#!/usr/bin/env bash
# Creates (or refreshes) the project's virtualenv in $VENV (default .venv) with Python 3.12
# and the pinned stack, then installs this package in editable mode. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

is_312() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }

find_python312() {
  # on PATH, then any pyenv-installed 3.12.x (pyenv itself need not be on PATH)
  local cand
  for cand in python3.12 python3 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && is_312 "$(command -v "$cand")"; then
      command -v "$cand"; return 0
    fi
  done
  return 1
}

if [ -x "$VENV/bin/python" ] && ! is_312 "$VENV/bin/python"; then
  echo "setup: $VENV is not Python 3.12; recreating it"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python312) || { echo "error: Python 3.12 not found (megatron-core 0.19 needs >=3.12). Install it (e.g. 'pyenv install 3.12.1') and rerun." >&2; exit 1; }
  echo "setup: creating $VENV with $PY"
  "$PY" -m venv "$VENV" || { echo "error: '$PY -m venv' failed; on Debian/Ubuntu install python3.12-venv" >&2; exit 1; }
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "setup: ready ($("$VENV/bin/python" --version), torch $("$VENV/bin/python" -c 'import torch;print(torch.__version__)'))"
