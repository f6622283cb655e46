"""Fully sharded training state: parameters, gradients and AdamW state of every module (the ViT and the
projector included) split over all ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`), and checkpoints
written shard by shard, asynchronously, with `torch.distributed.checkpoint` (DCP), readable on any world size.

**Why FSDP2 and not DeepSpeed ZeRO-3.** Both were tried on this model, on CPU with gloo, in this
environment (torch 2.13, DeepSpeed 0.19.8), before anything was built:
- FSDP2 trained the tiny model on 2 ranks out of the box, and shards a model built on the meta device, so no
  rank ever holds the whole model; its parameters stay ordinary `DTensor`s, so AdamW, gradient clipping and
  freezing work on them unchanged;
- `deepspeed.zero.Init` (ZeRO-3's way to build a model partitioned) fails inside transformers 5's
  `post_init` of the nested `Qwen3Model`; without it ZeRO-3 trains, but every rank first builds the whole
  model;
- DCP saves each rank's shard (and the optimizer's) in parallel, in a background thread (`async_save`), and
  loads a checkpoint onto any number of ranks by re-slicing what it reads; DeepSpeed needs an offline
  `ds_to_universal` conversion for another world size.

**Units.** Each ViT layer and each LLM decoder layer is one FSDP unit (all-gathered just before its forward,
freed after it, gathered again for its backward), as are the ViT's embeddings (`vision`), the `projector` and
`embed_tokens`. The root unit holds the rest: the LLM's final norm and `lm_head`, whose weight the chunked
log-prob head reads directly (not through the module's forward), so it must stay gathered for the step.
Gradients are reduce-scattered as SUMS over ranks (`set_gradient_divide_factor(1)`): the loops divide their
losses by whole-step counts, as on plain data parallelism (`keyeflow.training.engine`).

**What a rank materialises.** The model is built on the meta device (no storage), sharded, then given
storage for its own shard only (`to_empty`): each rank holds 1/world of every parameter, of its gradient and
of AdamW's two moments (dim-0 slices, padded to equal size). The initial weights of a checkpoint (ours, or
the released Keye-VL-1.5 layout, names translated by `keyeflow.model.checkpoint`'s table) are read
rank-locally by DCP's Hugging Face reader: each rank reads only the rows of its shards from the safetensors
files; the one exception is Keye's Conv2d patch embedding (0.7M values at SigLIP-400M sizes), read whole by
every rank to be reshaped. Transient extras: one unit's gathered parameters at a time during forward and
backward (plus the root's, `lm_head` and the final norm, for the whole step). The Hugging Face `model/`
export is written from the shards too (`export_model`): no rank gathers the weights in memory. Only fresh
weights from a `KeyeConfig` are materialised whole, on every rank, once, then sharded and freed (seeded, so
every rank builds the same ones; only tiny from-scratch runs start so).

**Checkpoints** (`save_state`/`load_state`): `dcp/` holds the model's and optimizer's shards and DCP's
metadata (global shapes and where every slice lives); loading on another world size reads the slices each
new rank needs. `async_save` copies the state into host memory (a snapshot: training goes on and changes the
live tensors) and writes in a background thread over its own gloo group, so checkpoint traffic never
interleaves with the training collectives; the engine registers the checkpoint in `latest` only once every
rank's write has finished.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from keyeflow.model.checkpoint import checkpoint_config, is_our_checkpoint, keye_key_to_ours
from keyeflow.model.config import KeyeConfig
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.training import distributed

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
EXPORT_FILE_BYTES = 5 * 2**30  # per safetensors file of the Hugging Face export


def unbuilt_model(init: Path | KeyeConfig) -> tuple[KeyeForConditionalGeneration, Path | None]:
    """The model to shard, and the checkpoint whose weights `shard_model` must load into it (None: it has its
    weights already, or a resume fills them from DCP). A checkpoint's model comes back on the meta device (no
    storage at all); fresh weights are built whole (module docstring)."""
    if isinstance(init, KeyeConfig):
        return KeyeForConditionalGeneration(init), None  # under the caller's seed, the same on every rank
    with torch.device("meta"):
        return KeyeForConditionalGeneration(checkpoint_config(init)), Path(init)


def shard_model(
    model: KeyeForConditionalGeneration,
    dist: distributed.Distributed,
    *,
    weights: Path | None,
    bf16: bool = False,
) -> None:
    """Shard `model` in place over all ranks (module docstring: units, gradient sums), give a meta-device
    model storage for its shard, and load `weights` (a checkpoint directory) rank-locally. `bf16`: the
    units compute in bf16 (each gathered shard cast once) and reduce gradients in fp32; the sharded
    parameters, which AdamW updates, stay fp32."""
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    units: list[nn.Module] = [
        *model.vision.layers,
        model.vision,
        model.projector,
        *model.language_model.layers,
        model.language_model.embed_tokens,
    ]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (FSDP would otherwise pre-multiply by 1/factor, an op gloo lacks).
            module.set_force_sum_reduction_for_comms(True)
    local = sum(p.to_local().numel() for p in model.parameters())
    log.info(
        "rank %d holds %d of %d parameter elements (%.1f%%), and as much gradient and 2x as much AdamW state",
        dist.rank,
        local,
        sum(p.numel() for p in model.parameters()),
        100 * local / max(sum(p.numel() for p in model.parameters()), 1),
    )
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=dist.device)
        if weights is None:
            return  # a resume: load_state fills every shard
        load_weights(model, weights)


def load_weights(model: nn.Module, path: Path) -> None:
    """Fill a sharded model from the safetensors of a checkpoint directory, ours or in the released
    Keye-VL-1.5 layout: each rank reads the rows of its own shards (cast to the parameters' dtype), by the
    file's names (`keyeflow.model.checkpoint`'s table translates Keye's). The one tensor whose shape differs,
    Keye's Conv2d patch embedding (a Linear here, the same map), is small: every rank reads it whole."""
    state = get_model_state_dict(model)
    translate = str if is_our_checkpoint(path) else keye_key_to_ours
    by_file_name: dict[str, torch.Tensor] = {}
    patch_embedding = None
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                ours = translate(name)
                if ours is None:
                    continue  # a weight the model does not use (checkpoint.DROPPED_KEYS)
                if ours == "vision.patch_embed.weight" and len(f.get_slice(name).get_shape()) == 4:
                    patch_embedding = f.get_tensor(name)
                else:
                    by_file_name[name] = state[ours]
    found = {translate(name) for name in by_file_name} | (
        {"vision.patch_embed.weight"} if patch_embedding is not None else set()
    )
    if set(state) - found:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {sorted(set(state) - found)[:8]}"
        )
    dcp.load(by_file_name, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    if patch_embedding is not None:
        target = state["vision.patch_embed.weight"]
        flat = patch_embedding.reshape(patch_embedding.shape[0], -1).to(target.dtype)
        target.to_local().copy_(distribute_tensor(flat, target.device_mesh, target.placements).to_local())
    set_model_state_dict(model, state)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective), or the tensor itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def clip_and_norm(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the (sharded) gradients, after scaling them to `max_norm` when they exceed it."""
    grads = [p.grad for p in params]
    norm = full_tensor(torch.nn.utils.get_total_norm(grads))
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def copy_full_weights(sharded: nn.Module, target: nn.Module) -> None:
    """Copy the weights of a sharded model into an unsharded model of the same architecture (a rollout
    engine's copy), one tensor at a time: each is all-gathered, copied into place and dropped, so a rank
    never holds more than the target and one gathered tensor. A collective: every rank calls it at the same
    point."""
    target_state = target.state_dict()
    with torch.no_grad():
        for name, value in sharded.state_dict().items():
            target_state[name].copy_(full_tensor(value))


def export_model(model: nn.Module, path: Path, dist: distributed.Distributed) -> None:
    """The Hugging Face checkpoint of the weights (what `save_pretrained` writes and the next stage loads),
    written from the shards: each rank writes its own shards, then rank 0 copies them, byte range by byte
    range, into whole tensors in `model-0000k-of-0000n.safetensors` files (at most `EXPORT_FILE_BYTES` each)
    with their index. No rank gathers the model in memory, and no optimizer state is touched."""
    state = get_model_state_dict(model)
    files, size = {}, 0
    for name, tensor in state.items():  # model order, so a file holds neighbouring layers
        files[name] = 1 + size // EXPORT_FILE_BYTES
        size += tensor.numel() * tensor.element_size()
    dcp.save(
        state,
        storage_writer=dcp.HuggingFaceStorageWriter(
            str(path), fqn_to_index_mapping=files, save_distributed=True, enable_consolidation=True
        ),
    )
    distributed.barrier(dist)  # the consolidated files are complete
    if dist.is_main:
        shutil.rmtree(path / "sharded")  # the per-rank pieces the files were assembled from
        write_config(model, path, next(iter(state.values())).dtype)


def write_config(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """The model's `config.json` as `save_pretrained` records it (on an FSDP module its class is FSDP's
    subclass of ours): alone, it is what a checkpoint without the weights export needs to rebuild the model
    on the meta device for a resume from its `dcp/` shards."""
    config = model.config
    config.architectures = [KeyeForConditionalGeneration.__name__]
    config.dtype = dtype
    config.save_pretrained(path)


def new_checkpoint_group(dist: distributed.Distributed) -> Any:
    """A gloo group of all ranks for the background writer's collectives (module docstring). A collective:
    every rank calls it, once."""
    return torch_dist.new_group(backend="gloo") if dist.world_size > 1 else None


def save_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, *, group: Any, asynchronous: bool
) -> Future | None:
    """Write this rank's shards of the weights and optimizer state under `path/dcp`. Asynchronous: returns
    once the state is copied to host memory, with a future that completes when this rank's files and (on
    rank 0) the metadata are written."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if asynchronous:
        return dcp.async_save(state, checkpoint_id=str(path / DCP_DIR), process_group=group)
    dcp.save(state, checkpoint_id=str(path / DCP_DIR), process_group=group)
    return None


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Fill the weights and optimizer state from `path/dcp`, written on any number of ranks."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
