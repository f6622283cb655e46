"""Loading a checkpoint laid out like the released Kwai-Keye/Keye-VL-1.5-8B into
`KeyeForConditionalGeneration`.

Our own checkpoints are saved and loaded the Hugging Face way (`model.save_pretrained(dir)`,
`KeyeForConditionalGeneration.from_pretrained(dir)`, safetensors + our config.json); `load_keye_checkpoint`
also accepts those.

Keye-VL-1.5 state-dict names, and where each fact comes from (public sources read for this module):
- Verified from the module tree of vLLM's Keye-VL-1.5 implementation (vllm-project/vllm
  `vllm/model_executor/models/keye.py` + `keye_vl1_5.py`: `self.visual = KeyeSiglipVisionModel(...)` with
  `vision_model.embeddings/encoder/post_layernorm`, `self.mlp_AR = KeyeVL1_5Projector(...)`, the language
  model behind `hf_to_vllm_mapper` {"model." → "language_model.model.", "lm_head." →
  "language_model.lm_head."}) and SGLang's `keye_vl_1_5.py` (`self.visual`, `self.mlp_AR`,
  `self.model = Qwen3Model`, `self.lm_head`):
    visual.vision_model.embeddings.patch_embedding.{weight,bias}     Conv2d(3, 1152, 14, stride 14)
    visual.vision_model.embeddings.position_embedding.weight         Embedding(num_positions, 1152)
    visual.vision_model.embeddings.packing_position_embedding.weight Embedding(32768, 1152)
    visual.vision_model.encoder.layers.{i}.layer_norm1/layer_norm2.{weight,bias}
    visual.vision_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
        (separate q/k/v in the file: vLLM's loader stacks `q_proj`/`k_proj`/`v_proj` into its `qkv_proj`)
    visual.vision_model.encoder.layers.{i}.mlp.{fc1,fc2}.{weight,bias}   (SiglipMLP)
    visual.vision_model.post_layernorm.{weight,bias}
    mlp_AR.pre_norm.{weight,bias}   LayerNorm(4·1152) after the 2×2 concat (1.5; the Preview normed before)
    mlp_AR.linear_1.{weight,bias}   4608 → 4608;   mlp_AR.linear_2.{weight,bias}   4608 → LLM hidden
    model.embed_tokens.weight, model.layers.{i}.* (Qwen3 names), model.norm.weight, lm_head.weight
- Verified as skipped by those loaders, so dropped here: `visual.vision_model.head.*` (SigLIP's pooling head,
  unused by a VLM) and `...packing_position_embedding.weight` (Keye-VL-1.5 runs the ViT with
  `interpolate_pos_encoding=True`, which adds the interpolated `position_embedding` instead; a public Keye
  conversion script fills it with zeros), plus any `rotary_emb.inv_freq` under any prefix
  (`model.rotary_emb.inv_freq`, `model.layers.3.self_attn.rotary_emb.inv_freq`): a buffer computed from the
  config, never a weight.
- Assumed (not seen in a released file): the config.json field names. We read the Qwen2-VL-style layout the
  vLLM/SGLang code reads (`config.vision_config.{hidden_size, intermediate_size, num_hidden_layers,
  num_attention_heads, patch_size, spatial_merge_size, image_size, layer_norm_eps,
  hidden_act}`, LLM fields flat at the top or in `text_config`, `rope_scaling.mrope_section`,
  `image_token_id`, `video_token_id`). An absent `vision_config.image_size` takes `SiglipVisionConfig`'s
  default, 224 (16×16 = 256 position embeddings at patch 14), as transformers would; the released 8B's ViT
  is the SigLIP-so400m-patch14-384 grid (27×27 = 729), so its config must say 384.
- `rope_scaling` (or transformers 5's `rope_parameters`): its `type`/`rope_type` must be one we implement:
  absent, `default`, or `mrope` (Qwen2-VL's name for default frequencies split by `mrope_section`;
  transformers rewrites it to `default`). Any other type (linear, dynamic, yarn, …) changes the rotary
  frequencies, which our mRoPE does not do, so it is refused with a ValueError rather than silently ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen3Config

from keyeflow.model.config import KeyeConfig, KeyeVisionConfig
from keyeflow.model.modeling import KeyeForConditionalGeneration

KEYE_VISION_PREFIX = "visual.vision_model."
# One table, both directions: (Keye name, our name), with {placeholders} that match the same text on both
# sides. The loader reads it Keye → ours, `keyeflow.model.export` ours → Keye; first match wins.
NAME_PAIRS: tuple[tuple[str, str], ...] = (
    (KEYE_VISION_PREFIX + "embeddings.patch_embedding.{wb}", "vision.patch_embed.{wb}"),
    (KEYE_VISION_PREFIX + "embeddings.position_embedding.weight", "vision.pos_embed.weight"),
    (KEYE_VISION_PREFIX + "encoder.layers.{i}.layer_norm1.{wb}", "vision.layers.{i}.norm1.{wb}"),
    (KEYE_VISION_PREFIX + "encoder.layers.{i}.layer_norm2.{wb}", "vision.layers.{i}.norm2.{wb}"),
    (
        KEYE_VISION_PREFIX + "encoder.layers.{i}.self_attn.{qkvo}_proj.{wb}",
        "vision.layers.{i}.attn.{qkvo}_proj.{wb}",
    ),
    (KEYE_VISION_PREFIX + "encoder.layers.{i}.mlp.{fc}.{wb}", "vision.layers.{i}.mlp.{fc}.{wb}"),
    (KEYE_VISION_PREFIX + "post_layernorm.{wb}", "vision.post_norm.{wb}"),
    ("mlp_AR.pre_norm.{wb}", "projector.norm.{wb}"),
    ("mlp_AR.linear_1.{wb}", "projector.fc1.{wb}"),
    ("mlp_AR.linear_2.{wb}", "projector.fc2.{wb}"),
    ("model.{rest}", "language_model.{rest}"),
    ("lm_head.weight", "lm_head.weight"),
)
_PLACEHOLDERS = {"wb": "weight|bias", "i": r"\d+", "qkvo": "q|k|v|out", "fc": "fc1|fc2", "rest": ".+"}


def _direction(pairs: tuple[tuple[str, str], ...], source: int) -> tuple[tuple[re.Pattern, str], ...]:
    """(pattern over side `source`'s names, template of the other side's name) for every pair."""
    out = []
    for pair in pairs:
        pattern = re.sub(
            r"\\\{(\w+)\\\}", lambda m: f"(?P<{m[1]}>{_PLACEHOLDERS[m[1]]})", re.escape(pair[source])
        )
        template = re.sub(r"\{(\w+)\}", r"\\g<\1>", pair[1 - source])
        out.append((re.compile(pattern + "$"), template))
    return tuple(out)


KEYE_TO_OURS = _direction(NAME_PAIRS, 0)
OURS_TO_KEYE = _direction(NAME_PAIRS, 1)
DROPPED_KEYS = tuple(
    re.compile(p)
    for p in (
        re.escape(KEYE_VISION_PREFIX) + r"embeddings\.packing_position_embedding\.weight$",
        re.escape(KEYE_VISION_PREFIX) + r"head\.",
        # Under any prefix: `re.match` anchors at the start, so the pattern says "anything, then".
        r"(?:.*\.)?rotary_emb\.inv_freq$",
    )
)
# SiglipVisionConfig's default `image_size` (transformers), used when a config.json leaves it out.
SIGLIP_DEFAULT_IMAGE_SIZE = 224
# RoPE types whose frequencies are the plain `theta ** (-2i/d)` ones our mRoPE computes.
IMPLEMENTED_ROPE_TYPES = ("default", "mrope")


def keye_key_to_ours(name: str) -> str | None:
    """Our parameter name for a Keye-VL-1.5 state-dict key; None for keys we drop; ValueError if unknown."""
    if any(p.match(name) for p in DROPPED_KEYS):
        return None
    for pattern, template in KEYE_TO_OURS:
        if pattern.match(name):
            return pattern.sub(template, name)
    raise ValueError(f"unknown Keye checkpoint key {name!r}")


def config_from_keye(raw: dict) -> KeyeConfig:
    """Our config from a Keye-VL-1.5-style config.json (see the module docstring for what is assumed)."""
    vc = raw["vision_config"]
    patch = int(vc.get("patch_size", 14))
    image_size = int(vc.get("image_size", SIGLIP_DEFAULT_IMAGE_SIZE))
    vision = KeyeVisionConfig(
        hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
        num_hidden_layers=vc["num_hidden_layers"], num_attention_heads=vc["num_attention_heads"],
        num_channels=vc.get("num_channels", 3), patch_size=patch,
        spatial_merge_size=vc.get("spatial_merge_size", 2),
        num_position_embeddings=(image_size // patch) ** 2,
        hidden_act=vc.get("hidden_act", "gelu_pytorch_tanh"), layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
    )  # fmt: skip
    tc = raw.get("text_config") or raw
    rope = tc.get("rope_scaling") or tc.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in IMPLEMENTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not implemented (only {', '.join(IMPLEMENTED_ROPE_TYPES)}: "
            "plain RoPE frequencies split by mrope_section); loading it would silently change the positions"
        )
    theta = tc.get("rope_theta", rope.get("rope_theta", 1e6))
    text = Qwen3Config(
        vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"], intermediate_size=tc["intermediate_size"],
        num_hidden_layers=tc["num_hidden_layers"], num_attention_heads=tc["num_attention_heads"],
        num_key_value_heads=tc.get("num_key_value_heads", tc["num_attention_heads"]),
        head_dim=tc.get("head_dim", tc["hidden_size"] // tc["num_attention_heads"]),
        rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
        max_position_embeddings=tc.get("max_position_embeddings", 40960),
        tie_word_embeddings=raw.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)),
        rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
    )  # fmt: skip
    ids = {k: raw[k]
           for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if k in raw}  # fmt: skip
    return KeyeConfig(
        vision_config=vision, text_config=text, mrope_section=rope.get("mrope_section", [16, 24, 24]),
        tie_word_embeddings=text.tie_word_embeddings, **ids,
    )  # fmt: skip


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(path / shard)))
        return state
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json under {path}")
    return load_file(str(single))


def is_our_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds one of our checkpoints (`save_pretrained`), not the Keye-VL-1.5 layout."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} is not a local directory")
    return json.loads((path / "config.json").read_text()).get("model_type") == KeyeConfig.model_type


def checkpoint_config(path: str | Path) -> KeyeConfig:
    """The model config of a checkpoint directory, ours or in the Keye-VL-1.5 layout (no weights read)."""
    path = Path(path)
    if is_our_checkpoint(path):
        return KeyeConfig.from_pretrained(str(path))
    return config_from_keye(json.loads((path / "config.json").read_text()))


def load_keye_checkpoint(
    path: str | Path, config: KeyeConfig | None = None, *, dtype: torch.dtype | None = None
) -> KeyeForConditionalGeneration:
    """A model with the weights of a Keye-VL-1.5-layout checkpoint directory (safetensors + config.json), or
    of one of ours (`save_pretrained`). Strict: every parameter must be filled and every key understood. The
    model is built on the meta device and takes the loaded tensors as they are (no second copy; `dtype`
    converts)."""
    path = Path(path)
    ours = is_our_checkpoint(path)
    config = config if config is not None else checkpoint_config(path)
    translate = str if ours else keye_key_to_ours  # our own layout: names unchanged

    state: dict[str, torch.Tensor] = {}
    for name, tensor in _read_state_dict(path).items():
        ours = translate(name)
        if ours is None:
            continue
        if ours == "vision.patch_embed.weight" and tensor.ndim == 4:
            # Conv2d weight [out, c, p, p] → Linear over channel-major (c, y, x) patch values: the same map.
            tensor = tensor.reshape(tensor.shape[0], -1)
        state[ours] = tensor.to(dtype) if dtype is not None else tensor

    with torch.device("meta"):
        model = KeyeForConditionalGeneration(config)
    expected = set(model.state_dict())
    if config.text_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if config.text_config.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    return model.eval()
