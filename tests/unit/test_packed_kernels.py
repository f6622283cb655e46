"""The packed-attention kernels agree: FlexAttention with the document block mask (the CUDA path where
flash-attn is missing) against the per-segment SDPA loop (the CPU path), and the block mask is built without
an [L, L] tensor. torch runs flex_attention on CPU eagerly and forward only (it raises on a CPU backward), so
outputs are compared through flex_attention itself and gradients through the block mask's own mask function
made dense at small L (what flex's backward evaluates on the partial tiles)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, create_mask
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.packed_attention import (
    PACKED_KERNEL_ENV,
    choose_packed_kernel,
    document_block_mask,
    packed_attention,
    packed_kernel,
    packed_segments,
    segment_ids,
)


def packed_index(lengths_per_row: list[list[int]], length: int) -> torch.Tensor:
    """`sample_index` `[B, L]`: each row's samples of the given lengths in order, then padding (−1)."""
    rows = []
    for lengths in lengths_per_row:
        ids = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
        rows.append(F.pad(ids, (0, length - ids.numel()), value=-1))
    return torch.stack(rows)


# Several samples per row, tiles (16) cut through samples, samples longer than a tile, and padding: a row
# ending in padding, a row with none, a row that is padding from its second tile on.
INDEX = packed_index([[40, 7, 33, 70, 20], [150, 30, 20], [18]], 200)


def reference_allowed(sample_index: torch.Tensor) -> torch.Tensor:
    """`[B, L, L]` token-level truth: same segment (padding runs included, as `packed_segments` cuts them)
    and causal."""
    ids = segment_ids(packed_segments(sample_index))
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (ids[:, :, None] == ids[:, None, :]) & causal


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("index", [INDEX, packed_index([[200]], 200)], ids=["packed", "one-sample"])
def test_block_mask_equals_torchs_create_block_mask(block_size, index):
    allowed = reference_allowed(index)
    ours = document_block_mask(packed_segments(index), block_size)
    mask_mod = lambda b, h, q, k: allowed[b, q, k]
    theirs = create_block_mask(mask_mod, index.shape[0], None, 200, 200, device="cpu", BLOCK_SIZE=block_size)
    assert torch.equal(ours.to_dense(), theirs.to_dense())  # partial ∪ full tiles
    # Full tiles skip the mask function: they must be exactly torch's.
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    for (n1, i1), (n2, i2) in (
        ((ours.kv_num_blocks, ours.kv_indices), (theirs.kv_num_blocks, theirs.kv_indices)),
        (
            (ours.full_kv_num_blocks, ours.full_kv_indices),
            (theirs.full_kv_num_blocks, theirs.full_kv_indices),
        ),
    ):
        assert torch.equal(n1, n2)
        for b, q_tile in itertools.product(range(n1.shape[0]), range(n1.shape[-1])):
            count = int(n1[b, 0, q_tile])  # the first `count` indices are the tiles, in any order
            assert sorted(i1[b, 0, q_tile, :count].tolist()) == sorted(i2[b, 0, q_tile, :count].tolist())
    # The token-level mask function agrees with the truth everywhere.
    dense = create_mask(ours.mask_mod, index.shape[0], 1, 200, 200, device="cpu")[:, 0]
    assert torch.equal(dense, allowed)


def qkv(dtype: torch.dtype, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 200, 16), (3, 2, 200, 16), (3, 2, 200, 16)]  # GQA: 4 query heads, 2 KV heads
    return [torch.randn(s, dtype=dtype, generator=generator, requires_grad=requires_grad) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flex_kernel_equals_the_sdpa_loop(monkeypatch, dtype):
    segments = packed_segments(INDEX)
    q, k, v = qkv(dtype)
    outs = {}
    for kernel in ("sdpa_loop", "flex"):
        monkeypatch.setenv(PACKED_KERNEL_ENV, kernel)
        assert packed_kernel(q) == kernel
        outs[kernel], _ = packed_attention(None, q, k, v, segments, scaling=0.3)
    assert outs["flex"].shape == (3, 200, 4, 16)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.allclose(outs["flex"], outs["sdpa_loop"], atol=tolerance, rtol=0)
    assert segments.block_masks  # built once, kept for the next layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_mask_gradients_equal_the_sdpa_loop(monkeypatch, dtype):
    """Gradients through the block mask's mask function (dense, SDPA) equal the SDPA loop's."""
    monkeypatch.setenv(PACKED_KERNEL_ENV, "sdpa_loop")
    segments = packed_segments(INDEX)
    upstream = torch.randn(3, 200, 4, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mask = create_mask(document_block_mask(segments).mask_mod, 3, 1, 200, 200, device="cpu")

    loop_inputs = qkv(dtype, requires_grad=True)
    loop_out, _ = packed_attention(None, *loop_inputs, segments, scaling=0.3)
    loop_grads = torch.autograd.grad((loop_out * upstream).sum(), loop_inputs)

    mask_inputs = qkv(dtype, requires_grad=True)
    q, k, v = mask_inputs
    mask_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    mask_grads = torch.autograd.grad((mask_out.transpose(1, 2) * upstream).sum(), mask_inputs)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    assert torch.allclose(mask_out.transpose(1, 2), loop_out, atol=tolerance, rtol=0)
    for got, want in zip(mask_grads, loop_grads):
        assert torch.allclose(got, want, atol=tolerance, rtol=0)

    # flex_attention itself has no CPU backward yet; once it has, its gradients must match too.
    flex_inputs = qkv(dtype, requires_grad=True)
    monkeypatch.setenv(PACKED_KERNEL_ENV, "flex")
    try:
        flex_out, _ = packed_attention(None, *flex_inputs, packed_segments(INDEX), scaling=0.3)
    except NotImplementedError as error:
        assert "backward on CPU" in str(error)
        return
    flex_grads = torch.autograd.grad((flex_out * upstream).sum(), flex_inputs)  # pragma: no cover
    for got, want in zip(flex_grads, loop_grads):  # pragma: no cover
        assert torch.allclose(got, want, atol=tolerance, rtol=0)


def test_the_tiny_model_gives_the_same_logits_with_flex_and_the_loop(monkeypatch):
    config = tiny()
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(config).double().eval()
    index = packed_index([[50, 90, 60], [120, 30]], 200)
    ids = torch.randint(0, config.image_token_id, index.shape, generator=torch.Generator().manual_seed(2))
    positions = torch.zeros(3, *index.shape, dtype=torch.long)
    for b in range(index.shape[0]):
        for s in index[b].unique().tolist():
            where = torch.nonzero(index[b] == s).flatten()
            positions[:, b, where] = torch.arange(where.numel())
    logits = {}
    for kernel in ("sdpa_loop", "flex"):
        monkeypatch.setenv(PACKED_KERNEL_ENV, kernel)
        with torch.no_grad():
            logits[kernel] = model(input_ids=ids, sample_index=index, position_ids=positions).logits
    real = index >= 0  # padding outputs are never read
    assert torch.allclose(logits["flex"][real], logits["sdpa_loop"][real], atol=1e-10, rtol=0)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_block_mask_build_allocates_no_square_tensor():
    length = 4096
    index = packed_index([[512, 3000, 500]], length)
    segments = packed_segments(index)
    with LargestTensor() as ours:
        document_block_mask(segments)
    assert ours.largest < length * length // 4, ours.largest
    # torch's create_block_mask (eager) evaluates the mask function on the whole [L, L] grid first: the guard
    # sees it, which is why the block mask is built from tiles here.
    ids = segment_ids(segments)
    with LargestTensor() as theirs:
        create_block_mask(
            lambda b, h, q, k: (ids[b, q] == ids[b, k]) & (q >= k), 1, None, length, length, "cpu"
        )
    assert theirs.largest >= length * length


def test_kernel_rule_and_override(monkeypatch):
    bf16, fp32 = torch.bfloat16, torch.float32
    assert choose_packed_kernel("cuda", bf16, 0.0, has_flash=True) == "flash_varlen"
    assert choose_packed_kernel("cuda", fp32, 0.0, has_flash=True) == "flex"
    assert choose_packed_kernel("cuda", bf16, 0.0, has_flash=False) == "flex"
    assert choose_packed_kernel("cuda", bf16, 0.1, has_flash=False) == "sdpa_loop"
    assert choose_packed_kernel("cpu", bf16, 0.0, has_flash=True) == "sdpa_loop"
    query = torch.zeros(1, 1, 1, 1)
    monkeypatch.delenv(PACKED_KERNEL_ENV, raising=False)
    assert packed_kernel(query) == "sdpa_loop"
    monkeypatch.setenv(PACKED_KERNEL_ENV, "flex")
    assert packed_kernel(query) == "flex"
    monkeypatch.setenv(PACKED_KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="must be one of"):
        packed_kernel(query)
