"""The DeepSpeed JSON of a stage, rendered from its `StageConfig`: the one source of truth.

Nothing here is typed twice: batch sizes follow the loader's micro-batches, ZeRO follows
`deepspeed_zero`/`zero_bucket_size`/offload flags, precision follows `bf16`, clipping `grad_clip`.
The trainer hands DeepSpeed a client `torch.optim.AdamW` (and steps its own LR schedule), so the JSON has no
"optimizer" or "scheduler" section; building DeepSpeed's fused Adam is not needed either.

Batch sizes. One DeepSpeed "micro-batch" is one loader micro-batch: a set of packed sequences whose number
of samples varies (packing), so `train_micro_batch_size_per_gpu` is 1 and only `gradient_accumulation_steps`
(= `micro_batches_per_step`) carries meaning; `train_batch_size` is their product with the world size, as
DeepSpeed checks. The samples in a step are the loader's `window_size`, whatever the world size.

Model parallelism (a long-context stage): `sequence_parallel_size` (Ulysses context parallelism: each
sequence's tokens split over that many ranks) goes in as DeepSpeed's top-level key. It divides the world: the
data-parallel ranks, which alone multiply the batch size, are world / sequence.
"""

from __future__ import annotations

from typing import Any

from keyeflow.training.config import StageConfig


def render_deepspeed_config(stage: StageConfig, world_size: int) -> dict[str, Any]:
    """The `config=` dict for `deepspeed.initialize` on `world_size` data-parallel ranks."""
    if stage.deepspeed_zero is None:
        raise ValueError(f"stage {stage.name!r} does not train with DeepSpeed (deepspeed_zero=None)")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: must be an integer >= 1")
    model_parallel = stage.sequence_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world_size={world_size} is not a multiple of sequence_parallel_size = "
            f"{stage.sequence_parallel_size} (stage {stage.name!r})"
        )
    data_parallel = world_size // model_parallel

    zero: dict[str, Any] = {"stage": stage.deepspeed_zero}
    if stage.deepspeed_zero >= 1:
        zero.update(
            # Overlap gradient reduction with the backward pass, into one contiguous buffer (less
            # fragmentation).
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_scatter=True,
            reduce_bucket_size=stage.zero_bucket_size,
            allgather_bucket_size=stage.zero_bucket_size,
        )
    if stage.deepspeed_zero == 3:
        zero.update(stage3_prefetch_bucket_size=stage.zero_bucket_size)
    if stage.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": stage.micro_batches_per_step,
        "train_batch_size": stage.micro_batches_per_step * data_parallel,
        "gradient_clipping": stage.grad_clip if stage.grad_clip is not None else 0.0,
        "bf16": {"enabled": stage.bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # The optimizer is a client torch.optim.AdamW: allow it under ZeRO, and under offload too (DeepSpeed
        # otherwise insists on its own CPU Adam, a JIT-compiled op).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # The trainer logs every step to MLflow itself.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if stage.sequence_parallel_size > 1:
        config["sequence_parallel_size"] = stage.sequence_parallel_size
    return config
