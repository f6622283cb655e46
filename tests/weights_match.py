"""Comparing the parameters two training runs reached when they should be the same run summed in another order
(sharded ranks, micro-batches, a launched job against the in-process stage).

AdamW moves an element by up to its learning rate a step whatever the gradient's size, so where a gradient is
~0 its rounding decides the move, and the order of summation changes the rounding: on one CPU one element of a
tensor was 1.3e-5 off after two steps of 1e-3 while every other matched within 1e-6. An attention key bias
adds the same q·b to every score of a query, which softmax cancels, so its whole gradient is rounding noise,
and so is a key weight's along the mean of the keys' inputs (10 of 4,096 elements of a ViT layer's key
projection were off after three steps on an AVX-512 CPU). A wrong shard or a missed gradient moves most
elements by ~lr, which these checks see."""

from __future__ import annotations

from collections.abc import Mapping

import torch

NOISE_ONLY_SUFFIXES = ("attn.k_proj.bias",)


def assert_same_updates(
    got: Mapping[str, torch.Tensor],
    want: Mapping[str, torch.Tensor],
    *,
    lr: float,
    atol: float,
    rtol: float = 0.0,
    max_off_share: float = 0.01,
) -> None:
    """Every tensor of `want` in `got`: every element within lr / 10, and all but `max_off_share` of each
    tensor's elements (at least one allowed) within `atol` + `rtol` · |value|; tensors whose gradient is
    rounding noise alone (`NOISE_ONLY_SUFFIXES`) are not compared."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key.endswith(NOISE_ONLY_SUFFIXES):
            continue
        diff = (got[key].float() - value.float()).abs()
        assert float(diff.max()) <= lr / 10, (key, float(diff.max()))
        off = int((diff > atol + rtol * value.float().abs()).sum())
        assert off <= max(1, int(diff.numel() * max_off_share)), (key, off, diff.numel())
