"""The trainer on 2 gloo ranks under torchrun, against the same stage on one process: a 2-rank checkpoint
resumed on 1 rank continues at the exact next sample, and DeepSpeed ZeRO-2 on 2 ranks gives the single-process
losses (the loss is a token mean over the whole step, so it does not depend on how the step was split)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import REPO, run_trainer, spec_file

from keyeflow.training.config import StageConfig
from keyeflow.training.engine import read_metrics
from keyeflow.training.trainer import train

# 2 ranks × 2 micro-batches = 4 slots for the 3-5 packs of a window of 8 samples: some micro-batches are
# empty.
STAGE = StageConfig(
    name="dist",
    learning_rate=1e-3,
    max_steps=6,
    max_length=1024,
    window_size=8,
    micro_batches_per_step=2,
    schedule="constant",
    checkpoint_every=3,
)
RTOL = 1e-4


@pytest.fixture(scope="module")
def data(multirank_training_data):
    return multirank_training_data


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The stage on one process, in this process: losses and per-step occurrences."""
    out = tmp_path_factory.mktemp("reference")
    result = train(STAGE, init=data.init, mixture=data.mixture, mixture_id=data.mixture_id, out_dir=out)
    return result.losses, [m["occurrences"] for m in read_metrics(out)]


def torchrun(spec: Path, nproc: int = 2) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "keyeflow.steps.train_job",
        str(spec),
    ]
    done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_ranks_checkpoint_then_one_rank_resumes_at_the_next_sample(data, reference, tmp_path):
    losses, occurrences = reference
    out = tmp_path / "run"
    first = StageConfig.from_dict({**STAGE.to_dict(), "max_steps": 3})
    two = torchrun(spec_file(tmp_path / "two.json", data, first, out))
    assert two["step"] == 3
    assert two["losses"] == pytest.approx(losses[:3], rel=RTOL)  # 2 ranks = 1 rank, step by step

    one = run_trainer(spec_file(tmp_path / "one.json", data, STAGE, out))  # same out_dir: resumes
    assert one["step"] == 6 and one["losses"][:3] == two["losses"]
    assert one["losses"] == pytest.approx(losses, rel=RTOL)
    steps = read_metrics(out)
    assert [m["step"] for m in steps] == list(range(1, 7))
    # every step trained on exactly the samples the 1-process run trained on: nothing skipped or repeated
    assert [m["occurrences"] for m in steps] == occurrences
    consumed = [o for m in steps for o in m["occurrences"]]
    assert sorted(consumed) == list(range(6 * STAGE.window_size))


@pytest.mark.slow
def test_deepspeed_zero2_on_two_ranks_gives_the_single_process_losses_and_resumes(data, reference, tmp_path):
    losses, occurrences = reference
    zero2 = {**STAGE.to_dict(), "deepspeed_zero": 2}
    out = tmp_path / "zero2"
    first = torchrun(
        spec_file(tmp_path / "a.json", data, StageConfig.from_dict({**zero2, "max_steps": 2}), out)
    )
    assert first["losses"] == pytest.approx(losses[:2], rel=RTOL)
    saved = Path(first["checkpoint_dir"])
    assert (saved / "model" / "model.safetensors").is_file() and (saved / "deepspeed" / "engine").is_dir()

    # the same out_dir: the engine reloads its partitioned optimizer state and goes on
    result = torchrun(
        spec_file(tmp_path / "b.json", data, StageConfig.from_dict({**zero2, "max_steps": 4}), out)
    )
    assert result["step"] == 4 and result["losses"][:2] == first["losses"]
    assert result["losses"] == pytest.approx(losses[:4], rel=RTOL)
    assert [m["occurrences"] for m in read_metrics(out)] == occurrences[:4]


@pytest.mark.slow
def test_deepspeed_zero2_with_a_token_budget_gives_the_single_process_losses(data, reference, tmp_path):
    """Under a token budget a step takes as many micro-batches as its packs need (one pack each here), a count
    that changes from step to step: DeepSpeed must still reduce and update once per step, at its last."""
    losses, occurrences = reference
    budgeted = StageConfig.from_dict(
        {
            **STAGE.to_dict(),
            "deepspeed_zero": 2,
            "max_tokens_per_micro_batch": STAGE.max_length,
            "max_steps": 4,
        }
    )
    out = tmp_path / "budget"
    result = torchrun(spec_file(tmp_path / "budget.json", data, budgeted, out))
    assert result["losses"] == pytest.approx(losses[:4], rel=RTOL)
    steps = read_metrics(out)
    assert [m["occurrences"] for m in steps] == occurrences[:4]
    counts = [m["micro_batches"] for m in steps]
    # more micro-batches than the fixed count in some step, and not the same number in every step
    assert max(counts) > STAGE.micro_batches_per_step and len(set(counts)) > 1, counts


@pytest.mark.parametrize(
    "sharding",
    [
        {},
        pytest.param({"deepspeed_zero": 2}, marks=pytest.mark.slow),
        pytest.param({"fsdp": True}, marks=pytest.mark.slow),
    ],
    ids=["plain", "zero2", "fsdp"],
)
def test_sequence_parallel_two_ranks_train_the_one_process_weights(data, reference, tmp_path, sharding):
    """Ulysses over 2 ranks: one data-parallel rank whose rows are split in two along the sequence; the same
    samples, losses and weights as one process, with plain data parallelism, DeepSpeed ZeRO-2 and FSDP2."""
    losses, occurrences = reference
    three = StageConfig.from_dict({**STAGE.to_dict(), "max_steps": 3})
    single = train(
        three, init=data.init, mixture=data.mixture, mixture_id=data.mixture_id, out_dir=tmp_path / "one"
    )
    split = StageConfig.from_dict({**three.to_dict(), "sequence_parallel_size": 2, **sharding})
    out = tmp_path / "sp2"
    result = torchrun(spec_file(tmp_path / "sp2.json", data, split, out))
    assert result["losses"] == pytest.approx(losses[:3], rel=RTOL)
    assert [m["occurrences"] for m in read_metrics(out)] == occurrences[:3]
    # FSDP2 writes its export as shards with an index: read every file of the directory
    ours = {
        k: v
        for f in sorted((Path(result["checkpoint_dir"]) / "model").glob("*.safetensors"))
        for k, v in load_file(str(f)).items()
    }
    theirs = load_file(str(single.checkpoint_dir / "model" / "model.safetensors"))
    start = load_file(str(data.init / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    # AdamW divides by the gradient's running RMS, so summation-order noise in a near-zero gradient moves a
    # weight by a visible fraction of a step: compare with the size of the updates (3 steps at lr 1e-3, ~3e-3;
    # measured differences ≤ 2.4e-6), not with float epsilon.
    update = max((theirs[k] - start[k]).abs().max().item() for k in theirs)
    for name, value in ours.items():
        assert (value - theirs[name]).abs().max().item() <= 0.01 * update, name
    assert any(not torch.equal(ours[k], start[k]) for k in ours if k.startswith("vision."))  # the ViT trained
    saved = json.loads((Path(result["checkpoint_dir"]) / "model" / "config.json").read_text())
    assert "ulysses" not in json.dumps(saved)  # the checkpoint loads without a sequence group
