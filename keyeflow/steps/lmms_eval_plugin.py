"""The entry point lmms-eval reads to find the `keyeflow` model (group `lmms_eval.models`, declared in
pyproject.toml): a manifest naming the adapter class by path.

lmms-eval loads every entry point of the group whenever it builds its model registry, for any model asked
for; this module stays tiny so that costs nothing: the adapter (which imports torch, the model and the media
pipeline) is imported by lmms-eval only when `--model keyeflow` is requested.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "keyeflow"
ADAPTER_CLASS = "keyeflow.steps.lmms_eval_model.KeyeflowLMM"


def lmms_eval_models() -> list[ModelManifest]:
    """lmms-eval calls this (an entry-point payload may be a callable returning manifests)."""
    return [ModelManifest(model_id=MODEL_ID, simple_class_path=ADAPTER_CLASS)]
