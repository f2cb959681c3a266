#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install editwatch with its test tools and Ray (`simulate sweep`).
# torch is pinned to 2.13.0 in pyproject.toml: the CPU build; an unpinned torch pulls CUDA (GBs).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: editwatch needs Python >= 3.11 (set PYTHON=...)" >&2
    exit 1
}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,sweep]'
