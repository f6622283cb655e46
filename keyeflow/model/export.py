"""Export a keyeflow checkpoint in the Keye-VL-1.5 Hugging Face layout: what Keye's own transformers code,
vLLM (`KeyeVL1_5ForConditionalGeneration`) and SGLang load, what RL weight sync hands a serving engine, and
what a user serves.

    export_keye(checkpoint, out_dir, dtype="bf16")   # or: keyeflow export CHECKPOINT OUT_DIR --dtype bf16

What is written, and where each name comes from (the state-dict names are `keyeflow.model.checkpoint`'s,
read from vLLM's and SGLang's Keye-VL-1.5 modules; the inverse of its loader):
- `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json`
  (`metadata.total_size`, `weight_map`) when the weights pass `max_shard_bytes` (5 GB, as the hub's files):
  `visual.vision_model.*` (the patch embedding back as a Conv2d weight `[out, 3, 14, 14]`), `mlp_AR.*`,
  `model.*` (Qwen3 names), `lm_head.weight`. The packing position table
  (`visual.vision_model.embeddings.packing_position_embedding.weight`, `[32768, hidden]`) is written as
  zeros: the released layout carries it, Keye-VL-1.5 never reads it (the ViT adds the interpolated
  `position_embedding`), and vLLM's and SGLang's loaders skip it; ours drops it.
- `config.json`: `architectures: ["KeyeVL1_5ForConditionalGeneration"]`, `model_type: "KeyeVL1_5"` (as in
  the transformers port of 1.5; the released file's own value is not known here), `vision_config` with
  SigLIP's field names, `text_config` with Qwen3's, repeated flat at the top (readers of Keye-VL-Preview
  and vLLM read the language fields there), `rope_scaling: {"type": "mrope", "mrope_section": [...]}`,
  `rope_theta`, the vision token ids, `torch_dtype`.
- The tokenizer files with the Keye special tokens and the chat template (`tokenizer.save_pretrained`: the
  checkpoint's own tokenizer if it has one, else the shipped one).
- `preprocessor_config.json`: the image processor's fields (`min_pixels`/`max_pixels` from the image token
  range, patch 14, merge 2, temporal patch 1, SigLIP mean/std 0.5, bilinear resampling).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from keyeflow.model.checkpoint import KEYE_VISION_PREFIX, OURS_TO_KEYE, load_keye_checkpoint
from keyeflow.model.config import KeyeConfig
from keyeflow.model.modeling import PIXEL_MEAN, PIXEL_STD
from keyeflow.model.tokenizer import checkpoint_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
# The released ViT's packing position table: rows = the longest packed patch sequence it was built for.
PACKING_POSITIONS = 32768
# keye-vl-utils' token range for an image (one LLM token per 28×28 area), as the image processor's pixels.
MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS = 4, 20_480


def our_key_to_keye(name: str) -> str:
    """The Keye-VL-1.5 state-dict name of one of our parameters; ValueError if it has none."""
    for pattern, template in OURS_TO_KEYE:
        if pattern.match(name):
            return pattern.sub(template, name)
    raise ValueError(f"no Keye-VL-1.5 name for parameter {name!r}")


def keye_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our model's weights under the released names, in `dtype`, contiguous (what safetensors stores)."""
    config: KeyeConfig = model.config
    vc = config.vision_config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.text_config.tie_word_embeddings:
            continue  # tied: the file holds the embedding once, as the released tied configs do
        if name == "vision.patch_embed.weight":
            # Linear over channel-major (c, y, x) patch values → the Conv2d weight the released ViT holds.
            tensor = tensor.reshape(tensor.shape[0], vc.num_channels, vc.patch_size, vc.patch_size)
        out[our_key_to_keye(name)] = tensor.detach().to(dtype).contiguous()
    out[KEYE_VISION_PREFIX + "embeddings.packing_position_embedding.weight"] = torch.zeros(
        PACKING_POSITIONS, vc.hidden_size, dtype=dtype
    )
    return out


def keye_config_dict(config: KeyeConfig, dtype: str) -> dict:
    vc, tc = config.vision_config, config.text_config
    merged = vc.hidden_size * vc.spatial_merge_size**2
    if config.projector_hidden_size != merged:
        raise ValueError(
            f"projector_hidden_size={config.projector_hidden_size}: Keye-VL-1.5's projector is "
            f"{merged} wide (4 x vision hidden) and its config.json has no field for another width"
        )
    rope = tc.rope_parameters or {}
    text = {
        "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads, "head_dim": tc.head_dim, "hidden_act": tc.hidden_act,
        "max_position_embeddings": tc.max_position_embeddings, "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": float(rope.get("rope_theta", 1e6)), "attention_bias": bool(tc.attention_bias),
        "tie_word_embeddings": bool(tc.tie_word_embeddings),
        "rope_scaling": {"type": "mrope", "mrope_section": list(config.mrope_section)},
    }  # fmt: skip
    vision = {
        "hidden_size": vc.hidden_size, "intermediate_size": vc.intermediate_size,
        "num_hidden_layers": vc.num_hidden_layers, "num_attention_heads": vc.num_attention_heads,
        "num_channels": vc.num_channels, "patch_size": vc.patch_size,
        "image_size": vc.position_grid_side * vc.patch_size,
        "hidden_act": vc.hidden_act, "layer_norm_eps": vc.layer_norm_eps,
        "spatial_merge_size": vc.spatial_merge_size,
    }  # fmt: skip
    ids = {
        k: getattr(config, k)
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    return {
        "architectures": ["KeyeVL1_5ForConditionalGeneration"],
        "model_type": "KeyeVL1_5",
        **text,
        "text_config": text,
        "vision_config": vision,
        **ids,
        "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
    }


def preprocessor_config(config: KeyeConfig) -> dict:
    vc = config.vision_config
    side = vc.patch_size * vc.spatial_merge_size  # one LLM token per side × side area
    return {
        "image_processor_type": "KeyeVL1_5ImageProcessor",
        "processor_class": "KeyeVL1_5Processor",
        "do_resize": True, "resample": 2,  # PIL's BILINEAR
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [PIXEL_MEAN] * 3, "image_std": [PIXEL_STD] * 3,
        "do_convert_rgb": True,
        "min_pixels": MIN_IMAGE_TOKENS * side * side, "max_pixels": MAX_IMAGE_TOKENS * side * side,
        "patch_size": vc.patch_size, "temporal_patch_size": 1, "merge_size": vc.spatial_merge_size,
    }  # fmt: skip


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in name order, a new shard whenever the next would pass `max_bytes` (one bigger tensor is a
    shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    return shards


def export_keye(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `checkpoint` (ours, or already in Keye's layout) to `out_dir` in the Keye-VL-1.5 layout (module
    docstring). `out_dir` must be empty or absent: an export never mixes with older files."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {sorted(DTYPES)}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be >= 1")
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {out} is not empty")
    return export_model(
        load_keye_checkpoint(checkpoint), checkpoint_tokenizer(checkpoint), out, dtype=dtype,
        max_shard_bytes=max_shard_bytes,
    )  # fmt: skip


def export_model(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """`export_keye` of a model in memory (RL weight sync writes the policy being trained, with no checkpoint
    in between); `out_dir` must be empty or absent."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {sorted(DTYPES)}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be >= 1")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)

    state = keye_state_dict(model, DTYPES[dtype])
    shards = _shards(state, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(keye_config_dict(model.config, dtype), indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(model.config), indent=2) + "\n"
    )
    tokenizer.save_pretrained(str(out))
    return out
