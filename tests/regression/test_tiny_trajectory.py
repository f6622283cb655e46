"""The tiny recipe's training trajectory, bit for bit: pre-training stages 1 → 2 → 3 on the sample data (the
recipe's own stage configs and mixtures), then one MPO step and one GSPO step from the stage-3 checkpoint.
Every step's loss and a digest of the weights after each stage are compared with `tiny_trajectory.json`,
first recorded before the training loops were moved onto one engine; any change to what a step computes (the
order of floating-point operations included) fails here.

The numbers depend on the CPU kernels torch and MKL pick and on the number of threads, so the trajectory runs
on one thread, and the file holds one recording per kind of machine it was recorded on: the run must equal
one of them bit for bit. On an AVX-512 Xeon the losses were the recorded ones but the weights after stage 1
were not (the difference is in the updates; forcing ATen's, MKL's and oneDNN's AVX2 paths did not give the
recorded bits either), so that machine has its own recording. A change to what a step computes moves the
numbers on every machine. A deliberate change is re-recorded on each kind of machine with
`KEYEFLOW_RECORD_TRAJECTORY=1 pytest tests/regression` (it replaces this machine's recording), and the commit
says why the numbers changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from posttrain_job import image_lookup, letter_share, picture_prompt

from keyeflow.datasets import conversations, images, ingest, pretokenize, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.mixture import build_mixture
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.training.config import GSPOStageConfig, MPOStageConfig
from keyeflow.training.losses import GSPOConfig
from keyeflow.training.preference import train_mpo
from keyeflow.training.recipes import pretrain_recipe
from keyeflow.training.rl import train_gspo
from keyeflow.training.trainer import train

RECORDED = Path(__file__).with_name("tiny_trajectory.json")


def machine_label() -> str:
    """What a recording is filed under: the CPU's model name and the kernels torch dispatches to."""
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown CPU",
        )
        if Path("/proc/cpuinfo").is_file()
        else "unknown CPU"
    )
    return f"{model}, torch {torch.backends.cpu.get_cpu_capability()} kernels"


def weights_digest(model_dir: Path) -> str:
    """sha256 over every parameter's name and float32 bytes, in name order."""
    model = load_keye_checkpoint(model_dir)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def hexes(values) -> list[str]:
    return [float(v).hex() for v in values]


MPO_PAIRS = [
    {
        "messages": picture_prompt(1, "What is shown?"),
        "chosen": "A red square.",
        "rejected": "Nothing, maybe.",
    },
    {
        "messages": picture_prompt(2, "How many dots?"),
        "chosen": "Three.",
        "rejected": "I cannot tell at all.",
    },
]
GSPO_ITEMS = [
    {"id": "one", "messages": picture_prompt(1, "Describe it."), "reference": "square"},
    {"id": "two", "messages": picture_prompt(2, "Count them."), "reference": "3"},
]


def run_trajectory(home: Path, corpus_dir: Path, media_dir: Path) -> dict:
    recipe = pretrain_recipe("tiny")
    paper, image_config = resolve_config("paper"), ImageConfig()
    media = conversations.referenced_media([str(corpus_dir)], str(media_dir))
    ingest.ingest_shard(media["video"])
    pretokenize.pretokenize_shard(pretokenize.pending_videos(tables.ref("videos"), paper), paper)
    images.ingest_images_shard(media["image"], image_config)
    conversations.build_train_samples([str(corpus_dir)], str(media_dir), paper, image_config)

    init = home / "init"
    torch.manual_seed(recipe.stages[1].seed)
    KeyeForConditionalGeneration(recipe.model_config()).save_pretrained(init)
    out: dict = {"init": weights_digest(init)}
    checkpoint: Path = init
    for number, stage in (
        (1, recipe.stages[1]),
        (2, recipe.stages[2]),
        (3, recipe.variant_stage(recipe.variants[0])),
    ):
        mixture = build_mixture(
            tables.ref("train_samples"), recipe.mixture(number, recipe.variants[0]), tables.ref("quarantine")
        )
        result = train(
            stage,
            init=checkpoint,
            mixture=mixture.mixture,
            mixture_id=mixture.mixture_id,
            out_dir=home / f"stage-{number}",
        )
        checkpoint = result.checkpoint_dir / "model"
        out[f"stage{number}"] = {"losses": hexes(result.losses), "weights": weights_digest(checkpoint)}

    mpo = train_mpo(
        MPOStageConfig(learning_rate=1e-3, max_steps=1, pairs_per_step=2, max_length=256),
        init=checkpoint,
        pairs=MPO_PAIRS,
        out_dir=home / "mpo",
        media_lookup=image_lookup,
    )
    out["mpo"] = {
        "losses": hexes(mpo.losses),
        "metrics": hexes(mpo.metrics[0][k] for k in ("dpo", "bco", "sft", "reward_margin")),
        "weights": weights_digest(mpo.checkpoint_dir / "model"),
    }

    gspo = train_gspo(
        GSPOStageConfig(
            prompts_per_step=2,
            group_size=4,
            max_new_tokens=8,
            learning_rate=1e-3,
            max_steps=1,
            hints=None,
            gspo=GSPOConfig(),
            seed=3,
        ),
        init=checkpoint,
        items=GSPO_ITEMS,
        reward_fn=letter_share,
        out_dir=home / "gspo",
        media_lookup=image_lookup,
    )
    record = gspo.history[0]
    assert record["num_active_responses"] > 0, "the trajectory must include a GSPO update"
    out["gspo"] = {
        "metrics": hexes(record[k] for k in ("reward_mean", "loss", "mean_ratio", "grad_norm")),
        "weights": weights_digest(gspo.checkpoint_dir / "model"),
    }
    return out


def test_tiny_recipe_trajectory_is_reproduced_bit_for_bit(home, sample_corpus, media_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trajectory = run_trajectory(home, sample_corpus["conversations"].parent, media_dir)
    finally:
        torch.set_num_threads(threads)
    recordings = json.loads(RECORDED.read_text())
    if os.environ.get("KEYEFLOW_RECORD_TRAJECTORY"):
        recordings[machine_label()] = trajectory
        RECORDED.write_text(json.dumps(recordings, indent=1) + "\n")
        pytest.skip(f"recorded {RECORDED} for {machine_label()}")
    if trajectory in recordings.values():
        return
    # Name what differs from the recording this run is closest to (the most parts equal).
    label, expected = max(
        recordings.items(), key=lambda kv: sum(trajectory.get(p) == v for p, v in kv[1].items())
    )
    for part in expected:
        assert trajectory[part] == expected[part], (
            f"{part} differs from the trajectory recorded on {label!r} (this machine: {machine_label()!r})"
        )
    assert trajectory == expected
