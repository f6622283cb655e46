"""Training steps that produce checkpoints, each one resumable and cached through `cached_step`:
`prepare_init` (the starting weights), `train_stage` (any stage `trainer.train` runs: pre-training 1–3, SFT,
LongCoT SFT), `fuse` (stage 4 and expert merging, through `merging.merge_checkpoints`); post-training's own
loops (MPO, GSPO) are steps of the same kind. `evaluate_stage` adds held-out loss, MCQ accuracy and the
promotion gate.

**Cache and resume.** Every step has a key: a hash of what determines its weights — its config hash, the key
of the checkpoint it starts from (so a change upstream changes every key below it) and the mixture id (which
already pins the train_samples and quarantine versions and the mixture config). Its directory is
`<checkpoints>/<name>-<key>/`. `done.json` there is written last, atomically, once the step's checkpoint is
complete and its MLflow run closed; a step whose `done.json` exists is skipped and returns what it recorded,
so a rerun with nothing changed trains nothing. A step killed midway leaves no `done.json`: its next run
reuses the same directory and MLflow run (`run.json`), and the trainer resumes from the last checkpoint it
registered (`latest`), which is never half-written.

**Lineage.** Each step is one MLflow run nested under the flow's run, tagged with its key, its checkpoint
(`keyeflow.checkpoint`, the model directory the next step loads), the runs of the checkpoints it started
from (`keyeflow.upstream_run_ids`) and, through the trainer, its mixture (`keyeflow.input.mixtures` = uri@vN
and the `mixture_id` param). `keyeflow.lineage.trace` walks these down to the source files. The checkpoint
is also the run's MLflow logged model, with the models of its upstream runs as the run's model inputs (the
same chain in the UI), and `evaluate_stage` registers it under the recipe's name, where the promotion gate
moves its aliases.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from keyeflow import lineage
from keyeflow.config import get_settings
from keyeflow.datasets import tables
from keyeflow.datasets.tables import TableRef
from keyeflow.faults import kill_point
from keyeflow.model.config import KeyeConfig
from keyeflow.model.merging import MergeConfig, merge_checkpoints
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.steps.eval_job import launch_evaluate
from keyeflow.steps.train_job import launch_train
from keyeflow.training.config import StageConfig
from keyeflow.training.engine import read_metrics
from keyeflow.training.evaluate import promotion_gate
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.recipes import EvalConfig

DONE = "done.json"
RUN = "run.json"
EVAL = "eval-{key}.json"
EVAL_JOB = "eval-{key}"  # a launched evaluation's spec and result
FORMAT = 1  # bump when a step's output layout changes: old caches then no longer match
KEY_TAG = "keyeflow.step_key"


@dataclass(frozen=True)
class StageOutput:
    """What a step hands the next one: a checkpoint directory (loadable with `from_pretrained`) and its
    run."""

    name: str
    checkpoint: str
    run_id: str
    key: str
    trained: bool  # False when the step was found done and skipped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoints_root() -> Path:
    return get_settings().root / "checkpoints"


def step_key(*parts: Any) -> str:
    payload = json.dumps([FORMAT, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def path_fingerprint(path: str | Path) -> str:
    """A user-given checkpoint's identity: file names, sizes and modification times (hashing the bytes of a
    16 GB checkpoint on every flow run would take minutes)."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"init checkpoint {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return step_key(
        str(root), [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def _done(out_dir: Path) -> StageOutput | None:
    done = out_dir / DONE
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    if not Path(record["checkpoint"]).is_dir():  # deleted by hand: redo rather than hand on a missing path
        return None
    return StageOutput(**{**record, "trained": False})


def _open_run(
    out_dir: Path, name: str, key: str, params: dict, parent_run_id: str | None, upstream: list[StageOutput]
) -> str:
    """The step's MLflow run: the one a killed attempt opened (reopened), else a new one."""
    run_file = out_dir / RUN
    if run_file.is_file():
        run_id = json.loads(run_file.read_text())["run_id"]
        lineage.reopen_run(run_id)
        return run_id
    tags = {
        KEY_TAG: key,
        lineage.UPSTREAM_TAG: ",".join(u.run_id for u in upstream),
        "keyeflow.out_dir": str(out_dir),
    }
    run_id = lineage.start_run(name, params, parent_run_id, tags=tags)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_file, {"run_id": run_id, "name": name, "key": key})
    return run_id


def cached_step(
    name: str,
    key: str,
    body: Callable[[Path, str], str],
    *,
    upstream: list[StageOutput] = (),
    params: dict | None = None,
    parent_run_id: str | None = None,
    root: Path | None = None,
) -> StageOutput:
    """Run `body(out_dir, run_id) -> checkpoint dir` once per key (module docstring): skipped when done,
    resumed in the same directory and MLflow run after a kill, the run marked FAILED if `body` raises."""
    out_dir = (root or checkpoints_root()) / f"{name}-{key}"
    if (cached := _done(out_dir)) is not None:
        return cached
    run_id = _open_run(out_dir, name, key, params or {}, parent_run_id, list(upstream))
    kill_point("step.run_opened")  # the step's MLflow run and run.json written; nothing trained
    try:
        checkpoint = body(out_dir, run_id)
    except BaseException:
        lineage.end_run(run_id, failed=True)
        raise
    kill_point("step.trained")  # the step's final checkpoint written; its run not closed, no done.json
    output = StageOutput(name, str(checkpoint), run_id, key, True)
    lineage.set_tags(run_id, {lineage.CHECKPOINT_TAG: output.checkpoint})
    lineage.log_checkpoint_model(run_id, name, output.checkpoint)
    lineage.end_run(run_id)
    kill_point("step.run_closed")  # the step's run FINISHED and tagged; done.json not written
    _write_json(out_dir / DONE, {k: v for k, v in output.to_dict().items() if k != "trained"})
    return output


def prepare_init(
    model_config: KeyeConfig,
    *,
    init: str | None,
    seed: int,
    parent_run_id: str | None = None,
    root: Path | None = None,
) -> StageOutput:
    """The weights stage 1 starts from: `init` as given, or fresh weights of `model_config` (seeded), saved
    once so every stage loads a path and the evaluation has a parent to compare stage 1 with."""
    if init is not None:
        key = step_key("init", path_fingerprint(init))
    else:
        key = step_key("init", model_config.to_dict(), seed)

    def body(out_dir: Path, run_id: str) -> str:
        if init is not None:
            return str(Path(init).resolve())
        target = out_dir / "model"
        if not target.is_dir():  # else a killed attempt got as far as renaming it into place
            torch.manual_seed(seed)
            tmp = out_dir / ".model.tmp"
            KeyeForConditionalGeneration(model_config).save_pretrained(tmp)
            os.replace(tmp, target)
        return str(target)

    return cached_step(
        "pretrain-0-init",
        key,
        body,
        parent_run_id=parent_run_id,
        root=root,
        params={"init": init or "fresh", "seed": seed, "model": model_config.to_dict()},
    )


def train_stage(
    stage: StageConfig,
    *,
    init: StageOutput,
    mixture: TableRef,
    mixture_id: str,
    parent_run_id: str | None = None,
    root: Path | None = None,
    data_from: Sequence[StageOutput] = (),
    launch: LaunchConfig | None = None,
) -> StageOutput:
    """Train one stage (any stage the trainer runs: pre-training, SFT, LongCoT SFT) from `init`'s checkpoint
    on `mixture_id` (cached and resumable, module docstring). `data_from`: steps whose models made the
    training data (a rejection-sampled cold-start set), recorded as upstream too. `launch`: start the ranks
    with torchrun or the DeepSpeed launcher (`keyeflow.training.launch`); None trains in this process. It is
    not in the key: the launcher and the number of ranks change what the stage learns only by float rounding
    (the step loss is a token mean over all ranks), and a step resumes on any number of ranks."""

    def body(out_dir: Path, run_id: str) -> str:
        result = launch_train(
            launch or LaunchConfig(),
            stage,
            init=init.checkpoint,
            mixture=mixture,
            mixture_id=mixture_id,
            out_dir=out_dir,
            run_id=run_id,
        )
        log_loss_curve(run_id, out_dir, stage.name)
        return str(result.checkpoint_dir / "model")

    key = step_key("train", stage.config_hash(), init.key, mixture_id, *([d.key for d in data_from] or []))
    return cached_step(
        stage.name,
        key,
        body,
        upstream=[init, *data_from],
        params={"init_checkpoint": init.checkpoint},
        parent_run_id=parent_run_id,
        root=root,
    )


def log_loss_curve(run_id: str, out_dir: Path, title: str, metric: str = "loss") -> None:
    """`metric` of every line of `out_dir/metrics.jsonl` against the step, as a picture on the run."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers; also safe when called from a worker thread
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(out_dir) if metric in r]
    if not rows:
        return
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    lineage.log_figure(run_id, figure, f"{metric}_curve.png")
    plt.close(figure)


def fuse(
    inputs: list[StageOutput],
    merge: MergeConfig,
    *,
    name: str = "pretrain-4-fusion",
    base: StageOutput | None = None,
    parent_run_id: str | None = None,
    root: Path | None = None,
) -> StageOutput:
    """Stage 4 (and expert merging): merge checkpoints (weighted average by default) into one."""
    merge_params = {
        "method": merge.method,
        "weights": merge.weights_for(len(inputs)),
        "density": merge.density,
        "scaling": merge.scaling,
    }

    def body(out_dir: Path, run_id: str) -> str:
        # merge_checkpoints writes under a temporary name and renames: a kill leaves no partial model/.
        return str(
            merge_checkpoints(
                [i.checkpoint for i in inputs],
                merge,
                out_dir / "model",
                base=base.checkpoint if base else None,
            )
        )

    key = step_key("fuse", merge_params, [i.key for i in inputs], base.key if base else None)
    return cached_step(
        name,
        key,
        body,
        upstream=[*inputs, *([base] if base else [])],
        parent_run_id=parent_run_id,
        root=root,
        params={
            "merge": merge_params,
            "inputs": [i.checkpoint for i in inputs],
            "base": base.checkpoint if base else None,
        },
    )


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]  # {"heldout_loss": {modality: loss}, "mcq_accuracy": float}
    passed: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_metrics(evaluations: list[dict[str, Any]]) -> dict[str, Any]:
    """The element-wise mean of several checkpoints' metrics: fusion's parent is its inputs on average."""
    losses = {
        m: statistics.fmean(e["heldout_loss"][m] for e in evaluations) for m in evaluations[0]["heldout_loss"]
    }
    mean = {"heldout_loss": losses, "mcq_accuracy": statistics.fmean(e["mcq_accuracy"] for e in evaluations)}
    for section in ("lmms_eval", "lmms_eval_ungated"):
        if all(section in e for e in evaluations):
            names = set.intersection(*(set(e[section]) for e in evaluations))
            mean[section] = {n: statistics.fmean(e[section][n] for e in evaluations) for n in sorted(names)}
    return mean


def eval_run_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A checkpoint's evaluation metrics as the MLflow metrics of its run (`eval/...`)."""
    logged = {f"eval/heldout_loss/{m}": v for m, v in metrics.get("heldout_loss", {}).items()}
    if "mcq_accuracy" in metrics:
        logged["eval/mcq_accuracy"] = metrics["mcq_accuracy"]
    for section in ("lmms_eval", "lmms_eval_ungated"):
        logged |= {f"eval/lmms_eval/{name}": v for name, v in metrics.get(section, {}).items()}
    return logged


def evaluate_stage(
    output: StageOutput,
    *,
    config: EvalConfig,
    heldout: dict[str, list[str]],
    samples: TableRef,
    mcq_records: list[dict],
    parent_metrics: dict[str, Any] | None,
    launch: LaunchConfig | None = None,
    registered_model: str | None = None,
) -> Evaluation:
    """Held-out loss per modality and MCQ accuracy of `output`'s checkpoint, logged to its run (and its logged
    model), and the promotion gate against `parent_metrics` (None: nothing to compare with, passes). With
    `registered_model` (the recipe's name) the checkpoint is registered there as the ``candidate`` and the
    gate's verdict written on the version; one that passed becomes the ``champion``. Metrics are cached beside
    the checkpoint, keyed on the evaluation config and sets, so a rerun does not recompute them. `launch`: run
    the evaluation as a job on the ranks it starts, like the stage's training (`keyeflow.steps.eval_job`);
    None evaluates in this process. It is not in the key: the ranks give the same metrics up to float
    rounding."""
    # lmms-eval settings join the key only when used, so evaluations without them keep their cached metrics.
    keyed = {k: v for k, v in asdict(config).items() if not (k.startswith("lmms_eval_") and not v)}
    eval_key = step_key("eval", keyed, heldout, samples.version, [r["question_id"] for r in mcq_records])
    cache = Path(output.checkpoint).parent / EVAL.format(key=eval_key)
    if cache.is_file():
        metrics = json.loads(cache.read_text())
    else:
        metrics = launch_evaluate(
            launch or LaunchConfig(),
            output.checkpoint,
            heldout=heldout,
            samples=samples,
            max_length=config.max_tokens,
            mcq_records=mcq_records,
            job_dir=Path(output.checkpoint).parent / EVAL_JOB.format(key=eval_key),
            lmms_eval_tasks=config.lmms_eval_tasks,
            lmms_eval_include_path=config.lmms_eval_include_path,
            lmms_eval_limit=config.lmms_eval_limit,
        )
        _write_json(cache, metrics)
    # A step cached before checkpoints were logged models gets its model now (a no-op when it has one): the
    # evaluation's metrics are logged against it.
    model_id = lineage.log_checkpoint_model(output.run_id, output.name, output.checkpoint)
    lineage.log_input(output.run_id, samples, context="evaluation")
    lineage.log_metrics(output.run_id, eval_run_metrics(metrics), model_id=model_id)
    if parent_metrics is None:
        passed, reasons = True, []
    else:
        passed, reasons = promotion_gate(metrics, parent_metrics, config.loss_margin, config.accuracy_margin)
    evaluation = Evaluation(metrics, passed, reasons)
    lineage.log_dict(
        output.run_id, {**evaluation.to_dict(), "parent_metrics": parent_metrics}, "evaluation.json"
    )
    lineage.set_tags(output.run_id, {"keyeflow.gate.promotion": "passed" if passed else "failed"})
    if registered_model is not None:
        version = lineage.register_checkpoint(registered_model, output.run_id)
        lineage.record_promotion(
            registered_model, version, passed, verdict(output, evaluation, parent_metrics)
        )
    return evaluation


def verdict(output: StageOutput, evaluation: Evaluation, parent_metrics: dict[str, Any] | None) -> str:
    """The promotion gate's verdict in words, for a registered version's description."""
    head = f"{output.name}: promotion gate {'passed' if evaluation.passed else 'FAILED'}"
    parent = parent_metrics or {}
    lines = [
        f"held-out loss {m} {v:.4f}"
        + (f" (parent {parent['heldout_loss'][m]:.4f})" if m in parent.get("heldout_loss", {}) else "")
        for m, v in evaluation.metrics["heldout_loss"].items()
    ]
    accuracy = f"MCQ accuracy {evaluation.metrics['mcq_accuracy']:.3f}"
    if "mcq_accuracy" in parent:
        accuracy += f" (parent {parent['mcq_accuracy']:.3f})"
    reasons = evaluation.reasons or (["no parent to compare with"] if parent_metrics is None else [])
    return "\n".join([head, *lines, accuracy, *reasons, f"checkpoint {output.checkpoint}"])


def mcq_source_rows(video_samples: TableRef) -> list[dict]:
    """The `video_samples` rows (pinned) the MCQ set is generated from, with each video's duration."""
    rows = (
        tables.dataset(video_samples.uri, version=video_samples.version)
        .to_table(
            columns=[
                "sample_id",
                "video_id",
                "uri",
                "frame_types",
                "sampling_fps",
                "num_frames",
                "slow_height",
                "slow_width",
            ]
        )
        .to_pylist()
    )
    if tables.exists("videos"):
        durations = {
            r["video_id"]: r["duration_s"]
            for r in tables.open_table("videos").to_table(columns=["video_id", "duration_s"]).to_pylist()
        }
        for row in rows:
            row["duration_s"] = durations.get(row["video_id"])
    return rows
