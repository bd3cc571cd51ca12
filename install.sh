#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install llmjax into it (editable).
#   ./install.sh            the library and experiments
#   ./install.sh test       plus the test extra (pytest, torch CPU, transformers)
#   ./install.sh gpu,serve  any extras, comma-separated
# Python is taken from $PYTHON, else the first python3.12+ on PATH, else pyenv's.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"

works() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local candidates=("${PYTHON:-}" python3.12 python3.13 python3 python)
    candidates+=("$HOME"/.pyenv/versions/3.1[2-9]*/bin/python /root/.pyenv/versions/3.1[2-9]*/bin/python)
    for candidate in "${candidates[@]}"; do
        [ -n "$candidate" ] && works "$candidate" && { command -v "$candidate"; return; }
    done
    echo "install.sh: no Python >= 3.12 found; install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
    exit 1
}

if [ ! -x .venv/bin/python ] || ! works .venv/bin/python; then
    rm -rf .venv
    "$(find_python)" -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
echo "install.sh: llmjax installed in .venv ($(.venv/bin/python --version))${extras:+ with extras [$extras]}"
