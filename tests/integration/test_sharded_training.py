"""The stage trainer with fully sharded state (FSDP2, `keyeflow.training.sharding`) on 2 gloo ranks under
torchrun, against the unsharded stage in one process: after 3 steps of a cosine schedule every parameter (the
ViT's and the projector's included) equals the one-process run's, and a sharded checkpoint, written
asynchronously while training goes on, resumes on another world size (2 → 1, and 1 → 2 after a SIGKILL) to
the uninterrupted run's next loss over the same samples."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import REPO, run_trainer, spec_file, trainer_command
from test_trainer_distributed import torchrun

from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.export import export_keye
from keyeflow.training.config import StageConfig
from keyeflow.training.engine import LATEST, read_metrics
from keyeflow.training.trainer import check_resumable, train

# 2 ranks × 2 micro-batches = 4 slots for the 3-5 packs of a window of 8 samples: some micro-batches are
# empty, and some hold no image (the sharded ViT must run on every rank all the same).
STAGE = StageConfig(
    name="sharded",
    learning_rate=1e-3,
    max_steps=3,
    max_length=1024,
    window_size=8,
    micro_batches_per_step=2,
    schedule="cosine",
    warmup_steps=1,
    checkpoint_every=2,  # step 2 is written in the background while step 3 trains
)
SHARDED = StageConfig.from_dict({**STAGE.to_dict(), "fsdp": True})
RTOL = 1e-5


@pytest.fixture(scope="module")
def data(multirank_training_data):
    return multirank_training_data


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The unsharded stage on one process, in this process: losses, per-step occurrences, final weights."""
    out = tmp_path_factory.mktemp("reference")
    result = train(STAGE, init=data.init, mixture=data.mixture, mixture_id=data.mixture_id, out_dir=out)
    return result.losses, [m["occurrences"] for m in read_metrics(out)], weights(result.checkpoint_dir)


def weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The Hugging Face export's tensors (one `model.safetensors`, or numbered files with an index)."""
    return {
        k: v for f in (Path(checkpoint_dir) / "model").glob("*.safetensors") for k, v in load_file(f).items()
    }


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every tensor within RTOL of the one-process run's (as a whole), and every element within RTOL or 1%
    of one step's largest move (AdamW moves an element by up to lr a step, whatever its gradient: an element
    whose gradient is ~0 moves by an amount the order of the ranks' summation decides, ~1e-6 here; a wrong
    shard would be off by ~lr)."""
    assert got.keys() == want.keys()
    assert any(k.startswith("vision.") for k in got) and any(k.startswith("projector.") for k in got)
    for name, value in want.items():
        assert torch.linalg.vector_norm(got[name] - value) <= RTOL * torch.linalg.vector_norm(value), name
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=STAGE.learning_rate / 100)


def resume_at(out: Path, step: int) -> None:
    """Point `latest` back at an earlier registered checkpoint (what a run killed after it would resume)."""
    (out / LATEST).write_text(f"step-{step:08d}\n")


@pytest.mark.slow
def test_two_sharded_ranks_equal_one_process_and_resume_on_one_rank(data, reference, tmp_path):
    """Starting from the init in the released Keye-VL-1.5 layout (fp32, in several files): the sharded model
    reads it rank-locally, Keye's names translated and its Conv2d patch embedding reshaped."""
    losses, occurrences, final_weights = reference
    keye_init = export_keye(data.init, tmp_path / "keye-init", dtype="fp32", max_shard_bytes=1_000_000)
    out = tmp_path / "run"
    two = torchrun(spec_file(tmp_path / "two.json", dataclasses.replace(data, init=keye_init), SHARDED, out))
    assert two["step"] == 3 and two["losses"] == pytest.approx(losses, rel=RTOL)
    assert [m["occurrences"] for m in read_metrics(out)] == occurrences
    assert_same_weights(weights(two["checkpoint_dir"]), final_weights)  # every parameter, ViT included
    saved = Path(two["checkpoint_dir"])
    # each rank wrote its own shard file, about half of the weights and AdamW's two moments (3 fp32 copies);
    # no gathered optimizer state anywhere
    shards = sorted((saved / "dcp").glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    everything = 3 * 4 * sum(t.numel() for t in final_weights.values())  # bytes
    assert all(0.4 * everything < shard.stat().st_size < 0.6 * everything for shard in shards)
    assert torch.load(saved / "trainer.pt", weights_only=False)["optimizer"] is None
    # the export, assembled from the shards on disk, is an ordinary Hugging Face checkpoint
    assert sorted(p.name for p in (saved / "model").iterdir()) == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    assert_same_weights(load_keye_checkpoint(saved / "model").state_dict(), final_weights)

    # a checkpoint before the stage's end carries no weights export (its `dcp/` shards are the state), only
    # the config a resume rebuilds the model from
    assert sorted(p.name for p in (out / "step-00000002" / "model").iterdir()) == ["config.json"]

    # the step-2 checkpoint (written asynchronously while step 3 trained) resumed on 1 rank
    resume_at(out, 2)
    one = run_trainer(spec_file(tmp_path / "one.json", data, SHARDED, out))
    assert one["step"] == 3 and one["losses"][:2] == two["losses"][:2]
    assert one["losses"][2] == pytest.approx(losses[2], rel=RTOL)
    assert [m["occurrences"] for m in read_metrics(out)] == occurrences  # the exact next samples
    assert_same_weights(weights(one["checkpoint_dir"]), final_weights)


@pytest.mark.slow
def test_a_sharded_checkpoint_of_one_rank_resumes_on_two_after_a_sigkill(data, reference, tmp_path):
    """One rank checkpoints every step, in the background, and is SIGKILLed after step 2's update: step 1's
    checkpoint, written while step 2 trained, was registered once written; 2 ranks resume from it."""
    losses, occurrences, _ = reference
    out = tmp_path / "run"
    every_step = StageConfig.from_dict({**SHARDED.to_dict(), "checkpoint_every": 1})
    env = {**os.environ, "KEYEFLOW_KILL_POINT": "stage.step@2"}
    spec = spec_file(tmp_path / "one.json", data, every_step, out)
    killed = subprocess.run(
        trainer_command(spec), cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert killed.returncode == -9 and "kill point stage.step (arrival 2)" in killed.stderr, killed.stderr[
        -3000:
    ]
    assert (out / LATEST).read_text() == "step-00000001\n"
    assert len(list((out / "step-00000001" / "dcp").glob("*.distcp"))) == 1

    two = torchrun(spec_file(tmp_path / "two.json", data, every_step, out))
    assert two["step"] == 3 and two["losses"] == pytest.approx(losses, rel=RTOL)
    assert [m["occurrences"] for m in read_metrics(out)] == occurrences  # steps 2 and 3 on the next samples


def test_fsdp_checkpoint_is_refused_by_an_unsharded_run_and_the_reverse():
    """The formats differ (DCP shards vs. a whole optimizer state): a resume across them is refused."""
    saved = {
        "format": 1,
        "mixture_id": "m1",
        "deepspeed_zero": None,
        "fsdp": True,
        "world_size": 2,
        "stage": SHARDED.to_dict(),
        "stage_hash": SHARDED.config_hash(),
    }
    check_resumable(saved, SHARDED, "m1", world_size=1)  # another world size: fine
    with pytest.raises(ValueError, match="written with fsdp=True, this run has False"):
        check_resumable(saved, STAGE, "m1", world_size=2)
    with pytest.raises(ValueError, match="written with fsdp=False, this run has True"):
        check_resumable({**saved, "fsdp": False}, SHARDED, "m1", world_size=2)
    assert "fsdp" not in STAGE.to_dict()  # unsharded configs hash as before the field existed
    with pytest.raises(ValueError, match="fsdp"):
        StageConfig.from_dict({**SHARDED.to_dict(), "deepspeed_zero": 3})
