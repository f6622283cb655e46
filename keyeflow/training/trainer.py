"""The training loop of one stage: `train(stage, init=..., mixture=..., mixture_id=..., out_dir=...)`.

It reads top to bottom: where to start (the last checkpoint in `out_dir`, else `init`) → the model, frozen per
the stage's policy → AdamW and the LR schedule → plain PyTorch data parallelism or a DeepSpeed engine → the
loader (this rank's micro-batches of the mixture) → steps → checkpoints. Run it in a process (one rank), or
under torchrun / the DeepSpeed launcher (`main()` reads a JSON spec; see `main`).

**The loss, and why it does not depend on how a step is split.** A step's loss is the mean over every label
token of the step: sum of token cross-entropies over all micro-batches of all ranks, divided by the step's
total number of label tokens N (all micro-batches, all ranks). Each micro-batch backpropagates
`(its sum of token losses) / N`, gradients add up over the micro-batches and are SUMMED (not averaged) over
ranks, so the update is the gradient of that token mean whatever the number of ranks, micro-batches or packs,
and a long sample weighs by its tokens, not by the size of the batch it landed in. (The usual "mean per
micro-batch, averaged over micro-batches and ranks" would weigh a token of a short micro-batch more, and would
change the loss when a resume moves from 2 ranks to 1.) N is one all-reduce before the step's first backward:
each rank collates its whole step first (payloads are small: token ids and uint8 patches).

**Checkpoints** (every `checkpoint_every` steps and at the last step), at `out_dir/step-XXXXXXXX/`:
`model/` (save_pretrained: what the next stage loads as `init`), `trainer.pt` (optimizer, LR scheduler, each
rank's torch/numpy/python RNG states), `deepspeed/` (the engine's own partitioned optimizer state, with
DeepSpeed), and `state.json` (step, the loss of every step so far, the loader's position, the number of
mixture occurrences consumed, the stage config and its hash). A checkpoint is written to a hidden temporary
directory, renamed into place (`os.replace`) and only then named in `out_dir/latest` (replaced atomically
too), so a kill at any moment leaves either the previous checkpoint or the new one registered, never half
of one. A run finding `out_dir/latest` resumes from it: weights, optimizer, schedule, RNG and the loader
continue exactly where the checkpoint was taken, so the losses after a resume equal an uninterrupted run's,
bit for bit (same world size), and the loader takes up at the exact next sample on any world size.

`out_dir/metrics.jsonl` has one line per step (loss, lr, tokens, tokens/s, grad norm, wall-clock time, and
the mixture occurrences the step trained on, all ranks together); a resume first drops the lines after its
checkpoint, so the file always tells the story of the registered run. With `run_id` the same numbers (not the
occurrences) go to MLflow every step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from keyeflow import lineage
from keyeflow.datasets import tables
from keyeflow.datasets.tables import TableRef
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.config import KeyeConfig
from keyeflow.model.modeling import IGNORE_INDEX, KeyeForConditionalGeneration, mrope_position_ids
from keyeflow.model.processor import Features, collate_rows
from keyeflow.training import distributed
from keyeflow.training.config import StageConfig
from keyeflow.training.deepspeed_config import render_deepspeed_config
from keyeflow.training.loader import MicroBatch, MixtureLoader
from keyeflow.datasets.sample_reader import LanceSampleReader

log = logging.getLogger(__name__)

LATEST = "latest"
METRICS = "metrics.jsonl"
STATE = "state.json"
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainResult:
    checkpoint_dir: Path  # the last checkpoint (its `model/` is the next stage's init)
    step: int  # optimizer steps done
    losses: list[float]  # the loss of every step, from step 1 (across resumes)


def train(stage: StageConfig, *, init: str | Path | KeyeConfig, mixture: TableRef, mixture_id: str,
          out_dir: str | Path, run_id: str | None = None) -> TrainResult:
    """Train `stage` on `mixture_id` (rows of the pinned `mixture` table) from `init` (a checkpoint directory, or
    a `KeyeConfig` for fresh weights seeded by `stage.seed`), checkpointing into `out_dir`; resumes from
    `out_dir/latest` when present. `run_id`: the MLflow run to log to (None: only `out_dir/metrics.jsonl`)."""
    out_dir = Path(out_dir)
    if stage.sequence_parallel_size > 1 or stage.pipeline_parallel_size > 1:
        raise ValueError(
            f"stage {stage.name!r}: sequence_parallel_size={stage.sequence_parallel_size}, pipeline_parallel_size="
            f"{stage.pipeline_parallel_size}: this loop trains data-parallel only; the DeepSpeed JSON for those "
            "sizes is rendered (render_deepspeed_config) for a cluster job whose model is split into pipeline "
            "stages with Ulysses attention. Set both to 1 to train here.")
    dist = distributed.setup(need_group=stage.deepspeed_zero is not None)
    try:
        return _train(stage, init, mixture, mixture_id, out_dir, run_id, dist)
    finally:
        if stage.deepspeed_zero is None:  # DeepSpeed caches groups for the process's life: keep the group then
            distributed.teardown(dist)


def _train(stage: StageConfig, init: str | Path | KeyeConfig, mixture: TableRef, mixture_id: str,
           out_dir: Path, run_id: str | None, dist: distributed.Distributed) -> TrainResult:
    # ---- Where to start: the last registered checkpoint, else `init`.
    resume_dir = latest_checkpoint(out_dir)
    saved = json.loads((resume_dir / STATE).read_text()) if resume_dir else None
    if saved:
        check_resumable(saved, stage, mixture_id, dist.world_size)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".tmp-*"):  # a checkpoint interrupted while being written
            shutil.rmtree(stale, ignore_errors=True)

    # ---- Model. Fresh weights depend only on the seed, so every rank builds the same ones.
    torch.manual_seed(stage.seed)
    model = load_model(resume_dir / "model" if resume_dir else init)
    if stage.rope_theta is not None:
        model.config.rope_theta = stage.rope_theta  # read at every forward; saved with the checkpoint
    # The checkpoint tells the context it was trained at (what generation and the next stage may rely on).
    text_config = model.config.text_config
    text_config.max_position_embeddings = max(text_config.max_position_embeddings or 0, stage.max_length)
    trainable = freeze(model, stage.trainable_prefixes())
    model.to(dist.device).train()

    # ---- Optimizer: only trainable parameters exist for it, so frozen ones stay bit-identical (no decay,
    # no update). Decay on matrices only: decaying norms' gains and biases pulls them to 0 for no benefit.
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=stage.learning_rate, betas=stage.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: stage.lr_at(s) / stage.learning_rate)

    # ---- Parallelism: DeepSpeed's engine (ZeRO) with our optimizer, or plain data parallelism where we
    # all-reduce the gradients ourselves once per step.
    engine = None
    if stage.deepspeed_zero is not None:
        import deepspeed  # imported only here: it is slow to import and optional for one process

        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=render_deepspeed_config(stage, dist.world_size))
    else:
        distributed.broadcast_parameters(dist, model)
    forward = engine if engine is not None else model

    # ---- The rest of the training state.
    step, losses, num_consumed = 0, [], 0
    if saved:
        step, losses, num_consumed = saved["step"], list(saved["losses"]), saved["num_consumed_occurrences"]
        load_training_state(resume_dir, optimizer, scheduler, engine, dist, stage.seed + step)
    else:
        seed_everything(stage.seed + dist.rank)

    # ---- Data: this rank's micro-batches, packed and balanced over ranks by the loader. Its position is part
    # of the checkpoint, so a resume continues at the exact next sample, even on another world size.
    reader = LanceSampleReader(train_samples_of(mixture, mixture_id), root=tables_root(mixture))
    loader = MixtureLoader(mixture, mixture_id, rank=dist.rank, world_size=dist.world_size,
                           max_length=stage.max_length, micro_batches_per_step=stage.micro_batches_per_step,
                           seed=stage.seed, sample_reader=reader, window_size=stage.window_size,
                           num_epochs=None)  # max_steps ends the stage, not the epochs
    if saved:
        loader.load_state_dict(saved["loader"])
    micro_batches = iter(loader)
    pad_id = model.config.text_config.pad_token_id or 0
    # Under DeepSpeed every rank must run a backward for every micro-batch, and, because ZeRO reduces
    # gradients in buckets filled in the order they become ready, touch the same parameters in the same
    # order. So a DeepSpeed micro-batch without pixels (or an empty one) carries a tiny unlabelled image: its
    # own sample, which changes no loss and no gradient.
    dummy = vision_dummy(model.config) if engine is not None else None

    if dist.is_main:
        truncate_metrics(out_dir / METRICS, step)
        if run_id and not saved:
            lineage.log_params(run_id, {"stage": stage.to_dict(), "stage_hash": stage.config_hash(),
                                        "mixture_id": mixture_id, "world_size": dist.world_size})
            lineage.log_input(run_id, mixture)
    checkpoint_dir = resume_dir
    log.info("stage %s: steps %d → %d on %d rank(s)%s", stage.name, step, stage.max_steps, dist.world_size,
             f", resumed from {resume_dir}" if resume_dir else "")

    # ---- The loop: one window of the mixture per optimizer step.
    while step < stage.max_steps:
        started = time.perf_counter()
        batches = [next(micro_batches) for _ in range(stage.micro_batches_per_step)]
        assert batches[0].step == step and batches[-1].is_last_in_step, "loader and trainer disagree on steps"
        inputs = [micro_batch_inputs(mb, pad_id, dummy) for mb in batches]

        # N: label tokens of the whole step (every micro-batch of every rank); see the module docstring.
        counts = torch.tensor([sum(num_label_tokens(b) for b in inputs if b is not None),
                               sum(mb.num_tokens for mb in batches)], dtype=torch.float64, device=dist.device)
        num_labels, num_tokens = distributed.all_reduce_sum(dist, counts).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        lr = scheduler.get_last_lr()[0]

        for batch in inputs:
            if batch is None:  # an empty micro-batch: nothing to compute, the step's collectives follow
                continue
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=stage.bf16 and engine is None):
                token_losses = token_loss_sum(forward, batch, dist.device)
            loss = token_losses / max(num_labels, 1.0)
            if engine is not None:
                # DeepSpeed averages gradients over ranks; ours are already divided by the global N, so scale
                # back to a sum. scale_wrt_gas=False: the accumulation is already in N too.
                engine.backward(loss * dist.world_size, scale_wrt_gas=False)
                engine.step()  # updates only at the accumulation boundary (the step's last micro-batch)
            elif loss.requires_grad:  # not when no trained weight was used (text under a projector-only stage)
                loss.backward()
            loss_sum += token_losses.detach().double()

        if engine is not None:
            grad_norm = engine.get_global_grad_norm()
        else:
            distributed.all_reduce_gradients(dist, trainable)
            grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, stage.grad_clip) if stage.grad_clip
                         else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable])))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1

        step_loss = distributed.all_reduce_sum(dist, loss_sum).item() / max(num_labels, 1.0)
        losses.append(step_loss)
        occurrences = sorted(o for rank_occ in distributed.all_gather_objects(
            dist, [o for mb in batches for o in mb.occurrences]) for o in rank_occ)
        num_consumed += len(occurrences)
        elapsed = time.perf_counter() - started
        metrics = {"loss": step_loss, "lr": lr, "tokens": num_tokens, "label_tokens": num_labels,
                   "tokens_per_s": num_tokens / elapsed,
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        if dist.is_main:
            with (out_dir / METRICS).open("a") as f:
                f.write(json.dumps({"step": step, **metrics, "time": time.time(), "occurrences": occurrences})
                        + "\n")
            if run_id:
                lineage.log_metrics(run_id, metrics, step=step)
            log.info("step %d/%d loss %.4f lr %.3g %.0f tokens/s", step, stage.max_steps, step_loss, lr,
                     metrics["tokens_per_s"])

        if step % stage.checkpoint_every == 0 or step == stage.max_steps:
            checkpoint_dir = save_checkpoint(
                out_dir, step, dist=dist, model=model, optimizer=optimizer, scheduler=scheduler, engine=engine,
                state={"format": CHECKPOINT_FORMAT, "step": step, "losses": losses,
                       "num_consumed_occurrences": num_consumed, "loader": loader.state_dict(),
                       "mixture_id": mixture_id, "mixture": {"uri": mixture.uri, "version": mixture.version},
                       "stage": stage.to_dict(), "stage_hash": stage.config_hash(),
                       "world_size": dist.world_size, "deepspeed_zero": stage.deepspeed_zero})
            if dist.is_main and run_id:
                lineage.set_tags(run_id, {"keyeflow.checkpoint": str(checkpoint_dir)})

    assert checkpoint_dir is not None  # the last step always writes one
    return TrainResult(checkpoint_dir=checkpoint_dir, step=step, losses=losses)


# ---------------------------------------------------------------------------------------------- model


def load_model(init: str | Path | KeyeConfig) -> KeyeForConditionalGeneration:
    """Fresh weights from a config (under the caller's seed), or a checkpoint directory (ours or Keye's)."""
    if isinstance(init, KeyeConfig):
        return KeyeForConditionalGeneration(init)
    return load_keye_checkpoint(init)


def freeze(model: nn.Module, prefixes: tuple[str, ...] | None) -> list[nn.Parameter]:
    """Set requires_grad per the policy (None: everything trains); return the trainable parameters in model
    order. Every prefix must name at least one parameter, so a typo cannot freeze the whole model."""
    names = [name for name, _ in model.named_parameters()]
    if prefixes is not None:
        for prefix in prefixes:
            if not any(name == prefix or name.startswith(prefix + ".") for name in names):
                raise ValueError(f"trainable prefix {prefix!r} matches no parameter; top-level modules: "
                                 f"{sorted({n.split('.')[0] for n in names})}")
    trainable = []
    for name, p in model.named_parameters():
        keep = prefixes is None or any(name == q or name.startswith(q + ".") for q in prefixes)
        p.requires_grad_(keep)
        if keep:
            trainable.append(p)
    return trainable


def vision_dummy(config: KeyeConfig) -> Features:
    """One black 2×2-patch image (one vision token), no labels."""
    merge = config.vision_config.spatial_merge_size
    ids = torch.tensor([config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
    grid = torch.tensor([[1, merge, merge]])
    positions = mrope_position_ids(ids, grid, image_token_id=config.image_token_id,
                                   video_token_id=config.video_token_id, spatial_merge_size=merge)
    return Features(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX),
                    pixel_values=torch.zeros(merge * merge, config.vision_config.patch_dim, dtype=torch.uint8),
                    grid_thw=grid, position_ids=positions, num_vision_tokens=len(ids))


def micro_batch_inputs(mb: MicroBatch, pad_token_id: int, dummy: Features | None) -> dict[str, Any] | None:
    """The model batch of one micro-batch: each pack is one row (the loader planned the packs). None when the
    micro-batch is empty and no dummy is needed."""
    rows = [list(pack) for pack in mb.payloads]
    if dummy is not None and not any(f.grid_thw.numel() for row in rows for f in row):
        if rows:
            min(rows, key=lambda row: sum(len(f) for f in row)).append(dummy)
        else:
            rows = [[dummy]]
    return collate_rows(rows, pad_token_id=pad_token_id) if rows else None


def num_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the logit at i predicts label i + 1


def token_loss_sum(forward: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropies over the batch's label tokens, in fp32."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    logits = forward(**inputs).logits
    targets = batch["labels"][:, 1:].to(device)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# ---------------------------------------------------------------------------------------------- data


def tables_root(mixture: TableRef) -> str:
    """The tables root holding `mixtures` (train_samples and the media tables sit beside it)."""
    return mixture.uri.rstrip("/").rsplit("/", 1)[0]


def train_samples_of(mixture: TableRef, mixture_id: str) -> TableRef:
    """train_samples at the version the mixture pinned."""
    rows = tables.dataset(mixture.uri, version=mixture.version).to_table(
        columns=["train_samples_version"], filter=f"mixture_id = '{mixture_id}'", limit=1)
    if rows.num_rows == 0:
        raise ValueError(f"mixture {mixture_id!r} has no rows in {mixture}")
    version = int(rows.column("train_samples_version")[0].as_py())
    return TableRef("train_samples", f"{tables_root(mixture)}/train_samples.lance", version)


# ---------------------------------------------------------------------------------------------- checkpoints


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint `out_dir/latest` names, or None for a fresh start."""
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    path = out_dir / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which holds no {STATE}")
    return path


def check_resumable(saved: dict[str, Any], stage: StageConfig, mixture_id: str, world_size: int) -> None:
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {saved.get('format')!r}, this trainer reads {CHECKPOINT_FORMAT}")
    if saved["mixture_id"] != mixture_id:
        raise ValueError(f"cannot resume: the checkpoint trained on mixture {saved['mixture_id']!r}, "
                         f"this run asks for {mixture_id!r} (start a new out_dir with the checkpoint as init)")
    if saved["deepspeed_zero"] != stage.deepspeed_zero:
        raise ValueError(f"cannot resume: the checkpoint's optimizer state was written with deepspeed_zero="
                         f"{saved['deepspeed_zero']}, this run has {stage.deepspeed_zero}")
    if stage.deepspeed_zero is not None and saved["world_size"] != world_size:
        raise ValueError(f"cannot resume: DeepSpeed partitioned the optimizer state over {saved['world_size']} "
                         f"ranks, this run has {world_size} (plain data parallelism resumes on any world size)")
    if saved["stage_hash"] != stage.config_hash():
        changed = sorted(k for k, v in stage.to_dict().items() if saved["stage"].get(k) != v)
        log.warning("resuming with changed stage settings: %s", ", ".join(changed))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(out_dir: Path, step: int, *, dist: distributed.Distributed, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, engine: Any, state: dict[str, Any]) -> Path:
    """Write step `step`'s checkpoint atomically and register it in `latest` (see the module docstring)."""
    name = f"step-{step:08d}"
    final, tmp = out_dir / name, out_dir / f".tmp-{name}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(dist)
    rngs = distributed.all_gather_objects(dist, rng_state())
    weights = None
    if engine is not None:
        # Every rank writes its own optimizer partition.
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="engine", save_latest=False)
        if engine.zero_optimization_stage() == 3:  # parameters are partitioned too: gather them for rank 0
            weights = engine._zero3_consolidated_16bit_state_dict()
    if dist.is_main:
        module = engine.module if engine is not None else model
        module.save_pretrained(tmp / "model", state_dict=weights)
        torch.save({"optimizer": optimizer.state_dict() if engine is None else None,
                    "scheduler": scheduler.state_dict(), "rng": rngs}, tmp / "trainer.pt")
        (tmp / STATE).write_text(json.dumps(state))
        if final.exists():  # written by a run killed before it reached `latest`: never registered
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomically(out_dir / LATEST, name + "\n")
    distributed.barrier(dist)
    return final


def load_training_state(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any, engine: Any,
                        dist: distributed.Distributed, fallback_seed: int) -> None:
    saved = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    if engine is not None:
        engine.load_checkpoint(str(path / "deepspeed"), tag="engine", load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rngs = saved["rng"]
    if len(rngs) == dist.world_size:
        torch.set_rng_state(rngs[dist.rank]["torch"])
        np.random.set_state(rngs[dist.rank]["numpy"])
        random.setstate(rngs[dist.rank]["python"])
    else:  # another world size: no saved stream belongs to this rank
        seed_everything(fallback_seed + dist.rank)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (those the resumed checkpoint has seen)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line, torn by a kill while it was being written
            continue
        if record["step"] <= step:
            kept.append(line)
    write_atomically(path, "".join(line + "\n" for line in kept))


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step records of `out_dir/metrics.jsonl`."""
    path = Path(out_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


# ---------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node N -m keyeflow.training.trainer SPEC.json` (or `python -m …` for one process).

    SPEC.json: {"stage": {StageConfig fields}, "init": "checkpoint/dir" or {KeyeConfig dict},
    "mixture": {"name": "mixtures", "uri": …, "version": …}, "mixture_id": …, "out_dir": …,
    "run_id": null}.
    Rank 0 prints the result as one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m keyeflow.training.trainer SPEC.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(args[0]).read_text())
    init = spec["init"]
    result = train(StageConfig.from_dict(spec["stage"]),
                   init=KeyeConfig.from_dict(init) if isinstance(init, dict) else init,
                   mixture=TableRef(**spec["mixture"]), mixture_id=spec["mixture_id"],
                   out_dir=spec["out_dir"], run_id=spec.get("run_id"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint_dir": str(result.checkpoint_dir), "step": result.step,
                          "losses": result.losses}), flush=True)


if __name__ == "__main__":
    main()
