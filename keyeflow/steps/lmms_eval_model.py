"""A keyeflow checkpoint as an lmms-eval model, so the community's benchmarks (Video-MME, MMMU, MMBench, …, in
lmms-eval's task format) score our checkpoints the way they score everyone else's:

    lmms-eval --model keyeflow --model_args checkpoint=/path/to/ckpt --tasks videomme --include_path my_tasks/

lmms-eval finds the model through the entry point in `keyeflow.steps.lmms_eval_plugin` (pyproject.toml
declares it; installing keyeflow registers it). lmms-eval itself is an optional install beside our pins
(`scripts/setup_lmms_eval.sh`): this module imports it, and nothing in keyeflow imports this module unless an
evaluation asks for lmms-eval tasks.

What the adapter does with a request: the doc's visuals (`doc_to_visual`) go through the same media
pipeline as training data — a PIL image or an image file through `datasets.images.tokenize_image` (decode
checks, smart resize, 14-px patches), a video file through `datasets.pretokenize.tokenize_video` (ffprobe,
frame sampling, Slow/Fast selection, token budget) — and become image/video parts of one user turn, before
the task's text, exactly as an SFT conversation is laid out. `LocalGenerator` then decodes the answer
(greedy unless the task asks for a temperature), cut at the first of the task's `until` strings.

Model args (`--model_args k=v,...`): `checkpoint` (a directory: ours or the Keye-VL-1.5 layout),
`device` ("cpu"), `max_new_tokens` (default for tasks that do not set it), `video_preset` (a Slow/Fast preset
name, "paper"), `video_token_budget` (per video; the preset's when absent), `max_image_tokens` (per image),
`seed` (for sampled decoding), `request_log` (a JSONL path: one line per request with the number of images,
videos, vision tokens and prompt tokens the model saw, to audit what an evaluation actually fed the model).

`run_lmms_eval` is the same evaluation from Python (the promotion gate's path, `keyeflow.steps.eval_job`):
it returns every task's numeric metrics with their direction.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lmms_eval import evaluator as lmms_evaluator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.tasks import TaskManager
from PIL import Image

from keyeflow.datasets.images import ImageConfig, tokenize_image
from keyeflow.datasets.pretokenize import tokenize_video
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.datasets.video import VIDEO_SUFFIXES, probe
from keyeflow.model.generation import LocalGenerator
from keyeflow.model.processor import MediaPatches

MODEL_ID = "keyeflow"


def _skip_cross_rank_lock_patch() -> None:
    """lmms-eval 0.7.3's `simple_evaluate` patches filelock so several ranks loading one dataset share a lock
    object; the patch imports `filelock._api`, which filelock 4 (our stack's) no longer has, so every run
    would fail there. The model is built before that call, so building it marks the patch as done when
    filelock lacks the module: one process loads its datasets alone and needs no shared lock object."""
    if importlib.util.find_spec("filelock._api") is None:
        lmms_evaluator._enable_reentrant_filelocks._patched = True


def _content_id(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _patch_rows(blob: bytes, patch_size: int) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.uint8).reshape(-1, 3 * patch_size * patch_size)


def image_patches(image: Image.Image | str, config: ImageConfig) -> MediaPatches:
    """An image (in memory, as HF datasets give it, or a file) as the pre-tokeniser stores it. An image in
    memory is written to a PNG first (lossless) so it passes the same decode checks as an ingested file."""
    if isinstance(image, str):
        _, row = tokenize_image(image, _content_id(image), os.path.getsize(image), config)
    else:
        with tempfile.TemporaryDirectory(prefix="keyeflow-lmms-image-") as scratch:
            path = os.path.join(scratch, "image.png")
            image.save(path, format="PNG")
            _, row = tokenize_image(path, _content_id(path), os.path.getsize(path), config)
    return MediaPatches(
        patches=_patch_rows(row["patches"], config.patch_size), grids=[(1, row["grid_h"], row["grid_w"])]
    )


def video_patches(path: str, preset: str, token_budget: int | None) -> MediaPatches:
    """A video file as `pretokenize` stores it: sampled frames, Slow/Fast labels, one grid per frame."""
    overrides = {} if token_budget is None else {"total_token_budget": int(token_budget)}
    config = resolve_config(preset, **overrides)
    info = probe(path, path, os.path.getsize(path))
    sample, frames = tokenize_video(info, _content_id(path), config)
    types = sample["frame_types"]
    return MediaPatches(
        patches=_patch_rows(b"".join(frames.column("patches").to_pylist()), config.patch_size),
        grids=[
            (1, h, w)
            for h, w in zip(frames.column("grid_h").to_pylist(), frames.column("grid_w").to_pylist())
        ],
        frame_types=types,
        timestamps=sample["timestamps"],
        slow_tokens=sample["slow_tokens"],
        fast_tokens=sample["fast_tokens"] if 1 in types else None,
    )


def visual_parts(visuals: object) -> list[dict]:
    """The image/video message parts for what a task's `doc_to_visual` returned: PIL images, image files and
    video files (by suffix), in order. Anything else (audio, a URL) is refused: evaluating without it would
    score a question the model never saw whole."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    parts = []
    for visual in visuals:
        if isinstance(visual, Image.Image):
            parts.append({"type": "image", "image": visual})
        elif isinstance(visual, str) and Path(visual).suffix.lower() in VIDEO_SUFFIXES:
            if not Path(visual).is_file():
                raise FileNotFoundError(f"the task's video {visual} does not exist")
            parts.append({"type": "video", "video": visual})
        elif isinstance(visual, str) and Path(visual).is_file():
            parts.append({"type": "image", "image": visual})
        else:
            raise ValueError(
                "keyeflow takes images (PIL or a file) and video files as visuals, got "
                f"{type(visual).__name__} {str(visual)[:80]!r}"
            )
    return parts


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings (lmms-eval's `until`)."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class KeyeflowLMM(lmms):
    """lmms-eval's simple-model interface over `LocalGenerator` (module docstring)."""

    is_simple = True

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        max_new_tokens: int = 128,
        video_preset: str = "paper",
        video_token_budget: int | None = None,
        max_image_tokens: int | None = None,
        seed: int = 0,
        request_log: str = "",
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        _skip_cross_rank_lock_patch()
        if batch_size not in (None, 1, "1"):
            # Requests run one at a time (LocalGenerator's design); a larger batch would silently be 1.
            raise ValueError(
                f"the keyeflow model evaluates one request at a time, got batch_size={batch_size}"
            )
        self.generator = LocalGenerator(str(checkpoint), device=device or "cpu", media_lookup=self._media)
        self.max_new_tokens = int(max_new_tokens)
        self.video_preset = str(video_preset)
        self.video_token_budget = None if video_token_budget in (None, "") else int(video_token_budget)
        resolve_config(self.video_preset)  # an unknown preset fails here, before any request
        self.image_config = (
            ImageConfig() if max_image_tokens is None else ImageConfig(max_tokens=int(max_image_tokens))
        )
        self.seed = int(seed)
        self.request_log = Path(request_log) if request_log else None
        self.requests_seen: list[dict[str, Any]] = []
        self._videos: dict[str, MediaPatches] = {}  # a video asked about by several questions is cut once

    def _media(self, part: Mapping) -> MediaPatches:
        if part["type"] == "image":
            return image_patches(part["image"], self.image_config)
        path = str(part["video"])
        if path not in self._videos:
            self._videos[path] = video_patches(path, self.video_preset, self.video_token_budget)
        return self._videos[path]

    def _record(self, entry: dict[str, Any]) -> None:
        self.requests_seen.append(entry)
        if self.request_log is not None:
            self.request_log.parent.mkdir(parents=True, exist_ok=True)
            with self.request_log.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            parts = visual_parts(doc_to_visual(self.task_dict[task][split][doc_id]))
            messages = [{"role": "user", "content": [*parts, {"type": "text", "text": context}]}]
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampled = (
                bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature") or 0) > 0
            )
            prompt = self.generator.encode_prompt(messages)
            completion = self.generator.generate_one(
                messages,
                max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                temperature=float(gen_kwargs["temperature"]) if sampled else 0.0,
                seed=self.seed,
                logprobs=False,
            )[0]
            answer = cut_at_stops(completion.text, until)
            self._record({
                "task": task, "split": split, "doc_id": doc_id,
                "num_images": sum(p["type"] == "image" for p in parts),
                "num_videos": sum(p["type"] == "video" for p in parts),
                "num_vision_tokens": prompt.num_vision_tokens, "num_prompt_tokens": len(prompt),
                "num_generated_tokens": len(completion.token_ids),
            })  # fmt: skip
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            answers.append(answer)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the keyeflow lmms-eval model answers generate_until tasks (Video-MME, MMMU, MMBench, … are); "
            "loglikelihood tasks are not supported yet"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the keyeflow lmms-eval model does not take multi-round tasks")


# ---------------------------------------------------------------------------------------------- from Python


@dataclass
class LmmsEvalResult:
    """Every task's numeric metrics as `task/metric` (`task/metric/filter` for a filter other than "none":
    MLflow metric names take no comma),
    whether lmms-eval counts each higher-is-better, and what the model was fed per request."""

    scores: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)


def flatten_results(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    """`simple_evaluate`'s results as flat metric names (stderr entries left out: they are not scores)."""
    scores: dict[str, float] = {}
    direction: dict[str, bool] = {}
    for task, metrics in results["results"].items():
        task_directions = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, sample counts, "N/A" stderrs
            metric, filter_name = key.split(",", 1)
            if "_stderr" in metric:  # "accuracy_stderr", "accuracy_stderr_clt", …
                continue
            name = f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}/{filter_name}"
            scores[name] = float(value)
            if metric in task_directions:
                direction[name] = bool(task_directions[metric])
    return scores, direction


def run_lmms_eval(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> LmmsEvalResult:
    """lmms-eval's `simple_evaluate` of `checkpoint` on `tasks` (names known to lmms-eval, or defined by YAML
    files under `include_path`) through `KeyeflowLMM`; `limit`: at most that many docs per task."""
    if not tasks:
        raise ValueError("run_lmms_eval needs at least one task name")
    paths = (
        []
        if include_path is None
        else [include_path]
        if isinstance(include_path, (str, Path))
        else list(include_path)
    )
    manager = TaskManager("WARNING", include_path=[str(p) for p in paths] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lmms-eval knows no task {unknown}; give their YAML directory as include_path")
    model = KeyeflowLMM(str(checkpoint), **dict(model_args or {}))
    results = lmms_evaluator.simple_evaluate(
        model=model,
        tasks=list(tasks),
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    scores, direction = flatten_results(results)
    bad = {k: v for k, v in scores.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"lmms-eval returned non-finite scores {bad}")
    return LmmsEvalResult(scores, direction, list(model.requests_seen))
