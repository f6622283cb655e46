"""The few collective operations the trainer needs, written so that one process is just world size 1.

`setup()` reads the launcher's environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and starts a process group when there is more than one rank, or when DeepSpeed will run even on
one: DeepSpeed looks for that environment and otherwise tries MPI discovery (STACK.md), so a single process
gets a one-rank gloo group on a free local port instead. gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this call started the process group, so `teardown` ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(*, need_group: bool = False) -> Distributed:
    """This process's place in the job; starts the process group if needed (and not started already)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if (world_size > 1 or need_group) and not dist.is_initialized():
        if world_size == 1:
            for key, value in (
                ("RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", str(_free_port())),
            ):
                os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Distributed(rank, world_size, local_rank, device, owns)


def teardown(info: Distributed) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: Distributed) -> None:
    if info.world_size > 1:
        dist.barrier()


def all_reduce_sum(info: Distributed, tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op on one rank); returns the tensor."""
    if info.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(info: Distributed, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects; small ones: it goes through pickling)."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(info: Distributed, module: nn.Module) -> None:
    """Every rank starts from rank 0's weights (what DistributedDataParallel does at construction)."""
    if info.world_size > 1:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(info: Distributed, params: Iterable[nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks, in one flat collective.

    A parameter with no gradient (e.g. the vision tower after a text-only step) gets zeros first, on every
    world size: all ranks then send the same layout, and the optimizer steps every trainable parameter the
    same way on one rank as on many (as DDP and DeepSpeed ZeRO also treat unused parameters).
    """
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if info.world_size == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
