#!/usr/bin/env bash
# One-time (and idempotent) set-up of a fresh machine: ffmpeg, a virtualenv in .venv, torch pinned first.
# Re-running it is cheap: every step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "setup: installing ffmpeg (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

# torch first and pinned: only this exact spec resolves to the local CPU wheel; anything that pulls torch
# unpinned before it would download GBs of CUDA builds.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch==2.13.0"
  .venv/bin/pip install -q torch==2.13.0
fi

stamp=.venv/.keyeflow-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing keyeflow and its dependencies"
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi

# lmms-eval for the evaluation adapter and its tests (about 20 s of pip and 54 MB; moves no pin: see the
# script). After keyeflow's install, whose entry point is how lmms-eval finds `--model keyeflow`.
bash scripts/setup_lmms_eval.sh
