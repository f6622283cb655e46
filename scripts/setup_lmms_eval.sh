#!/usr/bin/env bash
# lmms-eval beside our pins, for `lmms-eval --model keyeflow` and EvalConfig.lmms_eval_tasks. Idempotent:
# a venv that already imports lmms-eval's evaluator at this version is left as it is.
#
# Why not `pip install lmms-eval`: its requirements pull torchvision (only a CUDA build exists for our torch,
# and it does not import here), wandb==0.25.0, a ruff newer than our pin, opencv, peft, timm,
# sentence-transformers, yt-dlp, … None of them is imported on the path keyeflow uses (the CLI, the
# evaluator, YAML tasks, a model from an entry point), so lmms-eval goes in without its requirements and the
# five its core path imports are added, with every installed distribution held at its version (torch
# first): this cannot move a pin. `pip check` then lists lmms-eval's unused requirements as missing (and its
# `av<16` against our av): that is expected. Task utils that import more (a public task's own scorer) need
# their package installed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
LMMS_EVAL_VERSION=0.7.3
# The modules lmms-eval 0.7.3's CLI, evaluator and task loader import that our stack lacks, found by
# importing them one by one and running the CLI (it prints its result table with pytablewriter); exact
# versions: what was tested.
CORE_DEPS=(loguru==0.8.0 evaluate==0.4.6 tenacity==9.2.1 sacrebleu==2.6.0 pytablewriter==1.2.1)

# Already there: every one at its version (metadata only; importing the evaluator takes tens of seconds).
if "$PY" - "lmms_eval==$LMMS_EVAL_VERSION" "${CORE_DEPS[@]}" 2>/dev/null <<'CHECK'
import importlib.metadata as metadata
import sys

for spec in sys.argv[1:]:
    name, version = spec.split("==")
    if metadata.version(name) != version:
        sys.exit(1)
CHECK
then
  exit 0
fi

echo "setup: installing lmms-eval==$LMMS_EVAL_VERSION (without its requirements) and its core imports"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -m pip freeze --exclude-editable | grep -v -i '^torch==' >"$constraints"
echo "torch==2.13.0" >>"$constraints"
"$PY" -m pip install -q --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
"$PY" -m pip install -q -c "$constraints" "${CORE_DEPS[@]}"
"$PY" -c "import lmms_eval.evaluator, lmms_eval.tasks, lmms_eval.__main__"
