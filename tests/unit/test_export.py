"""`keyeflow export`: a checkpoint in the Keye-VL-1.5 Hugging Face layout, loaded back by the Keye-layout
loader with the same weights (bitwise in fp32) and the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from keyeflow.cli import app
from keyeflow.datasets.pretokenize import patchify
from keyeflow.model.checkpoint import keye_key_to_ours, load_keye_checkpoint
from keyeflow.model.config import tiny
from keyeflow.model.export import export_keye, our_key_to_keye
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches, collate, encode_sample
from keyeflow.model.token_stream import vision_token_ids
from keyeflow.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model with random weights, saved our way (what a stage checkpoint is)."""
    torch.manual_seed(5)
    model = KeyeForConditionalGeneration(tiny(load_tokenizer())).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(path)
    return model, path


def _batch():
    tokenizer = load_tokenizer()
    rng = np.random.default_rng(0)

    def frame(h, w):
        return patchify(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 14, 2)

    image = MediaPatches(frame(56, 84), [(1, 4, 6)])
    video = MediaPatches(np.concatenate([frame(56, 56), frame(28, 56)]), [(1, 4, 4), (1, 2, 4)],
                         frame_types=[0, 1], timestamps=[0.0, 0.5], slow_tokens=4, fast_tokens=2)  # fmt: skip

    def chat(media, question):
        part = {"type": media.kind, media.kind: "x", "media": media}
        return [{"role": "user", "content": [part, {"type": "text", "text": question}]},
                {"role": "assistant", "content": "An answer."}]  # fmt: skip

    samples = [
        encode_sample(chat(m, "What is shown?"), tokenizer, lambda p: p["media"]) for m in (image, video)
    ]
    return collate(samples, pack=True)


def _tensors(out):
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return tensors


def test_fp32_export_loads_back_bitwise_with_the_same_logits(source, tmp_path):
    model, path = source
    out = export_keye(path, tmp_path / "keye", dtype="fp32")
    saved = _tensors(out)
    # Every parameter under its released name, the patch embedding as a Conv2d weight, plus the zero packing
    # table the released layout carries.
    packing = "visual.vision_model.embeddings.packing_position_embedding.weight"
    assert set(saved) - {packing} == {our_key_to_keye(k) for k in model.state_dict()}
    assert all(keye_key_to_ours(our_key_to_keye(k)) == k for k in model.state_dict())
    assert saved["visual.vision_model.embeddings.patch_embedding.weight"].shape == (64, 3, 14, 14)
    assert saved[packing].shape == (32768, 64) and not saved[packing].any()

    loaded = load_keye_checkpoint(out)
    ours = model.state_dict()
    assert set(loaded.state_dict()) == set(ours)
    assert all(torch.equal(loaded.state_dict()[k], ours[k]) for k in ours)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_config_tokenizer_and_preprocessor_are_written_as_keye_names_them(source, tmp_path):
    model, path = source
    out = export_keye(path, tmp_path / "keye")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["KeyeVL1_5ForConditionalGeneration"]
    assert config["torch_dtype"] == "bfloat16"
    assert config["vision_config"]["image_size"] == 56  # 4x4 position grid of 14-px patches
    assert config["text_config"]["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert config["hidden_size"] == config["text_config"]["hidden_size"] == 64
    assert config["image_token_id"] == model.config.image_token_id
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["min_pixels"]) == (14, 2, 4 * 28 * 28)
    tokenizer = load_tokenizer(out)  # checks every vision token is there
    assert vision_token_ids(tokenizer).image_pad == model.config.image_token_id
    assert tokenizer.chat_template
    # bf16: the weights rounded once, nothing else changed
    loaded = load_keye_checkpoint(out)
    assert loaded.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(
        loaded.language_model.embed_tokens.weight, model.language_model.embed_tokens.weight.to(torch.bfloat16)
    )


def test_large_exports_are_sharded_with_an_index(source, tmp_path):
    model, path = source
    out = export_keye(path, tmp_path / "keye", dtype="fp32", max_shard_bytes=2_000_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    saved = _tensors(out)
    assert set(index["weight_map"]) == set(saved) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    loaded = load_keye_checkpoint(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_export_refuses_a_used_directory_and_an_unknown_dtype_and_the_cli_says_why(source, tmp_path):
    _, path = source
    used = tmp_path / "used"
    used.mkdir()
    (used / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_keye(path, used)
    with pytest.raises(ValueError, match="fp16"):
        export_keye(path, tmp_path / "new", dtype="fp16")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(path), str(used)])
    assert result.exit_code == 2 and "not empty" in result.output
    result = runner.invoke(app, ["export", str(path), str(tmp_path / "cli"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "model.safetensors").is_file() and "config.json" in result.output
