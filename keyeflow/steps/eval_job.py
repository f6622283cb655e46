"""A checkpoint's evaluation (held-out loss per modality, MCQ accuracy) in this process, or as a job whose
ranks are started like training's (`keyeflow.training.launch.LaunchConfig`: torchrun, DeepSpeed, Slurm), so
an 8B checkpoint is evaluated on the training machines' GPUs instead of the flow host's CPU.

`launch_evaluate` writes the job's JSON spec into a directory of its own, starts
`python -m keyeflow.steps.eval_job SPEC.json` under the launcher, streams its output into the log, and reads
back the metrics rank 0 wrote there. Each rank loads the checkpoint (onto its own GPU when there is one),
takes every world-size-th held-out sample of each modality and every world-size-th MCQ record
(`keyeflow.training.evaluate.rank_share`), and the ranks combine exactly: held-out loss sums and token
counts are summed over ranks (a token-weighted mean, as one process computes it), MCQ option scores are
gathered back into question order. The metrics equal the in-process ones up to the float rounding of
differently packed rows; the predictions are the same.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keyeflow.datasets.sample_reader import LanceSampleReader
from keyeflow.datasets.tables import TableRef
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.steps.train_job import LaunchFailed, launch_job
from keyeflow.training import distributed
from keyeflow.training.evaluate import (
    distributed_heldout_loss,
    distributed_mcq,
    evaluate_mcq,
    heldout_loss,
    lance_video_lookup,
)
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.trainer import load_model

log = logging.getLogger(__name__)

EVAL_JOB_MODULE = "keyeflow.steps.eval_job"
RESULT = "metrics.json"  # rank 0's result, in the job's directory


def lmms_eval_metrics(
    checkpoint: str | Path, tasks: Sequence[str], include_path: str = "", limit: int = 0
) -> dict[str, dict[str, float]]:
    """lmms-eval's scores of `checkpoint` on `tasks`: `{"lmms_eval": {task/metric: score}}` for the scores
    lmms-eval counts higher-is-better (the promotion gate compares them), `"lmms_eval_ungated"` for the
    others (reported, not gated: no margin fits a perplexity and an accuracy alike)."""
    # lmms-eval is an optional install (scripts/setup_lmms_eval.sh): only an evaluation that names its tasks
    # imports the adapter, which imports lmms-eval.
    try:
        from keyeflow.steps.lmms_eval_model import run_lmms_eval
    except ImportError as error:
        raise RuntimeError(
            f"EvalConfig.lmms_eval_tasks={list(tasks)} but lmms-eval is not importable ({error}); install it "
            "with scripts/setup_lmms_eval.sh"
        ) from error
    result = run_lmms_eval(checkpoint, tasks, include_path=include_path or None, limit=limit or None)
    return {
        "lmms_eval": {k: v for k, v in result.scores.items() if result.higher_is_better.get(k, False)},
        "lmms_eval_ungated": {
            k: v for k, v in result.scores.items() if not result.higher_is_better.get(k, False)
        },
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    heldout: dict[str, list[str]],
    samples: TableRef,
    max_length: int,
    mcq_records: list[dict],
    info: distributed.Distributed | None = None,
    lmms_eval_tasks: Sequence[str] = (),
    lmms_eval_include_path: str = "",
    lmms_eval_limit: int = 0,
) -> dict[str, Any]:
    """`{"heldout_loss": {modality: loss}, "mcq_accuracy": float, "mcq_predictions": {question_id: letter}}`
    of `checkpoint`, with `lmms_eval_metrics` when `lmms_eval_tasks` names any (run by rank 0 alone: lmms-eval
    shards by its own launcher, not ours); `info`: this rank's place in a job (None: everything in this
    process, on the CPU)."""
    model = load_model(checkpoint)
    tokenizer = load_tokenizer()
    reader = LanceSampleReader(samples, tokenizer)
    pad_token_id = model.config.text_config.pad_token_id or 0
    if info is None:
        losses = heldout_loss(model, reader, heldout, max_length, pad_token_id=pad_token_id)
        mcq = evaluate_mcq(model, tokenizer, mcq_records, lance_video_lookup())
    else:
        model.to(info.device)
        losses = distributed_heldout_loss(model, reader, heldout, max_length, info, pad_token_id=pad_token_id)
        mcq = distributed_mcq(model, tokenizer, mcq_records, lance_video_lookup(), info)
    metrics = {
        "heldout_loss": losses,
        "mcq_accuracy": mcq.accuracy,
        "mcq_predictions": dict(zip([r["question_id"] for r in mcq_records], mcq.predictions)),
    }
    if lmms_eval_tasks and (info is None or info.is_main):
        metrics |= lmms_eval_metrics(checkpoint, lmms_eval_tasks, lmms_eval_include_path, lmms_eval_limit)
    return metrics


def launch_evaluate(
    launch: LaunchConfig,
    checkpoint: str | Path,
    *,
    heldout: dict[str, list[str]],
    samples: TableRef,
    max_length: int,
    mcq_records: list[dict],
    job_dir: str | Path,
    lmms_eval_tasks: Sequence[str] = (),
    lmms_eval_include_path: str = "",
    lmms_eval_limit: int = 0,
) -> dict[str, Any]:
    """`evaluate_checkpoint`'s metrics, computed by the ranks `launch` starts (module docstring); `job_dir`
    keeps the spec and the result. "inprocess" evaluates in this process."""
    if launch.launcher == "inprocess":
        return evaluate_checkpoint(
            checkpoint, heldout=heldout, samples=samples, max_length=max_length, mcq_records=mcq_records,
            lmms_eval_tasks=lmms_eval_tasks, lmms_eval_include_path=lmms_eval_include_path,
            lmms_eval_limit=lmms_eval_limit,
        )  # fmt: skip
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    result = job_dir / RESULT
    result.unlink(missing_ok=True)  # a result is only ever the one this launch wrote
    launch_job(
        launch,
        job_dir,
        {
            "checkpoint": str(Path(checkpoint).resolve()),
            "heldout": heldout,
            "samples": {"name": samples.name, "uri": samples.uri, "version": samples.version},
            "max_length": max_length,
            "mcq_records": mcq_records,
            "lmms_eval_tasks": list(lmms_eval_tasks),
            "lmms_eval_include_path": lmms_eval_include_path,
            "lmms_eval_limit": lmms_eval_limit,
            "result": str(result.resolve()),
        },
        module=EVAL_JOB_MODULE,
        name=f"evaluation of {checkpoint}",
    )
    if not result.is_file():
        raise LaunchFailed(f"the launched evaluation exited cleanly but wrote no {result}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node N -m keyeflow.steps.eval_job SPEC.json` (or `python -m …` for one process).

    SPEC.json: {"checkpoint": dir, "heldout": {modality: [sample_id, …]}, "samples": {"name":
    "train_samples", "uri": …, "version": …}, "max_length": …, "mcq_records": [Video-MME records with
    question_id], "result": path}. Rank 0 writes the metrics to `result` (atomically) and prints them as one
    JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m keyeflow.steps.eval_job SPEC.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(args[0]).read_text())
    info = distributed.setup()
    try:
        metrics = evaluate_checkpoint(
            spec["checkpoint"],
            heldout=spec["heldout"],
            samples=TableRef(**spec["samples"]),
            max_length=spec["max_length"],
            mcq_records=spec["mcq_records"],
            info=info,
            lmms_eval_tasks=spec.get("lmms_eval_tasks", ()),
            lmms_eval_include_path=spec.get("lmms_eval_include_path", ""),
            lmms_eval_limit=spec.get("lmms_eval_limit", 0),
        )
        if info.is_main:
            result = Path(spec["result"])
            tmp = result.with_name(f".{result.name}.tmp")
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
            os.replace(tmp, result)  # the flow reads a whole result or none
            print(json.dumps(metrics), flush=True)
    finally:
        distributed.teardown(info)


if __name__ == "__main__":
    main()
