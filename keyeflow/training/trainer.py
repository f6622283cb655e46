"""The training loop of one stage: `train(stage, init=..., mixture=..., mixture_id=..., out_dir=...)`.

It reads top to bottom: where to start (the last checkpoint in `out_dir`, else `init`) → the model on the
training engine (`keyeflow.training.engine`: freezing per the stage's policy, fp32 master weights, AdamW and
the LR schedule, plain data parallelism, DeepSpeed ZeRO, or FSDP2 with `fsdp`: every module's state sharded
over all ranks, the model built on the meta device) → the loader (this rank's micro-batches of the
mixture) → steps (`train_step`) → checkpoints. Run it in a process (one rank), or under torchrun / the
DeepSpeed launcher through `keyeflow.steps.train_job`.

**The loss, and why it does not depend on how a step is split.** A step's loss is the mean over every label
token of the step: sum of token cross-entropies over all micro-batches of all ranks, divided by the step's
total number of label tokens N (all micro-batches, all ranks). Each micro-batch backpropagates
`(its sum of token losses) / N`, gradients add up over the micro-batches and are SUMMED (not averaged) over
ranks, so the update is the gradient of that token mean whatever the number of ranks, micro-batches or packs,
and a long sample weighs by its tokens, not by the size of the batch it landed in. (The usual "mean per
micro-batch, averaged over micro-batches and ranks" would weigh a token of a short micro-batch more, and would
change the loss when a resume moves from 2 ranks to 1.) N is one all-reduce before the step's first backward:
each rank collates its whole step first (payloads are small: token ids and uint8 patches).

**Checkpoints** (every `checkpoint_every` steps and at the last step) are the engine's format, with this
loop's state in `state.json`: the loss of every step so far, the loader's position, the number of mixture
occurrences consumed, the stage config and its hash. A run finding `out_dir/latest` resumes from it: weights,
optimizer, schedule, RNG and the loader continue exactly where the checkpoint was taken, so the losses after
a resume equal an uninterrupted run's, bit for bit (same world size), and the loader takes up at the exact
next sample on any world size. Weights and optimizer state resume on any world size too, except DeepSpeed's
(partitioned for the world size that wrote them); FSDP2's sharded checkpoints are re-sliced on load.

`out_dir/metrics.jsonl` has one line per step (loss, lr, tokens, tokens/s, grad norm, wall-clock time, and
the mixture occurrences the step trained on, all ranks together); a resume first drops the lines after its
checkpoint, so the file always tells the story of the registered run. The numbers (not the occurrences) also
go to the `sink` the caller gives (an MLflow run, through `keyeflow.lineage.RunSink`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch
from torch import nn

from keyeflow.datasets import tables
from keyeflow.datasets.sample_reader import LanceSampleReader
from keyeflow.datasets.tables import TableRef
from keyeflow.faults import kill_point
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.config import KeyeConfig
from keyeflow.model.modeling import IGNORE_INDEX, KeyeForConditionalGeneration, mrope_position_ids
from keyeflow.model.processor import Features, collate_rows
from keyeflow.model.sequence_parallel import sequence_parallel_mesh
from keyeflow.training import distributed, sharding
from keyeflow.training.balance import CostModel
from keyeflow.training.config import StageConfig
from keyeflow.training.deepspeed_config import render_deepspeed_config
from keyeflow.training.engine import (
    Engine,
    MetricsSink,
    NullSink,
    append_metrics,
    prepare_out_dir,
    resume_point,
    seed_everything,
)
from keyeflow.training.loader import MicroBatch, MixtureLoader

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainResult:
    checkpoint_dir: Path  # the last checkpoint (its `model/` is the next stage's init)
    step: int  # optimizer steps done
    losses: list[float]  # the loss of every step, from step 1 (across resumes)


def train(
    stage: StageConfig,
    *,
    init: str | Path | KeyeConfig,
    mixture: TableRef,
    mixture_id: str,
    out_dir: str | Path,
    sink: MetricsSink | None = None,
) -> TrainResult:
    """Train `stage` on `mixture_id` (rows of the pinned `mixture` table) from `init` (a checkpoint directory,
    or a `KeyeConfig` for fresh weights seeded by `stage.seed`), checkpointing into `out_dir`; resumes from
    `out_dir/latest` when present. `sink`: where parameters and per-step metrics are reported (None: only
    `out_dir/metrics.jsonl`)."""
    out_dir = Path(out_dir)
    dist = distributed.setup(
        need_group=stage.deepspeed_zero is not None or stage.fsdp or stage.sequence_parallel_size > 1
    )
    try:
        return _train(stage, init, mixture, mixture_id, out_dir, sink or NullSink(), dist)
    finally:
        if (
            stage.deepspeed_zero is None
        ):  # DeepSpeed caches groups for the process's life: keep the group then
            distributed.teardown(dist)


def _train(
    stage: StageConfig,
    init: str | Path | KeyeConfig,
    mixture: TableRef,
    mixture_id: str,
    out_dir: Path,
    sink: MetricsSink,
    dist: distributed.Distributed,
) -> TrainResult:
    if dist.world_size % stage.sequence_parallel_size:
        raise ValueError(
            f"stage {stage.name!r}: sequence_parallel_size={stage.sequence_parallel_size} does not divide "
            f"{dist.world_size} rank(s)"
        )
    # ---- Where to start: the last registered checkpoint, else `init`.
    resume_dir, saved = resume_point(out_dir)
    if saved:
        check_resumable(saved, stage, mixture_id, dist.world_size)
    prepare_out_dir(out_dir, dist, saved["step"] if saved else 0)

    # ---- Model. Fresh weights depend only on the seed, so every rank builds the same ones. Sharded (FSDP2),
    # one of our checkpoints is built on the meta device and each rank reads only its shards: from `init`, or
    # on a resume from the checkpoint's own sharded state (engine.load).
    torch.manual_seed(stage.seed)
    init_weights = None
    if stage.fsdp:
        model, init_weights = sharding.unbuilt_model(resume_dir / "model" if resume_dir else init)
        if resume_dir:
            init_weights = None
    else:
        model = load_model(resume_dir / "model" if resume_dir else init)
    if stage.rope_theta is not None:
        model.config.rope_theta = stage.rope_theta  # read at every forward; saved with the checkpoint
    # The checkpoint tells the context it was trained at (what generation and the next stage may rely on).
    text_config = model.config.text_config
    text_config.max_position_embeddings = max(text_config.max_position_embeddings or 0, stage.max_length)
    # Sequence parallelism: the ranks of a sequence group train on the same micro-batches, each on its
    # slice of every row (`keyeflow.model.sequence_parallel`); the loader deals micro-batches to data ranks.
    data_rank, data_world = dist.rank, dist.world_size
    if stage.sequence_parallel_size > 1:
        mesh, sequence = sequence_parallel_mesh(
            stage.sequence_parallel_size, device_type=dist.device.type, grid_cost=CostModel().grid_cost
        )
        model.set_sequence_parallel(sequence)
        data_rank, data_world = mesh.get_local_rank("data"), mesh.size(0)
    engine = Engine(
        model,
        dist=dist,
        learning_rate=stage.learning_rate,
        lr_at=stage.lr_at,
        betas=stage.betas,
        weight_decay=stage.weight_decay,
        grad_clip=stage.grad_clip,
        trainable_prefixes=stage.trainable_prefixes(),
        bf16=stage.bf16,
        activation_checkpointing=stage.activation_checkpointing,
        fsdp=stage.fsdp,
        init_weights=init_weights,
        deepspeed_config=render_deepspeed_config(stage, dist.world_size)
        if stage.deepspeed_zero is not None
        else None,
    )

    # ---- The rest of the training state.
    step, losses, num_consumed = 0, [], 0
    if saved:
        step, losses, num_consumed = saved["step"], list(saved["losses"]), saved["num_consumed_occurrences"]
        engine.load(resume_dir, stage.seed + step)
    else:
        seed_everything(stage.seed + dist.rank)

    # ---- Data: this rank's micro-batches, packed and balanced over ranks by the loader. Its position is part
    # of the checkpoint, so a resume continues at the exact next sample, even on another world size.
    reader = LanceSampleReader(train_samples_of(mixture, mixture_id), root=tables_root(mixture))
    loader = MixtureLoader(
        mixture,
        mixture_id,
        rank=data_rank,
        world_size=data_world,
        max_length=stage.max_length,
        micro_batches_per_step=stage.micro_batches_per_step,
        seed=stage.seed,
        sample_reader=reader,
        window_size=stage.window_size,
        num_epochs=None,
        max_tokens_per_micro_batch=stage.max_tokens_per_micro_batch,
    )  # max_steps ends the stage, not the epochs
    if saved:
        loader.load_state_dict(saved["loader"])
    micro_batches = iter(loader)
    pad_id = model.config.text_config.pad_token_id or 0
    # Under DeepSpeed every rank must run a backward for every micro-batch, and, because ZeRO reduces
    # gradients in buckets filled in the order they become ready, touch the same parameters in the same
    # order; under FSDP2 every rank must run every unit's forward and backward (its all-gather and
    # reduce-scatter are collectives), the ViT's too. So a sharded micro-batch without pixels (or an empty
    # one) carries a tiny unlabelled image: its own sample, which changes no loss and no gradient.
    dummy = vision_dummy(model.config) if engine.deepspeed is not None or engine.sharded else None

    if dist.is_main and not saved:
        sink.log_params(
            {
                "stage": stage.to_dict(),
                "stage_hash": stage.config_hash(),
                "mixture_id": mixture_id,
                "world_size": dist.world_size,
            }
        )
        sink.log_input(mixture)
    checkpoint_dir = resume_dir
    log.info(
        "stage %s: steps %d → %d on %d rank(s)%s",
        stage.name,
        step,
        stage.max_steps,
        dist.world_size,
        f", resumed from {resume_dir}" if resume_dir else "",
    )

    # ---- The loop: one window of the mixture per optimizer step.
    while step < stage.max_steps:
        started = time.perf_counter()
        # A step is the loader's micro-batches up to the step's last: a fixed count, or under a token budget
        # as many as the window needs (the same number on every rank).
        batches = [next(micro_batches)]
        while not batches[-1].is_last_in_step:
            batches.append(next(micro_batches))
        assert batches[0].step == step and all(mb.step == step for mb in batches), (
            "loader and trainer disagree"
        )
        lr = engine.lr
        step_loss, num_tokens, num_labels, grad_norm = train_step(
            engine,
            batches,
            pad_id,
            dummy,
            budgeted=stage.max_tokens_per_micro_batch is not None,
            sequence_parallel_size=stage.sequence_parallel_size,
        )
        step += 1
        losses.append(step_loss)
        # every rank of a sequence group read the same micro-batches: count them once
        occurrences = sorted(
            {o for rank_occ in engine.gather([o for mb in batches for o in mb.occurrences]) for o in rank_occ}
        )
        num_consumed += len(occurrences)
        elapsed = time.perf_counter() - started
        metrics = {
            "loss": step_loss,
            "lr": lr,
            "tokens": num_tokens,
            "label_tokens": num_labels,
            "micro_batches": len(batches),
            "tokens_per_s": num_tokens / elapsed,
            "grad_norm": grad_norm,
        }
        append_metrics(out_dir, dist, sink, step, metrics, {"time": time.time(), "occurrences": occurrences})
        kill_point("stage.step")  # after the step's update and metrics, before its checkpoint
        if dist.is_main:
            log.info(
                "step %d/%d loss %.4f lr %.3g %.0f tokens/s",
                step,
                stage.max_steps,
                step_loss,
                lr,
                metrics["tokens_per_s"],
            )

        if step % stage.checkpoint_every == 0 or step == stage.max_steps:
            checkpoint_dir = engine.save(
                out_dir,
                step,
                {
                    "format": CHECKPOINT_FORMAT,
                    "kind": "stage",
                    "losses": losses,
                    "num_consumed_occurrences": num_consumed,
                    "loader": loader.state_dict(),
                    "mixture_id": mixture_id,
                    "mixture": {"uri": mixture.uri, "version": mixture.version},
                    "stage": stage.to_dict(),
                    "stage_hash": stage.config_hash(),
                    "deepspeed_zero": stage.deepspeed_zero,
                    **({"fsdp": True} if stage.fsdp else {}),
                },
                export_weights=step == stage.max_steps,
            )
            if dist.is_main:
                sink.set_checkpoint(checkpoint_dir)

    engine.wait_for_checkpoint()  # the last one may still be being written (FSDP2 saves asynchronously)
    assert checkpoint_dir is not None  # the last step always writes one
    return TrainResult(checkpoint_dir=checkpoint_dir, step=step, losses=losses)


def train_step(
    engine: Engine,
    batches: list[MicroBatch],
    pad_id: int,
    dummy: Features | None,
    *,
    budgeted: bool = False,
    sequence_parallel_size: int = 1,
) -> tuple[float, float, float, float]:
    """One optimizer step over this rank's micro-batches: (the step's token-mean loss over all ranks, its
    tokens, its label tokens, the gradient norm). See the module docstring for the normalisation. Under
    sequence parallelism the `sequence_parallel_size` ranks of a group hold the same micro-batches and each
    computes the whole rows' loss (its gradient flows through its own slice only): sums over all ranks count
    every group that many times."""
    inputs = [micro_batch_inputs(mb, pad_id, dummy) for mb in batches]
    device = engine.dist.device
    # N: label tokens of the whole step (every micro-batch of every rank); see the module docstring.
    counts = torch.tensor(
        [sum(num_label_tokens(b) for b in inputs if b is not None), sum(mb.num_tokens for mb in batches)],
        dtype=torch.float64,
        device=device,
    )
    num_labels, num_tokens = (engine.all_reduce_sum(counts) / sequence_parallel_size).tolist()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # With a token budget the number of micro-batches varies by step (the same on every rank): tell the
    # engine which one closes the step. A fixed count leaves it to the engine's own count.
    last = max((i for i, b in enumerate(inputs) if b is not None), default=-1) if budgeted else None
    for i, batch in enumerate(inputs):
        if batch is None:  # an empty micro-batch: nothing to compute, the step's collectives follow
            continue
        with engine.autocast():
            token_losses = token_loss_sum(engine.forward, batch, device)
        engine.backward(token_losses / max(num_labels, 1.0), last=None if last is None else i == last)
        loss_sum += token_losses.detach().double()
    grad_norm = engine.step()
    step_loss = engine.all_reduce_sum(loss_sum).item() / sequence_parallel_size / max(num_labels, 1.0)
    return step_loss, num_tokens, num_labels, grad_norm


# ---------------------------------------------------------------------------------------------- model


def load_model(init: str | Path | KeyeConfig) -> KeyeForConditionalGeneration:
    """Fresh weights from a config (under the caller's seed), or a checkpoint directory (ours or Keye's)."""
    if isinstance(init, KeyeConfig):
        return KeyeForConditionalGeneration(init)
    return load_keye_checkpoint(init)


def vision_dummy(config: KeyeConfig) -> Features:
    """One black 2×2-patch image (one vision token), no labels."""
    merge = config.vision_config.spatial_merge_size
    ids = torch.tensor([config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
    grid = torch.tensor([[1, merge, merge]])
    positions = mrope_position_ids(
        ids,
        grid,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        spatial_merge_size=merge,
    )
    return Features(
        input_ids=ids,
        labels=torch.full_like(ids, IGNORE_INDEX),
        pixel_values=torch.zeros(merge * merge, config.vision_config.patch_dim, dtype=torch.uint8),
        grid_thw=grid,
        position_ids=positions,
        num_vision_tokens=len(ids),
    )


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
    """Sum (not mean) of the next-token cross-entropies over the batch's label tokens, in fp32. The model
    scores only the label positions, in chunks (`logprob_labels`): no [tokens, vocabulary] logits."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return -forward(**inputs, logprob_labels=batch["labels"].to(device)).token_logprobs.sum()


# ---------------------------------------------------------------------------------------------- data


def tables_root(mixture: TableRef) -> str:
    """The tables root holding `mixtures` (train_samples and the media tables sit beside it)."""
    return mixture.uri.rstrip("/").rsplit("/", 1)[0]


def train_samples_of(mixture: TableRef, mixture_id: str) -> TableRef:
    """train_samples at the version the mixture pinned."""
    rows = tables.dataset(mixture.uri, version=mixture.version).to_table(
        columns=["train_samples_version"], filter=pc.field("mixture_id") == mixture_id, limit=1
    )
    if rows.num_rows == 0:
        raise ValueError(f"mixture {mixture_id!r} has no rows in {mixture}")
    version = int(rows.column("train_samples_version")[0].as_py())
    return TableRef("train_samples", f"{tables_root(mixture)}/train_samples.lance", version)


# ---------------------------------------------------------------------------------------------- checkpoints


def check_resumable(saved: dict[str, Any], stage: StageConfig, mixture_id: str, world_size: int) -> None:
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format {saved.get('format')!r}, this trainer reads {CHECKPOINT_FORMAT}")
    if saved["mixture_id"] != mixture_id:
        raise ValueError(
            f"cannot resume: the checkpoint trained on mixture {saved['mixture_id']!r}, "
            f"this run asks for {mixture_id!r} (start a new out_dir with the checkpoint as init)"
        )
    if saved["deepspeed_zero"] != stage.deepspeed_zero:
        raise ValueError(
            f"cannot resume: the checkpoint's optimizer state was written with deepspeed_zero="
            f"{saved['deepspeed_zero']}, this run has {stage.deepspeed_zero}"
        )
    if saved.get("fsdp", False) != stage.fsdp:
        raise ValueError(
            f"cannot resume: the checkpoint was written with fsdp={saved.get('fsdp', False)}, this run has "
            f"{stage.fsdp} (its weights and optimizer state are in another format)"
        )
    # A sharded (FSDP2) checkpoint is re-sliced for any world size on load; DeepSpeed's is not.
    if stage.deepspeed_zero is not None and saved["world_size"] != world_size:
        raise ValueError(
            f"cannot resume: DeepSpeed partitioned the optimizer state over {saved['world_size']} "
            f"ranks, this run has {world_size} (plain data parallelism resumes on any world size)"
        )
    if saved["stage_hash"] != stage.config_hash():
        changed = sorted(k for k, v in stage.to_dict().items() if saved["stage"].get(k) != v)
        log.warning("resuming with changed stage settings: %s", ", ".join(changed))


def read_result(out_dir: str | Path) -> TrainResult:
    """What `train` returned, from what it left in `out_dir`: the checkpoint `latest` names (the last step
    always writes one) and the losses recorded in it."""
    checkpoint, state = resume_point(Path(out_dir))
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint registered in {out_dir}")
    return TrainResult(checkpoint_dir=checkpoint, step=state["step"], losses=list(state["losses"]))
