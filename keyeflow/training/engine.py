"""The one training engine under every loop: the stage trainer (`trainer.train`, which also trains SFT,
LongCoT SFT and the reward model), MPO (`preference.train_mpo`) and GSPO (`rl.train_gspo`). A loop decides
what a step computes (its batches and its loss); the engine owns everything else, once:

- **where to start** (`resume_point`): the checkpoint `out_dir/latest` names, or a fresh start;
- **the model's wrapping**: one process, plain data parallelism over gloo/NCCL (rank 0's weights broadcast at
  the start, gradients SUMMED over ranks once per update, see `distributed.all_reduce_gradients`), a
  DeepSpeed ZeRO 0-3 engine when the loop hands over a rendered DeepSpeed config, or FSDP2 (`fsdp=True`):
  parameters, gradients and AdamW state of every module sharded over all ranks, the model built on the meta
  device and its initial weights read rank-locally (`keyeflow.training.sharding`, which says why FSDP2 and
  not DeepSpeed ZeRO-3);
- **fp32 master weights whatever the checkpoint's dtype**: without DeepSpeed the model is trained in float32
  (bf16 compute, when asked for, is autocast over those weights), because AdamW on bf16 weights rounds
  every update below half a unit in the last place away: at a learning rate of 1e-6 nearly all of them
  (a bf16 weight of 0.02 moves in steps of 1.2e-4). DeepSpeed's bf16 mode keeps its own fp32 master copies;
- **AdamW and the schedule**: decay on matrices only (decaying norms' gains and biases pulls them to 0 for no
  benefit), the learning rate of update `s` = `lr_at(s)`; frozen parameters are never given to the
  optimizer, so nothing (weight decay included) can change them;
- **one update** (`backward` per micro-batch, then `step`): gradients accumulate over a step's micro-batches
  exactly as the loop scaled its losses (the loops divide by global counts, so the sum over micro-batches and
  ranks is the gradient of the whole step's mean), the global norm is clipped, AdamW steps;
- **one checkpoint format** (`save`/`load`): `out_dir/step-XXXXXXXX/` holds `model/` (save_pretrained in the
  training dtype, with the tokenizer when the loop has one: what the next stage loads as `init`),
  `trainer.pt` (optimizer, LR schedule, every rank's torch/numpy/python RNG state), `deepspeed/` (the
  engine's own partitioned state, with DeepSpeed), `dcp/` (with FSDP2: each rank's shards of the weights
  and the optimizer state, written in the background by `torch.distributed.checkpoint.async_save` and
  loadable on any world size; `model/` is then assembled from the weights' shards on disk) and `state.json`
  (the step, the loop's own state: loader position, reward shift, item fingerprints, its config and hash).
  It is written to a hidden temporary directory, renamed into place, and only then named in `out_dir/latest`
  (replaced atomically too), so a kill at any moment leaves the previous checkpoint or the new one
  registered, never half of one. An asynchronous checkpoint is registered once every rank's write has
  finished: at the first update after that (`step` asks every rank), at the next `save`, or at
  `wait_for_checkpoint` (the loop calls it before it returns);
- **metrics**: `out_dir/metrics.jsonl` (one line per step; a resume first drops the lines after its
  checkpoint) and the `MetricsSink` the loop was given (MLflow through `keyeflow.lineage.RunSink`; training
  code never imports the tracking module).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from keyeflow.datasets.tables import TableRef
from keyeflow.training import distributed, sharding

log = logging.getLogger(__name__)

LATEST = "latest"
METRICS = "metrics.jsonl"
STATE = "state.json"
TRAINER_STATE = "trainer.pt"


# ---------------------------------------------------------------------------------------------- metrics


class MetricsSink(Protocol):
    """Where a training loop reports what an experiment tracker should show. `keyeflow.lineage.RunSink`
    writes to an MLflow run; `NullSink` drops everything (metrics.jsonl is written either way)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_input(self, table: TableRef) -> None: ...

    def set_checkpoint(self, path: Path) -> None: ...


class NullSink:
    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_input(self, table: TableRef) -> None:
        pass

    def set_checkpoint(self, path: Path) -> None:
        pass


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (what a tracker can plot)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


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


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- resume


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint `out_dir/latest` names, or None for a fresh start."""
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    path = out_dir / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which holds no {STATE}")
    return path


def resume_point(out_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """(the registered checkpoint, its state.json) to resume from, or (None, None)."""
    resume_dir = latest_checkpoint(out_dir)
    return resume_dir, json.loads((resume_dir / STATE).read_text()) if resume_dir else None


def check_kind(saved: Mapping[str, Any], kind: str, fmt: int) -> None:
    """A loop resumes only its own checkpoints, of the format it reads."""
    if saved.get("format") != fmt or saved.get("kind", kind) != kind:
        raise ValueError(
            f"the checkpoint in out_dir is not a {kind} checkpoint of format {fmt} "
            f"(kind {saved.get('kind')!r}, format {saved.get('format')!r})"
        )


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------- engine


def decay_groups(params: Sequence[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: decay on matrices, none on norms' gains and biases."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def freeze(model: nn.Module, prefixes: tuple[str, ...] | None) -> list[nn.Parameter]:
    """Set requires_grad per the policy (None: everything trains); return the trainable parameters in model
    order. Every prefix must name at least one parameter, so a typo cannot freeze the whole model."""
    names = [name for name, _ in model.named_parameters()]
    if prefixes is not None:
        for prefix in prefixes:
            if not any(name == prefix or name.startswith(prefix + ".") for name in names):
                raise ValueError(
                    f"trainable prefix {prefix!r} matches no parameter; top-level modules: "
                    f"{sorted({n.split('.')[0] for n in names})}"
                )
    trainable = []
    for name, p in model.named_parameters():
        keep = prefixes is None or any(name == q or name.startswith(q + ".") for q in prefixes)
        p.requires_grad_(keep)
        if keep:
            trainable.append(p)
    return trainable


class Engine:
    """A model being trained (module docstring). Build it after loading the model and before `load`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        dist: distributed.Distributed,
        learning_rate: float,
        lr_at: Callable[[int], float],
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        trainable_prefixes: tuple[str, ...] | None = None,
        bf16: bool = False,
        deepspeed_config: dict[str, Any] | None = None,
        train_mode: bool = True,
        activation_checkpointing: str = "off",
        fsdp: bool = False,
        init_weights: Path | None = None,
        async_checkpoints: bool = True,
    ):
        """`fsdp`: shard `model` (built on the meta device or not, `sharding.unbuilt_model`) with FSDP2, and
        load `init_weights` (a checkpoint directory, ours or Keye's) into the shards rank-locally; None: the
        model has its weights, or `load` will fill them. `async_checkpoints`: FSDP2 checkpoints are written in
        the background (module docstring)."""
        if fsdp and deepspeed_config is not None:
            raise ValueError("fsdp and a DeepSpeed config are two ways to shard: pass one")
        self.dist = dist
        self.grad_clip = grad_clip or None  # 0 and None both mean no clipping
        self.sharded = fsdp
        # FSDP2 computes in bf16 through its mixed-precision policy (each gathered unit cast once).
        self.bf16_autocast = bf16 and deepspeed_config is None and not fsdp
        if deepspeed_config is None and any(p.dtype != torch.float32 for p in model.parameters()):
            model.float()  # fp32 master weights (module docstring)
        self.trainable = freeze(model, trainable_prefixes)
        self.checkpoint_group = None
        self.async_checkpoints = async_checkpoints
        self.pending_checkpoint: tuple[Any, Path, Path, str] | None = None
        if fsdp:
            sharding.shard_model(model, dist, weights=init_weights, bf16=bf16)
            # fully_shard replaced every parameter by its sharded DTensor (same requires_grad).
            self.trainable = [p for p in model.parameters() if p.requires_grad]
            self.checkpoint_group = sharding.new_checkpoint_group(dist)
        else:
            model.to(dist.device)
        model.train(train_mode)
        # Applied by the model's own layer loops in either mode (RL trains its policy in eval mode).
        if activation_checkpointing != "off":
            model.set_activation_checkpointing(activation_checkpointing)
        self.model = model
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.trainable, weight_decay), lr=learning_rate, betas=betas
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(s) / learning_rate)
        self.deepspeed = None
        if deepspeed_config is not None:
            import deepspeed  # imported only here: it is slow to import and optional for one process

            self.deepspeed, *_ = deepspeed.initialize(
                model=model, optimizer=self.optimizer, config=deepspeed_config
            )
            # DeepSpeed's engine sets train/eval on its module; keep the loop's choice.
            self.deepspeed.module.train(train_mode)
        elif not fsdp:
            distributed.broadcast_parameters(dist, model)

    @property
    def forward(self) -> nn.Module:
        """What the loop calls for a training forward (the DeepSpeed engine, or the model itself)."""
        return self.deepspeed if self.deepspeed is not None else self.model

    @property
    def module(self) -> nn.Module:
        return self.deepspeed.module if self.deepspeed is not None else self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast)

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor, *, last: bool | None = None) -> None:
        """Accumulate the gradient of one micro-batch's loss (scaled by the loop to global counts). `last`:
        whether it is the step's last micro-batch, for a loop whose steps have varying numbers of them (a
        token budget); None: the fixed `gradient_accumulation_steps` of the DeepSpeed config decides."""
        if self.deepspeed is not None:
            if last is not None:
                # DeepSpeed reduces gradients and updates at the accumulation boundary, which it otherwise
                # counts from the config's fixed number of micro-batches per step.
                self.deepspeed.set_gradient_accumulation_boundary(last)
            # DeepSpeed averages gradients over ranks; ours are already divided by the global counts, so scale
            # back to a sum. scale_wrt_gas=False: the accumulation is already in those counts too.
            self.deepspeed.backward(loss * self.dist.world_size, scale_wrt_gas=False)
            self.deepspeed.step()  # updates only at the accumulation boundary (the step's last micro-batch)
        elif self.sharded:
            loss.backward()  # on every rank, always: FSDP reduce-scatters each unit's gradients in it
        elif loss.requires_grad:  # not when no trained weight was used (text under a projector-only stage)
            loss.backward()

    def step(self) -> float:
        """One update from the accumulated gradients; returns the global gradient norm (before clipping)."""
        if self.deepspeed is not None:
            grad_norm = self.deepspeed.get_global_grad_norm()
        elif self.sharded:
            # Gradients are already summed over ranks, sharded. A parameter no micro-batch used gets zeros, as
            # on plain data parallelism (distributed.all_reduce_gradients), so AdamW steps it the same way.
            for p in self.trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grad_norm = sharding.clip_and_norm(self.trainable, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            distributed.all_reduce_gradients(self.dist, self.trainable)
            if self.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.trainable]))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.register_written_checkpoint()
        return float(grad_norm) if grad_norm is not None else float("nan")

    def register_written_checkpoint(self) -> None:
        """Register the checkpoint being written in the background if every rank has finished writing it (a
        collective while one is pending: every rank calls it once per step), so a kill loses as few steps as
        possible."""
        if self.pending_checkpoint is None:
            return
        done = torch.tensor([float(self.pending_checkpoint[0].done())], device=self.dist.device)
        if self.all_reduce_sum(done).item() == self.dist.world_size:
            self.wait_for_checkpoint()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(self.dist, tensor)

    def gather(self, obj: Any) -> list[Any]:
        return distributed.all_gather_objects(self.dist, obj)

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(
        self,
        out_dir: Path,
        step: int,
        state: dict[str, Any],
        *,
        tokenizer: Any = None,
        export_weights: bool = True,
    ) -> Path:
        """Write step `step`'s checkpoint atomically and register it in `latest` (module docstring); with
        FSDP2 and `async_checkpoints`, its shards are still being written when this returns, and it is
        registered later (`wait_for_checkpoint`)."""
        self.wait_for_checkpoint()  # the previous one is registered first: `latest` only moves forward
        dist = self.dist
        name = f"step-{step:08d}"
        final, tmp = out_dir / name, out_dir / f".tmp-{name}"
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier(dist)
        rngs = distributed.all_gather_objects(dist, rng_state())
        weights = None
        writing = None
        if self.deepspeed is not None:
            # Every rank writes its own optimizer partition.
            self.deepspeed.save_checkpoint(str(tmp / "deepspeed"), tag="engine", save_latest=False)
            if self.deepspeed.zero_optimization_stage() == 3:  # parameters are partitioned: gather for rank 0
                weights = self.deepspeed._zero3_consolidated_16bit_state_dict()
        elif self.sharded:
            # Every rank writes its shards (in the background), then its weights' shards for `model/`.
            writing = sharding.save_state(
                self.model,
                self.optimizer,
                tmp,
                group=self.checkpoint_group,
                asynchronous=self.async_checkpoints,
            )
            # The Hugging Face weights only when asked (a stage's last checkpoint, what the next stage loads):
            # at scale the export is a second full copy of the weights on disk per checkpoint. Without it
            # `model/` holds the config, enough to resume from `dcp/`.
            if export_weights:
                sharding.export_model(self.model, tmp / "model", dist)
            elif dist.is_main:
                sharding.write_config(self.model, tmp / "model", torch.float32)
        if dist.is_main:
            if not self.sharded:
                self.module.save_pretrained(tmp / "model", state_dict=weights)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict()
                    if self.deepspeed is None and not self.sharded
                    else None,  # in the engine's own sharded files
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rngs,
                },
                tmp / TRAINER_STATE,
            )
            (tmp / STATE).write_text(json.dumps({**state, "step": step, "world_size": dist.world_size}))
        self.pending_checkpoint = (writing, tmp, final, name)
        if writing is None:
            self.wait_for_checkpoint()
        return final

    def wait_for_checkpoint(self) -> None:
        """Register the checkpoint `save` started, once every rank has written its part (a collective: every
        rank calls it at the same point; a no-op when none is pending)."""
        if self.pending_checkpoint is None:
            return
        writing, tmp, final, name = self.pending_checkpoint
        self.pending_checkpoint = None
        if writing is not None:
            writing.result()
        distributed.barrier(self.dist)  # every rank's files are complete
        if self.dist.is_main:
            if final.exists():  # written by a run killed before it reached `latest`: never registered
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomically(final.parent / LATEST, name + "\n")
        distributed.barrier(self.dist)

    def load(self, path: Path, fallback_seed: int) -> None:
        """Restore the optimizer, the schedule and this rank's RNG streams from the checkpoint at `path` (its
        weights were loaded with the model, except with FSDP2: from its `dcp/` here). On another world size no
        saved stream belongs to this rank, so the RNG is seeded from `fallback_seed` + rank instead."""
        saved = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
        if self.deepspeed is not None:
            self.deepspeed.load_checkpoint(
                str(path / "deepspeed"),
                tag="engine",
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        elif self.sharded:
            # The weights too: this rank reads the slices of its shards, whatever the saving world size.
            sharding.load_state(self.model, self.optimizer, path)
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        rngs = saved["rng"]
        if len(rngs) == self.dist.world_size:
            torch.set_rng_state(rngs[self.dist.rank]["torch"])
            np.random.set_state(rngs[self.dist.rank]["numpy"])
            random.setstate(rngs[self.dist.rank]["python"])
        else:
            seed_everything(fallback_seed + self.dist.rank)


def prepare_out_dir(out_dir: Path, dist: distributed.Distributed, resumed_step: int) -> None:
    """Create `out_dir`, drop a checkpoint interrupted while being written, and cut metrics.jsonl back to the
    step being resumed from (rank 0 only: the others wait at the first collective)."""
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        truncate_metrics(out_dir / METRICS, resumed_step)


def append_metrics(
    out_dir: Path,
    dist: distributed.Distributed,
    sink: MetricsSink,
    step: int,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """One step's line in metrics.jsonl (with `extra`, not sent to the sink) and its numbers to the sink."""
    if not dist.is_main:
        return
    with (out_dir / METRICS).open("a") as f:
        f.write(json.dumps({"step": step, **metrics, **(extra or {})}) + "\n")
    sink.log_metrics(numeric(metrics), step)


def chunks(items: Sequence[Any], num: int) -> Iterator[Sequence[Any]]:
    """`items` cut into `num` contiguous, nearly equal slices (some empty when there are fewer items)."""
    for k in range(num):
        yield items[k * len(items) // num : (k + 1) * len(items) // num]
