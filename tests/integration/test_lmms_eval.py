"""lmms-eval runs a local multimodal task (three image questions, one with two images, and a video question;
tests/fixtures/lmms_eval/keyeflow_local_mcq, no download) on a tiny randomly initialised keyeflow checkpoint
through the `keyeflow` model its CLI finds by entry point; the model saw every image and the video (the
tokens it was fed match what the media pipeline makes of the files), the score is a number in range, and it
lands on an MLflow run under the names the promotion gate logs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: run scripts/setup_lmms_eval.sh")

from keyeflow import lineage
from keyeflow.datasets.images import ImageConfig
from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.steps.lmms_eval_model import (
    cut_at_stops,
    flatten_results,
    image_patches,
    video_patches,
    visual_parts,
)
from keyeflow.steps.stages import eval_run_metrics
from keyeflow.training.evaluate import promotion_gate

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "lmms_eval"
TASK = TASKS / "keyeflow_local_mcq"
VIDEO_BUDGET = 400  # tokens per video: keeps the CPU run short


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-keyeflow")
    KeyeForConditionalGeneration(tiny(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_entry_point_names_the_adapter():
    points = {ep.name: ep for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    assert "keyeflow" in points, "reinstall keyeflow (pip install -e .) to register its lmms-eval entry point"
    [manifest] = points["keyeflow"].load()()
    assert manifest.simple_class_path == "keyeflow.steps.lmms_eval_model.KeyeflowLMM"


@pytest.mark.slow
def test_cli_scores_a_local_image_and_video_task_onto_an_mlflow_run(checkpoint, tmp_path, home):
    requests_log, out = tmp_path / "requests.jsonl", tmp_path / "results"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    model_args = f"checkpoint={checkpoint},video_token_budget={VIDEO_BUDGET},request_log={requests_log}"
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "keyeflow", "--model_args", model_args,
         "--tasks", "keyeflow_local_mcq", "--include_path", str(TASKS), "--output_path", str(out),
         "--batch_size", "1"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # What the model was fed, request by request, against what the media pipeline makes of the files.
    docs = [json.loads(line) for line in (TASK / "test.jsonl").read_text().splitlines()]
    seen = sorted(
        (json.loads(line) for line in requests_log.read_text().splitlines()), key=lambda r: r["doc_id"]
    )
    assert [r["doc_id"] for r in seen] == list(range(len(docs)))
    assert [r["num_images"] for r in seen] == [len(d["images"]) for d in docs] == [1, 1, 2, 0]
    assert [r["num_videos"] for r in seen] == [1 if d["video"] else 0 for d in docs] == [0, 0, 0, 1]
    for doc, request in zip(docs, seen):
        if doc["video"]:
            video = video_patches(str(TASK / doc["video"]), "paper", VIDEO_BUDGET)
            frame_tokens = sum(h * w // 4 for _, h, w in video.grids)
            # every frame's tokens plus its timestamp and markers; a budget that held
            assert frame_tokens < request["num_vision_tokens"] and frame_tokens <= VIDEO_BUDGET
            assert len(video.grids) >= 4  # 3 s at 2 fps: the video was sampled, not one frame
        else:
            # image: its merged patches between <|vision_start|> and <|vision_end|>
            grids = [image_patches(str(TASK / p), ImageConfig()).grids[0] for p in doc["images"]]
            assert request["num_vision_tokens"] == sum(h * w // 4 + 2 for _, h, w in grids)
        assert 1 <= request["num_generated_tokens"] <= 8  # the task's max_new_tokens

    [results_file] = out.rglob("*_results.json")
    scores, higher_is_better = flatten_results(json.loads(results_file.read_text()))
    assert set(scores) == {"keyeflow_local_mcq/accuracy", "keyeflow_local_mcq/answered"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert all(higher_is_better[k] for k in scores)

    # The score on an MLflow run, named as the evaluation gate logs it.
    run_id = lineage.start_run("eval")
    lineage.log_metrics(run_id, eval_run_metrics({"lmms_eval": scores}))
    lineage.end_run(run_id)
    logged = lineage.client().get_run(run_id).data.metrics
    assert logged["eval/lmms_eval/keyeflow_local_mcq/accuracy"] == scores["keyeflow_local_mcq/accuracy"]


def test_gate_compares_lmms_eval_scores_as_accuracies():
    parent = {"lmms_eval": {"videomme/score": 0.50}}
    assert promotion_gate({"lmms_eval": {"videomme/score": 0.49}}, parent, 0.02)[0]
    passed, reasons = promotion_gate({"lmms_eval": {"videomme/score": 0.40}}, parent, 0.02)
    assert not passed and reasons[0].startswith("lmms_eval/videomme/score: 0.4000 vs parent 0.5000")
    passed, reasons = promotion_gate({}, parent, 0.02)
    assert not passed and "missing" in reasons[0]


def test_visuals_and_stops():
    assert [p["type"] for p in visual_parts([str(TASK / "media/red.png"), str(TASK / "media/clip.mp4")])] == [
        "image",
        "video",
    ]
    with pytest.raises(ValueError, match="keyeflow takes images"):
        visual_parts([{"array": [0.0], "sampling_rate": 16000}])  # audio
    with pytest.raises(FileNotFoundError):
        visual_parts(["missing.mp4"])
    assert cut_at_stops("B. a circle\nC.", ["\n", "C."]) == "B. a circle"
    assert cut_at_stops("A", []) == "A"


def test_flatten_results_names_and_directions():
    results = {
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "em,strict": 1,
                          "ppl,none": 3.0, "acc_stderr_clt,none": 0.2, "samples,none": True}},
        "higher_is_better": {"t": {"acc": True, "em": True, "ppl": False}},
    }  # fmt: skip
    scores, direction = flatten_results(results)
    assert scores == {"t/acc": 0.5, "t/em/strict": 1.0, "t/ppl": 3.0}
    assert direction == {"t/acc": True, "t/em/strict": True, "t/ppl": False}
