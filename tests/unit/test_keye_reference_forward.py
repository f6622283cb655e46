"""An independent Keye-VL-1.5 forward, written here from the public model description, against our model on
an exported tiny checkpoint (issue 18, "Must show": logits within 1e-5 with an image and a Slow/Fast video).

`KeyeReference` reads only what `keyeflow export` writes (config.json and the safetensors under the released
names: `visual.vision_model.*`, `mlp_AR.*`, `model.*`, `lm_head.weight`) and raw inputs: uint8 H×W×3 frames
and the token ids. It uses none of keyeflow's model code. What it follows, from the public sources:
- Pixels: x/255, then (x − 0.5)/0.5 (the released image processor's rescale and SigLIP mean/std 0.5). Each
  frame is cut into 14×14 patches in raster order, values channel-major, and embedded by the Conv2d
  `patch_embedding` (vLLM `keye.py` `KeyeVisionEmbeddings`).
- Absolute positions: the square `position_embedding` table, bilinearly interpolated (align_corners=False)
  to the frame's patch grid and added per patch (`interpolate_pos_encoding`).
- Vision 2D RoPE (`KeyeSiglipEncoder`, `SigLIPRotaryEmbedding(head_dim // 2)`, theta 1e4): the first quarter
  of each head's frequencies turn with the patch row, the second with the patch column; applied to q and k
  in half-split (NeoX) form (`apply_rotary_pos_emb_flashatt`, flash-attn's non-interleaved rotary).
- Vision encoder: pre-LayerNorm SigLIP layers (q/k/v/out with biases, scale head_dim^-0.5, full attention
  inside each grid only: vLLM's `cu_seqlens` has one segment per image and per video frame), MLP fc1 →
  `hidden_act` → fc2, then `post_layernorm`.
- Projector `KeyeVL1_5Projector` (`mlp_AR`): the 2×2 neighbours of a raster grid are concatenated as
  `(t h p1 w p2) d -> (t h w) (p1 p2 d)` (top-left, top-right, bottom-left, bottom-right), then LayerNorm
  over 4·hidden (eps 1e-5, fixed in the code, not read from the config) → linear_1 → exact GELU →
  linear_2. Merged tokens are in raster order of the merged grid. The Kwai team's transformers port
  (`KeyeVL1_5Projector`, `get_rope_index`) does the same: view (t, h/2, 2, w/2, 2, d), permute to
  (t, h/2, w/2, 2, 2, d), LayerNorm eps 1e-5; and it maps the released `mlp_AR.*` names onto its own.
- Embeddings: image tokens take the image features in order, video tokens the frames' features in order.
- 3-row mRoPE positions (vLLM `KeyeVL1_5ForConditionalGeneration.get_mrope_input_positions`): text tokens
  count up on all three rows; each image or frame grid (every video frame its own t=1 grid) gets
  (t, h, w) indices of its merged grid plus the next free position; the text after it continues at the
  largest position used + 1.
- LLM Qwen3 (transformers `Qwen3Attention`/`Qwen3MLP`/`Qwen3RMSNorm`): RMSNorm before attention and MLP;
  q/k RMSNorm over each head's head_dim before RoPE; grouped-query attention (each KV head serves
  num_heads / num_kv_heads query heads), causal, scale head_dim^-0.5; SiLU-gated MLP; final norm; lm_head.
- mRoPE section split (Qwen2-VL `apply_multimodal_rotary_pos_emb`): the head_dim/2 frequencies are split by
  `mrope_section` into consecutive chunks taking their angle from the t, h, w position rows in turn; the
  rotation is half-split (NeoX).

What this comparison cannot see at the tolerance (measured by perturbing the reference): the projector
LayerNorm eps (1e-6 instead of 1e-5 moves the logits by ~5e-6). Everything else tried moves them by 1e-4 to
3 (vision RoPE axes swapped or left out, align_corners=True, a wrong pixel mean, no q/k norm, GQA heads
tiled instead of grouped, tanh/exact GELU swapped, a wrong mrope_section, a wrong merge order).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from keyeflow.datasets.pretokenize import patchify
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.config import tiny
from keyeflow.model.export import export_keye
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches, collate, encode_sample
from keyeflow.model.tokenizer import load_tokenizer

PATCH, MERGE = 14, 2
TOLERANCE = 1e-5


# --------------------------------------------------------------------------------------------------------
# The reference: plain torch over the exported files only.


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Half-split (NeoX) rotary embedding: pair (x[i], x[i + d/2]) turns by angles[..., i].
    `x` [L, heads, d], `angles` [L, d/2]."""
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """[L, heads, d] each → [L, heads·d], plain softmax attention."""
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[0]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
    return out.reshape(q.shape[0], -1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


class KeyeReference:
    """Keye-VL-1.5 forward from an exported directory. `mrope_section` and `merge_order` exist only so a
    test can show the comparison fails when either is wrong; the defaults are the released ones."""

    def __init__(self, directory: Path, *, mrope_section=None, merge_order: str = "p1 p2"):
        self.config = json.loads((directory / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    self.w[name] = f.get_tensor(name).float()
        text = self.config["text_config"]
        self.mrope_section = list(mrope_section or text["rope_scaling"]["mrope_section"])
        self.merge_order = merge_order

    # ---- vision -----------------------------------------------------------------------------------------
    def vision_tokens(self, frame: np.ndarray) -> torch.Tensor:
        """One image or video frame (uint8 H×W×3) → its LLM-width tokens, [H/28 · W/28, hidden]."""
        vc = self.config["vision_config"]
        w, v = self.w, "visual.vision_model."
        height, width, _ = frame.shape
        gh, gw = height // PATCH, width // PATCH
        pixels = (torch.from_numpy(frame).float() / 255 - 0.5) / 0.5
        # Raster-order 14×14 patches, channel-major: [gh·gw, 3, 14, 14].
        patches = pixels.permute(2, 0, 1).reshape(3, gh, PATCH, gw, PATCH).permute(1, 3, 0, 2, 4)
        patches = patches.reshape(gh * gw, 3, PATCH, PATCH)
        h = F.conv2d(
            patches, w[v + "embeddings.patch_embedding.weight"], w[v + "embeddings.patch_embedding.bias"]
        )
        h = h.flatten(1)
        table = w[v + "embeddings.position_embedding.weight"]
        side = round(table.shape[0] ** 0.5)
        grid = table.reshape(side, side, -1).permute(2, 0, 1)[None]
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        h = h + grid[0].permute(1, 2, 0).reshape(gh * gw, -1)

        heads = vc["num_attention_heads"]
        head_dim = vc["hidden_size"] // heads
        rope_dim = head_dim // 2  # SigLIPRotaryEmbedding(head_dim // 2): a quarter of head_dim per axis
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rope_dim, 2, dtype=torch.float) / rope_dim)
        index = torch.arange(gh * gw)
        rows, cols = (index // gw).float(), (index % gw).float()
        angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # [N, head_dim/2]

        act = ACTIVATIONS[vc["hidden_act"]]
        eps = vc["layer_norm_eps"]
        for n in range(vc["num_hidden_layers"]):
            p = f"{v}encoder.layers.{n}."
            x = F.layer_norm(h, h.shape[-1:], w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], eps)
            q, k, val = (
                F.linear(x, w[f"{p}self_attn.{s}_proj.weight"], w[f"{p}self_attn.{s}_proj.bias"]).view(
                    -1, heads, head_dim
                )
                for s in "qkv"
            )
            out = _attention(_rotate(q, angles), _rotate(k, angles), val, causal=False)
            h = h + F.linear(out, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"])
            x = F.layer_norm(h, h.shape[-1:], w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], eps)
            x = F.linear(
                act(F.linear(x, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])), w[p + "mlp.fc2.weight"]
            )
            h = h + x + w[p + "mlp.fc2.bias"]
        h = F.layer_norm(h, h.shape[-1:], w[v + "post_layernorm.weight"], w[v + "post_layernorm.bias"], eps)

        # mlp_AR: "(h p1 w p2) d -> (h w) (p1 p2 d)", then LayerNorm over the 4·hidden concatenation.
        blocks = h.reshape(gh // MERGE, MERGE, gw // MERGE, MERGE, -1)  # (h, p1, w, p2, d)
        if self.merge_order == "p1 p2":
            merged = blocks.permute(0, 2, 1, 3, 4)
        else:  # the 2×2 neighbours taken column first: only for the can-fail test
            merged = blocks.permute(0, 2, 3, 1, 4)
        merged = merged.reshape((gh // MERGE) * (gw // MERGE), -1)
        x = F.layer_norm(
            merged, merged.shape[-1:], w["mlp_AR.pre_norm.weight"], w["mlp_AR.pre_norm.bias"], 1e-5
        )
        x = F.gelu(F.linear(x, w["mlp_AR.linear_1.weight"], w["mlp_AR.linear_1.bias"]))
        return F.linear(x, w["mlp_AR.linear_2.weight"], w["mlp_AR.linear_2.bias"])

    # ---- positions --------------------------------------------------------------------------------------
    def positions(self, input_ids: list[int], grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """3-row mRoPE positions [3, L]; `grids` are the (t, h, w) patch grids of the images and video
        frames in token order."""
        pads = {self.config["image_token_id"], self.config["video_token_id"]}
        rows: list[torch.Tensor] = []
        next_free, i, remaining = 0, 0, list(grids)
        while i < len(input_ids):
            if input_ids[i] not in pads:
                rows.append(torch.full((3, 1), next_free))
                next_free += 1
                i += 1
                continue
            t, h, w = remaining.pop(0)
            lt, lh, lw = t, h // MERGE, w // MERGE
            n = lt * lh * lw
            assert input_ids[i : i + n] == [input_ids[i]] * n, "a grid's pad run is shorter than its tokens"
            tt, hh, ww = torch.meshgrid(torch.arange(lt), torch.arange(lh), torch.arange(lw), indexing="ij")
            block = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + next_free
            rows.append(block)
            next_free = int(block.max()) + 1
            i += n
        assert not remaining, "grids left without pad tokens"
        return torch.cat(rows, dim=1)

    # ---- language model ---------------------------------------------------------------------------------
    def logits(
        self, input_ids: list[int], images: list[np.ndarray], video_frames: list[np.ndarray], grids
    ) -> torch.Tensor:
        """Logits [L, vocab] of one sequence; `images` and `video_frames` raw uint8 frames in token order,
        `grids` all of their patch grids in token order (for the positions)."""
        tc, w = self.config["text_config"], self.w
        ids = torch.tensor(input_ids)
        h = w["model.embed_tokens.weight"][ids]
        for pad, frames in (
            (self.config["image_token_id"], images),
            (self.config["video_token_id"], video_frames),
        ):
            mask = ids == pad
            if frames:
                h[mask] = torch.cat([self.vision_tokens(f) for f in frames])
            else:
                assert not mask.any()

        heads, kv_heads, head_dim = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
        eps = tc["rms_norm_eps"]
        pos = self.positions(input_ids, grids).float()  # [3, L]
        inv_freq = 1.0 / tc["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
        freqs = pos[:, :, None] * inv_freq  # [3, L, head_dim/2]
        assert sum(self.mrope_section) == head_dim // 2
        row_of = torch.cat([torch.full((s,), r % 3) for r, s in enumerate(self.mrope_section)])
        angles = freqs[row_of, :, torch.arange(head_dim // 2)].T  # [L, head_dim/2]

        for n in range(tc["num_hidden_layers"]):
            p = f"model.layers.{n}."
            x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
            q = F.linear(x, w[p + "self_attn.q_proj.weight"]).view(-1, heads, head_dim)
            k = F.linear(x, w[p + "self_attn.k_proj.weight"]).view(-1, kv_heads, head_dim)
            v = F.linear(x, w[p + "self_attn.v_proj.weight"]).view(-1, kv_heads, head_dim)
            q = _rotate(_rms_norm(q, w[p + "self_attn.q_norm.weight"], eps), angles)
            k = _rotate(_rms_norm(k, w[p + "self_attn.k_norm.weight"], eps), angles)
            group = heads // kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            h = h + F.linear(_attention(q, k, v, causal=True), w[p + "self_attn.o_proj.weight"])
            x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
            gate = F.silu(F.linear(x, w[p + "mlp.gate_proj.weight"])) * F.linear(
                x, w[p + "mlp.up_proj.weight"]
            )
            h = h + F.linear(gate, w[p + "mlp.down_proj.weight"])
        h = _rms_norm(h, w["model.norm.weight"], eps)
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied configs store it once
        return F.linear(h, head)


# --------------------------------------------------------------------------------------------------------
# Fixtures: an exported tiny checkpoint and raw frames.


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random model exported in the Keye layout (fp32). Matrices are drawn with std 0.5/sqrt(fan in)
    rather than the small training init, so a wrong step anywhere (the vision tower included: its RoPE
    axes, the position-table interpolation, the merge order) moves the logits far past the tolerance while
    float32 rounding stays near 1e-6; norm weights and biases are moved off their init (ones / zeros), so
    one read from the wrong place shows too."""
    torch.manual_seed(18)
    model = KeyeForConditionalGeneration(tiny(load_tokenizer())).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.5 * param[0].numel() ** -0.5)
    root = tmp_path_factory.mktemp("keye_ref")
    model.save_pretrained(root / "ckpt")
    return export_keye(root / "ckpt", root / "keye", dtype="fp32")


def _frames():
    rng = np.random.default_rng(18)

    def frame(height, width):
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)

    image = frame(56, 84)  # 4×6 patches → 2×3 LLM tokens
    # Slow 56×56 (4 tokens), Fast 28×56 (2 tokens): each frame its own t=1 grid.
    video = [frame(56, 56), frame(28, 56), frame(28, 56), frame(56, 56)]
    frame_types = [0, 1, 1, 0]
    timestamps = [0.0, 0.5, 1.0, 1.5]
    return image, video, frame_types, timestamps


def _grid(frame: np.ndarray) -> tuple[int, int, int]:
    return (1, frame.shape[0] // PATCH, frame.shape[1] // PATCH)


def _media_sample():
    """Our processor's features for a chat with an image and a Slow/Fast video, and the raw inputs."""
    image, video, frame_types, timestamps = _frames()
    media = {
        "image": MediaPatches(patchify(image, PATCH, MERGE), [_grid(image)]),
        "video": MediaPatches(
            np.concatenate([patchify(f, PATCH, MERGE) for f in video]),
            [_grid(f) for f in video],
            frame_types=frame_types,
            timestamps=timestamps,
        ),
    }
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "img"},
                {"type": "video", "video": "vid"},
                {"type": "text", "text": "What happens in the picture and in the clip?"},
            ],
        },
        {"role": "assistant", "content": "A cat walks by."},
    ]
    features = encode_sample(messages, load_tokenizer(), lambda part: media[part["type"]])
    return features, [image], video, [_grid(image)] + [_grid(f) for f in video]


def _text_sample():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Name a prime number."}]},
        {"role": "assistant", "content": "Seven."},
    ]
    return encode_sample(messages, load_tokenizer()), [], [], []


def _ours(exported: Path, features) -> torch.Tensor:
    model = load_keye_checkpoint(exported).eval()
    with torch.no_grad():
        return model(**collate([features], pack=False)).logits[0].float()


# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", [_media_sample, _text_sample], ids=["image+slowfast-video", "text-only"])
def test_independent_keye_forward_gives_our_logits_and_positions(exported, sample):
    features, images, video, grids = sample()
    reference = KeyeReference(exported)
    ids = features.input_ids.tolist()
    assert torch.equal(reference.positions(ids, grids), features.position_ids)
    if images:  # the sample really holds both kinds of media and both kinds of frame
        config = reference.config
        assert (
            ids.count(config["image_token_id"]) == 6 and ids.count(config["video_token_id"]) == 2 * 4 + 2 * 2
        )
    with torch.no_grad():
        expected = reference.logits(ids, images, video, grids)
    got = _ours(exported, features)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    print(f"max |logit difference| = {diff:.3g}")
    assert diff < TOLERANCE, diff


def test_the_comparison_fails_with_a_wrong_mrope_split_or_merge_order(exported):
    """The reference is sensitive to the two easiest things to get wrong: a different mrope_section split
    or the 2×2 neighbours concatenated column first both move the logits far past the tolerance."""
    features, images, video, grids = _media_sample()
    ids = features.input_ids.tolist()
    got = _ours(exported, features)
    for wrong in ({"mrope_section": [3, 3, 2]}, {"merge_order": "p2 p1"}):
        with torch.no_grad():
            expected = KeyeReference(exported, **wrong).logits(ids, images, video, grids)
        assert (got - expected).abs().max().item() > 100 * TOLERANCE, wrong
