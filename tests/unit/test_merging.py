"""Checkpoint merging: exact weighted average of tiny saved models, task arithmetic and TIES on literal
tensors computed by hand, key/shape/dtype mismatches, config validation, atomic and idempotent output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from keyeflow.model.config import tiny
from keyeflow.model.merging import MergeConfig, merge_checkpoints, read_merge_record, ties_merge
from keyeflow.model.modeling import KeyeForConditionalGeneration


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"name": path.name}))
    return path


def f32(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny")
    config = tiny()
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = KeyeForConditionalGeneration(config)
        model.save_pretrained(root / f"annealed-{seed}")
        paths.append(root / f"annealed-{seed}")
    return paths


def test_average_equals_float64_weighted_average_exactly_and_loads(tiny_checkpoints, tmp_path):
    weights = (0.5, 0.3, 0.2)
    out = merge_checkpoints(tiny_checkpoints, MergeConfig(weights=weights), tmp_path / "fused")

    states = [load_file(str(p / "model.safetensors")) for p in tiny_checkpoints]
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(states[0])
    for key, stored in states[0].items():
        expected = sum(w * s[key].double() for w, s in zip(weights, states)).to(stored.dtype)
        assert merged[key].dtype == stored.dtype
        assert torch.equal(merged[key], expected), key
    # not trivially equal to any input
    assert not torch.equal(merged["lm_head.weight"], states[0]["lm_head.weight"])

    record = read_merge_record(out)
    assert record["method"] == "average" and record["weights"] == list(weights)
    assert record["inputs"] == [str(p.resolve()) for p in tiny_checkpoints]
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tiny_checkpoints[0] / "config.json").read_text()
    )

    model = KeyeForConditionalGeneration.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, merged[key]), key
    ids = torch.tensor([[5, 6, 7, 8]])
    out_logits = model(input_ids=ids, labels=ids)
    assert out_logits.logits.shape == (1, 4, model.config.text_config.vocab_size)
    assert torch.isfinite(out_logits.loss)


def test_sharded_output_equals_single_file(tiny_checkpoints, tmp_path):
    config = MergeConfig(weights=(0.5, 0.3, 0.2))
    single = merge_checkpoints(tiny_checkpoints, config, tmp_path / "single")
    sharded = merge_checkpoints(tiny_checkpoints, config, tmp_path / "sharded", max_shard_bytes=300_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    a = KeyeForConditionalGeneration.from_pretrained(single).state_dict()
    b = KeyeForConditionalGeneration.from_pretrained(sharded).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a sharded checkpoint is also a valid merge input
    again = merge_checkpoints([sharded, single], MergeConfig(), tmp_path / "again")
    c = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(c[k], a[k]) for k in a)  # averaging two equal models gives the model back


def test_default_weights_are_equal(tmp_path):
    a = write_checkpoint(tmp_path / "a", {"w": f32(1.0, 2.0)})
    b = write_checkpoint(tmp_path / "b", {"w": f32(3.0, 6.0)})
    c = write_checkpoint(tmp_path / "c", {"w": f32(2.0, 1.0)})
    out = merge_checkpoints([a, b, c], MergeConfig(), tmp_path / "out")
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], f32(2.0, 3.0))
    assert read_merge_record(out)["weights"] == [1 / 3] * 3


def test_task_arithmetic_by_hand(tmp_path):
    base = write_checkpoint(tmp_path / "base",
                            {"w": f32(1.0, 2.0, -1.0), "b": torch.tensor([0.5], dtype=torch.bfloat16)},
                            {"name": "base"})  # fmt: skip
    x = write_checkpoint(
        tmp_path / "x", {"w": f32(3.0, 2.0, 0.0), "b": torch.tensor([1.5], dtype=torch.bfloat16)}
    )
    y = write_checkpoint(
        tmp_path / "y", {"w": f32(1.0, -2.0, 1.0), "b": torch.tensor([0.5], dtype=torch.bfloat16)}
    )
    # τx = (2, 0, 1), τy = (0, -4, 2); Σ w τ with w = (1, 0.5): (2, -2, 2); λ = 0.5: base + (1, -1, 1)
    config = MergeConfig(method="task_arithmetic", weights=(1.0, 0.5), scaling=0.5, base=str(base))
    out = merge_checkpoints([x, y], config, tmp_path / "out")
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["w"], f32(2.0, 1.0, 0.0))
    # b: τx = 1, τy = 0 → 0.5 + 0.5 · 1 = 1.0, stored back as bfloat16
    assert merged["b"].dtype == torch.bfloat16 and merged["b"].item() == 1.0
    assert json.loads((out / "config.json").read_text()) == {"name": "base"}  # the base's config
    record = read_merge_record(out)
    assert record["base"] == str(base.resolve()) and record["scaling"] == 0.5

    # default weights are 1 each (the plain sum of task vectors) and λ defaults to 1
    out = merge_checkpoints([x, y], MergeConfig(method="task_arithmetic"), tmp_path / "out2", base=base)
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], f32(3.0, -2.0, 2.0))


def test_ties_by_hand(tmp_path):
    base = torch.ones(6)
    tau = [
        f32(3.0, -1.0, 0.5, 2.0, -4.0, 0.0),   # top 3 by |τ|: idx 4, 0, 3 → (3, 0, 0, 2, -4, 0)
        f32(-2.0, -2.5, 1.0, 0.1, 3.0, 1.5),   # top 3: idx 4, 1, 0 → (-2, -2.5, 0, 0, 3, 0)
        f32(1.0, 0.2, -3.0, 1.5, -0.5, -0.7),  # top 3: idx 2, 3, 0 → (1, 0, -3, 1.5, 0, 0)
    ]  # fmt: skip
    # Σ trimmed = (2, -2.5, -3, 3.5, -1, 0) → signs (+, -, -, +, -, 0)
    # disjoint means: idx0 (3+1)/2 = 2; idx1 -2.5; idx2 -3; idx3 (2+1.5)/2 = 1.75; idx4 -4 (3 disagrees);
    # idx5 0
    expected_tau = f32(2.0, -2.5, -3.0, 1.75, -4.0, 0.0)
    assert torch.equal(ties_merge(torch.stack(tau).double(), 0.5), expected_tau.double())

    b = write_checkpoint(tmp_path / "base", {"w": base, "m": torch.zeros(2, 2)})
    m_tau = [torch.tensor([[1.0, -1.0], [0.0, 4.0]]), torch.tensor([[3.0, -2.0], [-5.0, 0.0]])]
    inputs = [
        write_checkpoint(tmp_path / f"in{i}", {"w": base + t, "m": m_tau[i] if i < 2 else torch.zeros(2, 2)})
        for i, t in enumerate(tau)
    ]
    out = merge_checkpoints(
        inputs, MergeConfig(method="ties", density=0.5, scaling=0.5), tmp_path / "out", base=b
    )
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["w"], base + 0.5 * expected_tau)  # (2, -0.25, -0.5, 1.875, -1, 1)
    assert torch.equal(merged["w"], f32(2.0, -0.25, -0.5, 1.875, -1.0, 1.0))
    # m, density 0.5 of 4 entries = 2 per input: in0 keeps 4 and then one of the tied |1| and |-1|, the lower
    # index: (1, 0; 0, 4); in1 keeps (3, 0; -5, 0); in2 is all zero.
    # Σ = (4, 0; -5, 4): means (2, 0; -5, 4); λ = 0.5 → (1, 0; -2.5, 2)
    assert torch.equal(merged["m"], torch.tensor([[1.0, 0.0], [-2.5, 2.0]]))

    # density 1 keeps everything: idx4 signs: 3 - 4 - 0.5 → -, mean of (-4, -0.5) = -2.25
    dense = ties_merge(torch.stack(tau).double(), 1.0)
    assert dense[4].item() == -2.25


def test_mismatched_checkpoints_name_the_first_difference(tmp_path):
    a = write_checkpoint(tmp_path / "a", {"x": f32(1.0), "y": f32(1.0, 2.0)})
    missing = write_checkpoint(tmp_path / "missing", {"y": f32(1.0, 2.0)})
    extra = write_checkpoint(tmp_path / "extra", {"x": f32(1.0), "y": f32(1.0, 2.0), "z": f32(0.0)})
    shape = write_checkpoint(tmp_path / "shape", {"x": f32(1.0), "y": f32(1.0, 2.0, 3.0)})
    dtype = write_checkpoint(
        tmp_path / "dtype", {"x": f32(1.0), "y": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    )
    with pytest.raises(ValueError, match=r"first mismatch 'x'.*input 0 .* has it, input 1 .*missing"):
        merge_checkpoints([a, missing], MergeConfig(), tmp_path / "o1")
    with pytest.raises(ValueError, match=r"first mismatch 'z'"):
        merge_checkpoints([a, extra], MergeConfig(), tmp_path / "o2")
    with pytest.raises(ValueError, match=r"key 'y' differs: shape \[2\] dtype F32 .* shape \[3\]"):
        merge_checkpoints([a, shape], MergeConfig(), tmp_path / "o3")
    with pytest.raises(ValueError, match=r"key 'y' differs: .*dtype F16"):
        merge_checkpoints([a, dtype], MergeConfig(), tmp_path / "o4")
    with pytest.raises(ValueError, match=r"base .* first mismatch 'x'|first mismatch 'x'.*base"):
        merge_checkpoints([a], MergeConfig(method="task_arithmetic"), tmp_path / "o5", base=missing)
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())  # nothing left behind


def test_config_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        MergeConfig(weights=(0.5, 0.4))
    with pytest.raises(ValueError, match=">= 0"):
        MergeConfig(weights=(1.5, -0.5))
    with pytest.raises(ValueError, match="method"):
        MergeConfig(method="slerp")
    with pytest.raises(ValueError, match="density"):
        MergeConfig(method="ties", density=0.0)
    with pytest.raises(ValueError, match="not used by method 'average'"):
        MergeConfig(scaling=0.5)
    with pytest.raises(ValueError, match="only by method 'ties'"):
        MergeConfig(method="task_arithmetic", density=0.3)
    config = MergeConfig(method="ties")
    assert (config.density, config.scaling) == (0.2, 1.0)
    assert MergeConfig(method="task_arithmetic", weights=(1.0, -0.5)).weights == (1.0, -0.5)
    with pytest.raises(ValueError, match="3 input"):
        MergeConfig(weights=(0.5, 0.5)).weights_for(3)


def test_merge_arguments_checked(tmp_path):
    a = write_checkpoint(tmp_path / "a", {"x": f32(1.0)})
    b = write_checkpoint(tmp_path / "b", {"x": f32(3.0)})
    with pytest.raises(ValueError, match="needs the common parent"):
        merge_checkpoints([a, b], MergeConfig(method="ties"), tmp_path / "o")
    with pytest.raises(ValueError, match="takes no base"):
        merge_checkpoints([a, b], MergeConfig(), tmp_path / "o", base=a)
    with pytest.raises(ValueError, match="given twice"):
        merge_checkpoints([b], MergeConfig(method="task_arithmetic", base=str(a)), tmp_path / "o", base=b)
    with pytest.raises(ValueError, match="one of the checkpoints"):
        merge_checkpoints([a, b], MergeConfig(), a)


def test_rerun_is_a_noop_and_a_different_merge_is_refused(tmp_path):
    a = write_checkpoint(tmp_path / "a", {"x": f32(1.0)})
    b = write_checkpoint(tmp_path / "b", {"x": f32(3.0)})
    out = merge_checkpoints([a, b], MergeConfig(), tmp_path / "out")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert merge_checkpoints([a, b], MergeConfig(), tmp_path / "out") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        merge_checkpoints([a, b], MergeConfig(weights=(0.25, 0.75)), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # no temporary directory left
