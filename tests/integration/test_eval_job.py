"""The evaluation gate as a distributed job: `evaluate_stage` with a torchrun launch (2 gloo ranks on CPU,
each evaluating its share of the held-out samples and MCQ records) gives the metrics the flow's own process
computes, and caches them under the same key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from keyeflow import lineage
from keyeflow.datasets import tables
from keyeflow.steps.eval_job import EVAL_JOB_MODULE, RESULT
from keyeflow.steps.stages import EVAL_JOB, StageOutput, evaluate_stage, mcq_source_rows
from keyeflow.training.evaluate import generate_mcq_set, rank_share
from keyeflow.training.launch import SPEC, TRAIN_JOB_MODULE, LaunchConfig
from keyeflow.training.recipes import EvalConfig

MAX_LENGTH = 1024


def test_rank_shares_partition_the_items_and_interleave_back():
    items = list("abcdefg")
    shares = [rank_share(items, rank, 3) for rank in range(3)]
    assert shares == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    merged: list = [None] * len(items)
    for rank, share in enumerate(shares):
        merged[rank::3] = share
    assert merged == items
    assert rank_share(["a"], 1, 2) == []  # more ranks than items: a rank's share may be empty


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_launchers_start_the_evaluation_module(launcher, tmp_path):
    spec = tmp_path / SPEC
    command = LaunchConfig(launcher=launcher, nproc_per_node=2).command(spec, module=EVAL_JOB_MODULE)
    assert command[-2:] == [EVAL_JOB_MODULE, str(spec)]
    assert LaunchConfig(launcher=launcher).command(spec)[-2:] == [TRAIN_JOB_MODULE, str(spec)]


def heldout_ids(per_modality: dict[str, int]) -> dict[str, list[str]]:
    rows = tables.open_table("train_samples").to_table(columns=["sample_id", "modality", "num_tokens"])
    out: dict[str, list[str]] = {}
    for row in sorted(rows.to_pylist(), key=lambda r: r["sample_id"]):
        wanted = per_modality.get(row["modality"], 0)
        ids = out.setdefault(row["modality"], [])
        if row["num_tokens"] <= MAX_LENGTH and len(ids) < wanted:
            ids.append(row["sample_id"])
    return {m: out[m] for m in per_modality}


def checkpoint_copy(init: Path, where: Path, name: str) -> StageOutput:
    """A step output of its own (the metrics cache lives beside the checkpoint) with a real MLflow run."""
    model = where / "model"
    shutil.copytree(init, model)
    return StageOutput(name, str(model), lineage.start_run(name), "key", True)


@pytest.mark.slow
def test_two_rank_evaluation_job_gives_the_in_process_metrics(multirank_training_data, tmp_path):
    data = multirank_training_data
    # Odd counts and a single text sample: the ranks' shares differ in size and one is empty.
    heldout = heldout_ids({"video": 3, "image": 2, "text": 1})
    assert [len(ids) for ids in heldout.values()] == [3, 2, 1]
    mcq = generate_mcq_set(mcq_source_rows(tables.ref("video_samples")), 5)
    config = EvalConfig(max_tokens=MAX_LENGTH, num_mcq=5)
    inputs = {
        "config": config,
        "heldout": heldout,
        "samples": tables.ref("train_samples"),
        "mcq_records": mcq,
        "parent_metrics": None,
    }

    here = evaluate_stage(checkpoint_copy(data.init, tmp_path / "here", "here"), **inputs)
    launched = checkpoint_copy(data.init, tmp_path / "job", "job")
    job = evaluate_stage(launched, **inputs, launch=LaunchConfig(launcher="torchrun", nproc_per_node=2))

    assert list(job.metrics["heldout_loss"]) == ["video", "image", "text"]
    for modality, loss in here.metrics["heldout_loss"].items():
        assert job.metrics["heldout_loss"][modality] == pytest.approx(loss, rel=1e-6)
    assert job.metrics["mcq_predictions"] == here.metrics["mcq_predictions"]
    assert list(job.metrics["mcq_predictions"]) == [r["question_id"] for r in mcq]  # question order
    assert job.metrics["mcq_accuracy"] == here.metrics["mcq_accuracy"]

    # The job ran from its spec and left its result in a directory of its own; the flow cached the metrics
    # under the key the in-process evaluation uses.
    (cache,) = (tmp_path / "here").glob("eval-*.json")
    job_dir = tmp_path / "job" / EVAL_JOB.format(key=cache.stem.removeprefix("eval-"))
    assert json.loads((job_dir / SPEC).read_text())["heldout"] == heldout
    assert json.loads((job_dir / RESULT).read_text()) == job.metrics
    assert json.loads((tmp_path / "job" / cache.name).read_text()) == job.metrics
