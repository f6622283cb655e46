"""Configuration of the Keye-style vision-language model, and its two recipes: `tiny()` and `keye_8b()`.

`KeyeConfig` is a transformers config (saved as `config.json` by `save_pretrained`) made of:
- `vision_config` (`KeyeVisionConfig`): the SigLIP-style ViT run at native resolution (SPEC §1): patch 14,
  learnable absolute position embeddings on a square grid (bilinearly interpolated to each image/frame's
  grid), 2D RoPE in attention, a 2×2 spatial merge before the projector;
- `text_config` (`transformers.Qwen3Config`): the LLM. Its `rope_parameters["rope_theta"]` is the one place
  the RoPE base lives (`KeyeConfig.rope_theta` reads and writes it; SPEC: 1e6, 8e6 from pre-training stage 3);
- projector size, the vision token ids, and `mrope_section` (how the LLM's rotary frequencies are split
  between the temporal, height and width position streams; its sum is half the LLM head dim);
- `attention`: how the LLM keeps packed samples apart, "packed" (per-sample segments, no `[L, L]` tensor; the
  default) or "mask" (the dense `[B, 1, L, L]` additive mask, kept to compare against); see `modeling`.

Sizes of `keye_8b()` (SPEC §1): SigLIP-400M (27 layers, hidden 1152, MLP 4304, 16 heads, 27×27 = 729 position
embeddings, the `siglip-so400m-patch14-384` grid Keye started from) and Qwen3-8B (36 layers, hidden 4096,
MLP 12288, 32/8 heads, head_dim 128, QK-norm, vocab 151936, theta 1e6); projector 4608 → 4608 → 4096 as in the
released Keye-VL-1.5 (`mlp_AR.linear_1` is 4·1152 wide, vLLM `keye_vl1_5.py`).
"""

from __future__ import annotations

import math
from typing import ClassVar

from transformers import PreTrainedConfig, PreTrainedTokenizerBase, Qwen3Config

from keyeflow.model.token_stream import vision_token_ids
from keyeflow.model.tokenizer import load_tokenizer

# Qwen2-VL / Qwen3 vocabulary ids of the vision tokens (transformers' Qwen2-VL and Qwen3-VL config defaults),
# used by `keye_8b()` when no tokenizer is given.
QWEN_VISION_START_ID, QWEN_VISION_END_ID, QWEN_IMAGE_PAD_ID, QWEN_VIDEO_PAD_ID = (
    151652,
    151653,
    151655,
    151656,
)

ATTENTION_PATHS = ("packed", "mask")
# Activation checkpointing modes of the model's layer loops (`modeling.checkpointed_layers`); chosen per stage
# by the training configs.
ACTIVATION_CHECKPOINTING = ("full", "selective", "off")


class KeyeVisionConfig(PreTrainedConfig):
    """The ViT. `num_position_embeddings` must be a square (a side×side grid, interpolated per resolution);
    the head dim (hidden / heads) must be divisible by 4 (2D RoPE gives half the rotary pairs to rows, half to
    columns)."""

    model_type = "keyeflow_keye_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    num_position_embeddings: int = 729
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "patch_size",
            "spatial_merge_size",
            "num_position_embeddings",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"vision_config.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(f"vision head dim must be divisible by 4 for 2D RoPE, got {self.head_dim}")
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(
                "num_position_embeddings must be a square (a side×side grid), "
                f"got {self.num_position_embeddings}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Values in one input patch: channels × patch × patch (588 for RGB 14×14)."""
        return self.num_channels * self.patch_size * self.patch_size

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


class KeyeConfig(PreTrainedConfig):
    """ViT → projector → Qwen3 LLM. `projector_hidden_size` None means 4 × vision hidden (Keye-VL-1.5)."""

    model_type = "keyeflow_keye"
    sub_configs_defaults: ClassVar[dict] = {"vision_config": KeyeVisionConfig, "text_config": Qwen3Config}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_hidden_size: int | None = None
    image_token_id: int = QWEN_IMAGE_PAD_ID
    video_token_id: int = QWEN_VIDEO_PAD_ID
    vision_start_token_id: int = QWEN_VISION_START_ID
    vision_end_token_id: int = QWEN_VISION_END_ID
    mrope_section: list[int] | tuple[int, ...] = (16, 24, 24)
    attention: str = "packed"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {self.attention!r}")
        text = self.text_config
        merge = self.vision_config.spatial_merge_size
        if self.projector_hidden_size is None:
            self.projector_hidden_size = self.vision_config.hidden_size * merge * merge
        if self.projector_hidden_size < 1:
            raise ValueError(f"projector_hidden_size must be >= 1, got {self.projector_hidden_size}")
        self.mrope_section = [int(s) for s in self.mrope_section]
        if len(self.mrope_section) != 3 or min(self.mrope_section) < 1:
            raise ValueError(f"mrope_section needs 3 positive sizes (t, h, w), got {self.mrope_section}")
        if sum(self.mrope_section) != text.head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to half the LLM head dim ({text.head_dim // 2})"
            )
        rope = text.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"only the default RoPE type is implemented for mRoPE, got {rope.get('rope_type')}"
            )
        if getattr(text, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported (Qwen3-8B does not use it)")
        ids = {
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }
        for name, value in ids.items():
            if not 0 <= int(value) < text.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary (size {text.vocab_size})")
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"vision token ids must be distinct, got {ids}")

    @property
    def rope_theta(self) -> float:
        return float(self.text_config.rope_parameters["rope_theta"])

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        # The model reads the theta at every forward, so a stage can change it on a loaded model (SPEC: 8e6 in
        # pre-training stage 3).
        if not value > 0:
            raise ValueError(f"rope_theta must be > 0, got {value}")
        self.text_config.rope_parameters = {**self.text_config.rope_parameters, "rope_theta": float(value)}

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        return self.text_config


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    ids = vision_token_ids(tokenizer)
    return {
        "image_token_id": ids.image_pad,
        "video_token_id": ids.video_pad,
        "vision_start_token_id": ids.vision_start,
        "vision_end_token_id": ids.vision_end,
    }


def tiny(tokenizer: PreTrainedTokenizerBase | None = None) -> KeyeConfig:
    """A model that trains in seconds on a CPU: ViT 2 layers × 64, LLM 2 layers × 64 (4 query / 2 KV heads of
    16), vocabulary of the shipped tokenizer (4096) unless `tokenizer` is given. mrope_section is [16, 24, 24]
    scaled to head_dim 16: [2, 3, 3]."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    vision = KeyeVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_position_embeddings=16,  # a 4×4 grid, interpolated up or down to every image
    )  # fmt: skip
    text = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return KeyeConfig(
        vision_config=vision, text_config=text, mrope_section=[2, 3, 3], **_token_ids(tokenizer)
    )


def keye_8b(tokenizer: PreTrainedTokenizerBase | None = None) -> KeyeConfig:
    """SPEC §1 sizes (about 8.7B parameters: ViT 0.41B, projector 0.04B, Qwen3-8B 8.19B). Token ids come from
    `tokenizer` (a Keye-VL-1.5 / Qwen3 tokenizer) or default to Qwen's ids."""
    vision = KeyeVisionConfig()  # the defaults are SigLIP-400M
    text = Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
    )  # fmt: skip
    ids = _token_ids(tokenizer) if tokenizer is not None else {}
    return KeyeConfig(vision_config=vision, text_config=text, mrope_section=[16, 24, 24], **ids)
