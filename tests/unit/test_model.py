"""The Keye-style model at tiny size: mixed image/Slow-Fast video/text batches, per-grid vision attention, 3D
RoPE positions, packing, save/load, the 8B parameter count, and loading a Keye-VL-1.5-layout checkpoint."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from keyeflow.datasets.pretokenize import patchify, unpatchify
from keyeflow.model.checkpoint import config_from_keye, keye_key_to_ours, load_keye_checkpoint
from keyeflow.model.config import KeyeConfig, keye_8b, tiny
from keyeflow.model.modeling import (
    KeyeForConditionalGeneration,
    count_parameters,
    mrope_position_ids,
    patch_rows_cols,
)
from keyeflow.model.processor import (
    MediaPatches,
    collate,
    encode_sample,
    merge_to_raster_order,
    raster_to_merge_order,
)
from keyeflow.model.token_stream import vision_token_ids
from keyeflow.model.tokenizer import load_tokenizer

PATCH, MERGE = 14, 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def config(tokenizer) -> KeyeConfig:
    return tiny(tokenizer)


def make_model(config: KeyeConfig, seed: int = 0) -> KeyeForConditionalGeneration:
    torch.manual_seed(seed)
    return KeyeForConditionalGeneration(config)


def frame(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_media(height: int, width: int, seed: int) -> MediaPatches:
    return MediaPatches(
        patchify(frame(height, width, seed), PATCH, MERGE), [(1, height // PATCH, width // PATCH)]
    )


def video_media(seed: int) -> MediaPatches:
    """Slow, Fast, Slow, Fast: Slow frames 56×56 (4×4 patches, 4 tokens), Fast frames 28×56 (2×4, 2
    tokens)."""
    types = [0, 1, 0, 1]
    sizes = [(56, 56) if t == 0 else (28, 56) for t in types]
    patches = np.concatenate(
        [patchify(frame(h, w, seed + i), PATCH, MERGE) for i, (h, w) in enumerate(sizes)]
    )
    grids = [(1, h // PATCH, w // PATCH) for h, w in sizes]
    return MediaPatches(patches, grids, frame_types=types, timestamps=[0.0, 0.5, 1.0, 1.5], slow_tokens=4,
                        fast_tokens=2)  # fmt: skip


def lookup(part):
    return part["media"]


def chat(media: MediaPatches, question: str, answer: str) -> list[dict]:
    kind = media.kind
    return [
        {
            "role": "user",
            "content": [{"type": kind, kind: "x", "media": media}, {"type": "text", "text": question}],
        },
        {"role": "assistant", "content": answer},
    ]


@pytest.fixture(scope="module")
def samples(tokenizer):
    image = encode_sample(
        chat(image_media(56, 84, 1), "What is shown?", "A noisy picture."), tokenizer, lookup
    )
    video = encode_sample(chat(video_media(10), "What happens?", "Frames change."), tokenizer, lookup)
    text = encode_sample("Plain text for the language model.", tokenizer)
    return image, video, text


def test_forward_backward_and_loss_decreases_on_mixed_batch(config, samples):
    video = samples[1]
    assert video.grid_thw.tolist() == [[1, 4, 4], [1, 2, 4], [1, 4, 4], [1, 2, 4]]
    batch = collate(samples, pack=False)
    model = make_model(config).train()
    out = model(**batch)
    assert out.logits.shape == (3, batch["input_ids"].shape[1], config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # the ViT and projector train too

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_vision_features_of_a_frame_do_not_depend_on_other_frames(config):
    model = make_model(config).eval()
    a, b, c = image_media(56, 56, 1), image_media(28, 84, 2), image_media(56, 56, 3)
    b_changed = image_media(28, 84, 99)

    def run(*media):
        pixels = torch.cat([torch.from_numpy(m.patches) for m in media])
        grids = torch.tensor([g for m in media for g in m.grids])
        with torch.no_grad():
            return model.vision(pixels, grids), model.get_vision_embeddings(pixels, grids)

    (packed, packed_llm), (alone_a, alone_a_llm) = run(a, b, c), run(a)
    (other_b, _), (alone_c, _) = run(a, b_changed, c), run(c)
    assert torch.allclose(packed[:16], alone_a, atol=1e-6)
    assert torch.allclose(packed_llm[:4], alone_a_llm, atol=1e-6)
    assert torch.allclose(packed[16 + 12 :], alone_c, atol=1e-6)
    assert torch.allclose(other_b[:16], packed[:16], atol=1e-6)  # changing frame b leaves a untouched
    assert not torch.allclose(other_b[16:28], packed[16:28])


def test_patch_positions_follow_the_pretokeniser_layout():
    h, w = 4, 6
    picture = np.zeros((h * PATCH, w * PATCH, 3), dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            picture[y * PATCH : (y + 1) * PATCH, x * PATCH : (x + 1) * PATCH] = (y, x, 0)
    # Channel-major rows: value 0 is in channel 0 (the patch row), value 14·14 in channel 1 (the column).
    patches = patchify(picture, PATCH, MERGE)
    rows, cols = patch_rows_cols(h, w, MERGE)
    assert rows.tolist() == patches[:, 0].tolist()
    assert cols.tolist() == patches[:, PATCH * PATCH].tolist()
    assert rows[:4].tolist() == [0, 0, 1, 1] and cols[:4].tolist() == [0, 1, 0, 1]  # one 2×2 group first


def test_mrope_positions_literal():
    T, P, V = 7, 100, 200  # text, image pad, video pad
    ids = [T, T, T, P, P, P, P, P, P, T, T]
    positions = mrope_position_ids(ids, [(1, 4, 6)], image_token_id=P, video_token_id=V, spatial_merge_size=2)
    assert positions.tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],
    ]
    # Two frames, each its own t=1 grid of 2×2 tokens: the second frame's temporal index is later.
    ids = [T, T, V, V, V, V, T, V, V, V, V, T]
    positions = mrope_position_ids(
        ids, [(1, 4, 4)] * 2, image_token_id=P, video_token_id=V, spatial_merge_size=2
    )
    assert positions.tolist() == [
        [0, 1, 2, 2, 2, 2, 4, 5, 5, 5, 5, 7],
        [0, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7],
        [0, 1, 2, 3, 2, 3, 4, 5, 6, 5, 6, 7],
    ]
    with pytest.raises(ValueError, match="vision pad tokens"):
        mrope_position_ids(ids, [(1, 4, 4)], image_token_id=P, video_token_id=V, spatial_merge_size=2)


def test_model_positions_equal_the_processor_positions(config, samples):
    batch = collate(samples, pack=True)
    model = make_model(config)
    computed = model.position_ids_for(batch["input_ids"], batch["grid_thw"], batch["sample_index"])
    assert torch.equal(computed, batch["position_ids"])


def test_packed_row_gives_the_same_loss_as_separate_samples(config, samples):
    image, video, _ = samples
    model = make_model(config).eval()
    packed, separate = collate([image, video], pack=True), collate([image, video], pack=False)
    assert packed["input_ids"].shape[0] == 1 and separate["input_ids"].shape[0] == 2
    with torch.no_grad():
        out_packed, out_separate = model(**packed), model(**separate)
    assert abs(out_packed.loss.item() - out_separate.loss.item()) < 1e-5
    n = len(image)
    assert torch.allclose(out_packed.logits[0, :n], out_separate.logits[0, :n], atol=1e-5)
    assert torch.allclose(
        out_packed.logits[0, n : n + len(video)], out_separate.logits[1, : len(video)], atol=1e-5
    )


def test_on_text_the_model_is_qwen3(config, samples):
    """Text tokens advance the three position streams together: mRoPE reduces to Qwen3's own RoPE."""
    from transformers import Qwen3ForCausalLM

    model = make_model(config).eval()
    qwen = Qwen3ForCausalLM(config.text_config).eval()
    state = {k.replace("language_model.", "model.", 1): v for k, v in model.state_dict().items()}
    qwen.load_state_dict({k: v for k, v in state.items() if k.startswith(("model.", "lm_head."))})
    ids = samples[2].input_ids[None]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, qwen(ids).logits, atol=1e-5)


def test_save_pretrained_round_trip(config, samples, tmp_path):
    batch = collate(samples, pack=True)
    model = make_model(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = KeyeForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.mrope_section == config.mrope_section
    assert loaded.config.image_token_id == config.image_token_id
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_keye_8b_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = KeyeForConditionalGeneration(keye_8b())
    counts = count_parameters(model)
    print("keye_8b parameters:", {k: f"{v / 1e9:.3f}B" for k, v in counts.items()})
    assert 8.0e9 < counts["total"] < 9.0e9
    assert 0.40e9 < counts["vision"] < 0.42e9  # SigLIP-400M without its pooling head
    assert counts["language_model"] + counts["lm_head"] == pytest.approx(8.19e9, rel=0.01)  # Qwen3-8B


def test_rope_theta_change_applies_to_a_loaded_model(tokenizer, samples):
    batch = collate(samples[:1], pack=False)
    model = make_model(tiny(tokenizer)).eval()  # its own config: the change must not leak into other tests
    with torch.no_grad():
        before = model(**batch).logits
        model.config.rope_theta = 8e6  # SPEC: pre-training stage 3
        after = model(**batch).logits
    assert model.config.text_config.rope_parameters["rope_theta"] == 8e6
    assert not torch.allclose(before, after)


# ---------------------------------------------------------------------------------------------- Keye layout


def keye_state_dict(model: KeyeForConditionalGeneration, config: KeyeConfig) -> dict[str, torch.Tensor]:
    """The released Keye-VL-1.5 names, written out literally (not through the loader's table)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    v = "visual.vision_model."
    out = {
        v + "embeddings.patch_embedding.weight": sd["vision.patch_embed.weight"].reshape(-1, 3, PATCH, PATCH),
        v + "embeddings.patch_embedding.bias": sd["vision.patch_embed.bias"],
        v + "embeddings.position_embedding.weight": sd["vision.pos_embed.weight"],
        v + "embeddings.packing_position_embedding.weight": torch.zeros(64, config.vision_config.hidden_size),
        v + "head.probe": torch.zeros(1, 1, config.vision_config.hidden_size),
        v + "head.attention.in_proj_weight": torch.zeros(3 * config.vision_config.hidden_size, 4),
        v + "post_layernorm.weight": sd["vision.post_norm.weight"],
        v + "post_layernorm.bias": sd["vision.post_norm.bias"],
        "mlp_AR.pre_norm.weight": sd["projector.norm.weight"],
        "mlp_AR.pre_norm.bias": sd["projector.norm.bias"],
        "mlp_AR.linear_1.weight": sd["projector.fc1.weight"],
        "mlp_AR.linear_1.bias": sd["projector.fc1.bias"],
        "mlp_AR.linear_2.weight": sd["projector.fc2.weight"],
        "mlp_AR.linear_2.bias": sd["projector.fc2.bias"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(config.vision_config.num_hidden_layers):
        ours, theirs = f"vision.layers.{i}.", f"{v}encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[f"{theirs}layer_norm1.{p}"] = sd[f"{ours}norm1.{p}"]
            out[f"{theirs}layer_norm2.{p}"] = sd[f"{ours}norm2.{p}"]
            for proj in ("q", "k", "v", "out"):
                out[f"{theirs}self_attn.{proj}_proj.{p}"] = sd[f"{ours}attn.{proj}_proj.{p}"]
            for fc in ("fc1", "fc2"):
                out[f"{theirs}mlp.{fc}.{p}"] = sd[f"{ours}mlp.{fc}.{p}"]
    for name, tensor in sd.items():
        if name.startswith("language_model."):
            out["model." + name.removeprefix("language_model.")] = tensor
    return {k: t.contiguous() for k, t in out.items()}


def keye_config_json(config: KeyeConfig) -> dict:
    vc, tc = config.vision_config, config.text_config
    return {
        "architectures": ["KeyeVL1_5ForConditionalGeneration"], "model_type": "KeyeVL1_5",
        "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size, "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": tc.head_dim, "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False, "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id, "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_config": {
            "hidden_size": vc.hidden_size, "intermediate_size": vc.intermediate_size,
            "num_hidden_layers": vc.num_hidden_layers, "num_attention_heads": vc.num_attention_heads,
            "patch_size": PATCH, "image_size": PATCH * 4, "spatial_merge_size": MERGE,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        },
    }  # fmt: skip


def test_keye_layout_checkpoint_loads_with_identical_logits(config, samples, tmp_path):
    source = make_model(config, seed=3).eval()
    state = keye_state_dict(source, config)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(keye_config_json(config)))

    loaded = load_keye_checkpoint(tmp_path)
    assert loaded.config.vision_config.num_position_embeddings == 16
    assert loaded.config.mrope_section == [2, 3, 3]
    batch = collate(samples, pack=True)
    with torch.no_grad():
        assert torch.equal(source(**batch).logits, loaded(**batch).logits)


def test_keye_conv_patch_embedding_equals_our_linear_on_patchified_pixels(config):
    """The reshape of Keye's stride-14 Conv2d weight is the same map as our Linear over patchify's rows."""
    model = make_model(config).eval()
    conv_weight = model.vision.patch_embed.weight.detach().reshape(-1, 3, PATCH, PATCH)
    picture = frame(56, 84, 5)
    x = torch.from_numpy(picture).permute(2, 0, 1).float()[None] / 255 * 2 - 1
    conv = F.conv2d(x, conv_weight, model.vision.patch_embed.bias.detach(), stride=PATCH)[0]  # [H, 4, 6]
    patches = torch.from_numpy(patchify(picture, PATCH, MERGE)).float() / 255 * 2 - 1
    with torch.no_grad():
        linear = model.vision.patch_embed(patches)
    rows, cols = patch_rows_cols(4, 6, MERGE)
    assert torch.allclose(linear, conv[:, rows, cols].T, atol=1e-5)


def keye_processor_rows(picture: np.ndarray) -> torch.Tensor:
    """A frame as the released Keye-VL-1.5 processor lays it out, written from its rule: rescale 1/255,
    normalise with mean = std = 0.5, then (C, gh, P, gw, P) → (gh, gw, C, P, P): one row per patch in
    raster order, `[N, C, P, P]` float."""
    x = (torch.from_numpy(picture).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
    c, h, w = x.shape
    x = x.reshape(c, h // PATCH, PATCH, w // PATCH, PATCH).permute(1, 3, 0, 2, 4)
    return x.reshape(-1, c, PATCH, PATCH)


def test_raster_order_pixel_values_convert_to_our_patches_and_back():
    sizes = [(56, 84), (28, 56), (84, 56)]
    pictures = [frame(h, w, 20 + i) for i, (h, w) in enumerate(sizes)]
    grids = [(1, h // PATCH, w // PATCH) for h, w in sizes]
    raster = torch.cat([keye_processor_rows(p) for p in pictures])
    ours = torch.cat([torch.from_numpy(patchify(p, PATCH, MERGE)) for p in pictures])
    converted = raster_to_merge_order(raster, grids, MERGE)
    assert converted.shape == (raster.shape[0], 3 * PATCH * PATCH)
    assert torch.equal(converted, (ours.float() / 255.0 - 0.5) / 0.5)
    assert torch.equal(merge_to_raster_order(converted, grids, MERGE), raster.reshape(raster.shape[0], -1))
    # A grid with t = 2 is two frames of the same size, each reordered on its own.
    two = raster_to_merge_order(torch.cat([raster[:24], raster[:24]]), [(2, 4, 6)], MERGE)
    assert torch.equal(two, torch.cat([converted[:24], converted[:24]]))
    with pytest.raises(ValueError, match="patch rows"):
        raster_to_merge_order(raster[:-1], grids, MERGE)


def test_model_and_processor_accept_the_released_processors_raster_pixel_values(config, tokenizer):
    """The same image and video as (a) our stored uint8 patches, (b) the released processor's raster-order
    float pixel_values given to the model, (c) raster-order uint8 rows given to encode_sample: one output."""
    model = make_model(config, seed=6).eval()
    image, video = image_media(56, 84, 3), video_media(30)
    sample = encode_sample(chat(video, "When?", "Soon."), tokenizer, lookup)
    batch = collate([encode_sample(chat(image, "What?", "Noise."), tokenizer, lookup), sample], pack=True)

    def raster_of(media: MediaPatches) -> list[torch.Tensor]:
        out, start = [], 0
        for _, h, w in media.grids:
            n = h * w
            picture = unpatchify(np.asarray(media.patches[start : start + n]), h, w, PATCH, MERGE)
            out.append(keye_processor_rows(picture))
            start += n
        return out

    raster = torch.cat(raster_of(image) + raster_of(video))
    with torch.no_grad():
        expected = model(**batch).logits
        got = model(**{**batch, "pixel_values": raster}).logits
    assert raster.ndim == 4 and torch.equal(got, expected)

    raster_uint8 = merge_to_raster_order(torch.as_tensor(video.patches), video.grids, MERGE)
    as_raster = dataclasses.replace(video, patches=raster_uint8.numpy(), order="raster")
    again = encode_sample(chat(as_raster, "When?", "Soon."), tokenizer, lookup)
    assert torch.equal(again.pixel_values, sample.pixel_values)


def test_keye_key_names_map_and_unknown_keys_fail(config, tmp_path):
    assert keye_key_to_ours("visual.vision_model.encoder.layers.26.self_attn.out_proj.bias") == (
        "vision.layers.26.attn.out_proj.bias"
    )
    assert (
        keye_key_to_ours("model.layers.35.self_attn.q_norm.weight")
        == "language_model.layers.35.self_attn.q_norm.weight"
    )
    assert keye_key_to_ours("visual.vision_model.embeddings.packing_position_embedding.weight") is None
    with pytest.raises(ValueError, match="unknown Keye checkpoint key"):
        keye_key_to_ours("visual.merger.mlp.0.weight")
    # A checkpoint missing a tensor is refused, not silently random.
    state = keye_state_dict(make_model(config), config)
    del state["mlp_AR.linear_1.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(keye_config_json(config)))
    with pytest.raises(ValueError, match="projector.fc1.bias"):
        load_keye_checkpoint(tmp_path)


def test_config_from_keye_reads_8b_sizes():
    raw = keye_config_json(keye_8b())
    raw.update(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, intermediate_size=12288)
    raw["vision_config"].update(image_size=384)
    config = config_from_keye(raw)
    assert config.vision_config.num_position_embeddings == 729
    assert config.projector_hidden_size == 4608
    assert config.text_config.head_dim == 128 and config.rope_theta == 1e6


def test_rotary_inv_freq_buffers_are_dropped_under_any_prefix():
    """`rotary_emb.inv_freq` is a buffer computed from the config; older exports save it with a prefix."""
    for key in (
        "rotary_emb.inv_freq",
        "model.rotary_emb.inv_freq",
        "model.layers.3.self_attn.rotary_emb.inv_freq",
        "visual.vision_model.encoder.rotary_pos_emb.rotary_emb.inv_freq",
    ):
        assert keye_key_to_ours(key) is None, key
    # Only the exact buffer name: a weight whose name merely ends alike is still an unknown key.
    with pytest.raises(ValueError, match="unknown Keye checkpoint key"):
        keye_key_to_ours("visual.my_rotary_emb.inv_freq")


def test_keye_checkpoint_with_prefixed_inv_freq_loads(config, samples, tmp_path):
    source = make_model(config, seed=4).eval()
    state = keye_state_dict(source, config)
    state["model.rotary_emb.inv_freq"] = torch.ones(8)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(keye_config_json(config)))
    loaded = load_keye_checkpoint(tmp_path)
    batch = collate(samples, pack=True)
    with torch.no_grad():
        assert torch.equal(source(**batch).logits, loaded(**batch).logits)


def test_config_from_keye_missing_image_size_is_siglip_224():
    raw = keye_config_json(keye_8b())
    raw["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}
    del raw["vision_config"]["image_size"]
    raw["vision_config"]["patch_size"] = 14
    assert config_from_keye(raw).vision_config.num_position_embeddings == (224 // 14) ** 2 == 256


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"type": "mrope", "mrope_section": [16, 24, 24]},
        {"rope_type": "default", "type": "default", "mrope_section": [16, 24, 24]},
        {"mrope_section": [16, 24, 24]},
    ],
)
def test_config_from_keye_accepts_plain_rope_types(rope_scaling):
    raw = keye_config_json(keye_8b())
    raw["rope_scaling"] = rope_scaling
    config = config_from_keye(raw)
    assert config.mrope_section == [16, 24, 24]
    assert config.text_config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("key", ["type", "rope_type"])
@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic"])
def test_config_from_keye_refuses_rope_types_we_do_not_implement(key, kind):
    raw = keye_config_json(keye_8b())
    raw["rope_scaling"] = {key: kind, "factor": 4.0, "mrope_section": [16, 24, 24]}
    with pytest.raises(ValueError, match=f"rope_scaling type '{kind}' is not implemented"):
        config_from_keye(raw)


def test_config_validation():
    with pytest.raises(ValueError, match="mrope_section"):
        KeyeConfig(vision_config=tiny().vision_config, text_config=tiny().text_config,
                   mrope_section=[2, 2, 2], image_token_id=1, video_token_id=2, vision_start_token_id=3,
                   vision_end_token_id=4)  # fmt: skip
    with pytest.raises(ValueError, match="square"):
        tiny().vision_config.__class__(num_position_embeddings=10)


def test_tiny_config_takes_ids_from_the_tokenizer(tokenizer, config):
    ids = vision_token_ids(tokenizer)
    assert (config.image_token_id, config.video_token_id) == (ids.image_pad, ids.video_pad)
    assert config.text_config.vocab_size == len(tokenizer) == 4096
