"""GSPO and MPO with the policy sharded by FSDP2 (`fsdp=True`) on 2 real gloo ranks, spawned, against the
unsharded loops in one process: after 3 steps every parameter (the ViT's and the projector's included)
equals the one-process run's, over the same prompts and the same sampled tokens (each step's rewards and
completion lengths are the one-process run's exactly).

The data make the sharded paths do what only they must: a rank holds a prompt with an image and the other
none (the ViT runs on a dummy image there), ranks hold different numbers of token-budget micro-batches (the
short one pads), and GSPO's rollouts come from the sampler's unsharded copy, synced from the shards before
every step (steps 2 and 3 sample from updated weights, so a missed sync changes their rewards)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from weights_match import NOISE_ONLY_SUFFIXES, assert_same_updates

from keyeflow.datasets.pretokenize import patchify
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.config import tiny
from keyeflow.model.generation import LocalGenerator
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.training.config import GSPOStageConfig, MPOStageConfig, RolloutServerConfig
from keyeflow.training.losses import GSPOConfig
from keyeflow.training.preference import train_mpo
from keyeflow.training.rl import train_gspo, trainer_logprobs
from keyeflow.training.rollout import SYNC_CHECK, logprob_tolerance

WORLD = 2
LR = 1e-3
# Parameters: each tensor within RTOL of the one-process run's (as a whole), and its elements as
# `assert_same_updates` compares them, within RTOL or 1% of one step's largest move (AdamW moves an element by
# up to lr a step whatever its gradient: tests/weights_match.py).
RTOL = 1e-5
ATOL = LR / 100


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


# Rank 0 rolls out the first prompt (text), rank 1 the other two (an image and text).
ITEMS = [
    {"id": "apples", "messages": user("How many apples are on the table?")},
    {"id": "picture", "messages": user([{"type": "image", "seed": 1}, {"type": "text", "text": "What?"}])},
    {"id": "boat", "messages": user("What colour is the boat?")},
]
PAIRS = [
    {"messages": user(f"What is {i}+{i}?"), "chosen": f"It is {2 * i}.", "rejected": f"Maybe {2 * i + 1}?"}
    for i in range(3)
] + [
    {
        "messages": user([{"type": "image", "seed": 2}, {"type": "text", "text": "Colour?"}]),
        "chosen": "Red.",
        "rejected": "It is green, probably.",
    }
]


def media_lookup(part) -> MediaPatches:
    pixels = np.random.default_rng(part["seed"]).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    return MediaPatches(patchify(pixels, 14, 2), [(1, 4, 6)])


def letter_reward(item, response: str) -> float:
    """The share of ASCII letters: varies between a random policy's completions, so groups carry signal."""
    return sum(ch.isascii() and ch.isalpha() for ch in response) / len(response) if response else 0.0


def gspo_config(**overrides) -> GSPOStageConfig:
    args = {
        "prompts_per_step": 3, "group_size": 4, "max_new_tokens": 8, "learning_rate": LR, "max_steps": 3,
        "mini_batches_per_step": 2, "checkpoint_every": 3, "hints": None, "seed": 7,
        "gspo": GSPOConfig(epsilon_low=0.2, epsilon_high=0.2),
    }  # fmt: skip
    return GSPOStageConfig(**(args | overrides))


MPO = MPOStageConfig(learning_rate=LR, max_steps=3, pairs_per_step=2, max_length=128, checkpoint_every=3)
# A budget under which rank 1's part of a mini-batch (image responses) takes more micro-batches than rank 0's.
BUDGET = 64


# GSPO one padded forward per part, GSPO under a token budget, MPO, and GSPO whose sharded run samples over
# HTTP from our server (started by its rank 0, fp32 weights synced from the sampler's copy after every step)
# against the one-process run sampling in process.
RUNS = ("gspo", "gspo_budget", "mpo", "gspo_http")


def run(name: str, init: Path, out: Path, fsdp: bool) -> Path:
    """One of the runs; its last checkpoint."""
    if name == "mpo":
        mpo = dataclasses.replace(MPO, fsdp=fsdp)
        result = train_mpo(mpo, init=init, pairs=PAIRS, out_dir=out / name, media_lookup=media_lookup)
        return result.checkpoint_dir
    config = gspo_config(
        fsdp=fsdp,
        max_tokens_per_micro_batch=BUDGET if name == "gspo_budget" else None,
        rollout_server=RolloutServerConfig(sync_dtype="fp32") if name == "gspo_http" and fsdp else None,
    )
    return train_gspo(
        config, init=init, items=ITEMS, reward_fn=letter_reward, out_dir=out / name, media_lookup=media_lookup
    ).checkpoint_dir


def run_rank(rank: int, port: int, name: str, init: Path, out: Path) -> None:
    """One rank of one sharded run: a process per run, as a launched job is."""
    torch.set_num_threads(1)  # two ranks and the reference share the machine
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    run(name, init, out, fsdp=True)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init")
    KeyeForConditionalGeneration(tiny(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(init_dir, tmp_path_factory):
    """name → (the one-process unsharded run's last checkpoint, the 2-rank sharded run's), each pair run on
    first use (a test of one run does not wait for the others)."""
    sharded_out, one_out = tmp_path_factory.mktemp("sharded"), tmp_path_factory.mktemp("one-process")
    # spawn, not fork: a full test run's process holds Lance's and Prefect's threads
    spawn = multiprocessing.get_context("spawn")
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            done[name] = run_pair(name)
        return done[name]

    def run_pair(name: str) -> tuple[Path, Path]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ranks = [
            spawn.Process(target=run_rank, args=(r, port, name, init_dir, sharded_out)) for r in range(WORLD)
        ]
        for rank in ranks:
            rank.start()
        reference = run(name, init_dir, one_out, fsdp=False)
        for rank in ranks:
            rank.join(timeout=600)
        assert [rank.exitcode for rank in ranks] == [0] * WORLD, f"a rank of {name} failed (traceback above)"
        return reference, sharded_out / name / reference.name

    return get


def history(checkpoint: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_two_sharded_ranks_train_the_one_process_parameters(runs, init_dir, name):
    reference, sharded = runs(name)
    want = load_keye_checkpoint(reference / "model").state_dict()
    got = load_keye_checkpoint(sharded / "model").state_dict()
    init = load_keye_checkpoint(init_dir).state_dict()
    # Same prompts, same sampled tokens: the rewards and completion lengths of every step are the same.
    one, two = history(reference), history(sharded)
    assert len(one) == len(two) == 3
    keys = ("reward_mean", "completion_tokens_mean", "num_active_responses") if name != "mpo" else ("pairs",)
    for first, second in zip(one, two, strict=True):
        assert [second[k] for k in keys] == [first[k] for k in keys]
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-4, abs=1e-6)
    assert got.keys() == want.keys()
    assert any(k.startswith("vision.") for k in got) and any(k.startswith("projector.") for k in got)
    moved = [k for k in want if not torch.equal(want[k], init[k])]
    assert any(k.startswith("vision.") for k in moved) and len(moved) > len(want) // 2  # training happened
    for key, value in want.items():
        if not key.endswith(NOISE_ONLY_SUFFIXES):  # tests/weights_match.py: nothing to compare there
            assert torch.linalg.vector_norm(got[key] - value) <= RTOL * torch.linalg.vector_norm(value), key
    assert_same_updates(got, want, lr=LR, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_the_server_a_sharded_policy_syncs_answers_with_the_trained_weights(runs, init_dir):
    """After the last step's sync, the server's log-probs of the check completion (the image prompt, greedy)
    are the trained policy's: the weights read back from the run's last checkpoint give the same numbers."""
    _, sharded = runs("gspo_http")
    check = json.loads((sharded.parent / SYNC_CHECK).read_text())
    assert check["step"] == 3
    assert [m["sync_logprob_gap"] <= logprob_tolerance("http", "fp32") for m in history(sharded)] == [
        True
    ] * 3
    trained = LocalGenerator(sharded / "model", media_lookup=media_lookup)
    prompt = trained.encode_prompt(ITEMS[1]["messages"])  # the run's first item with media: the check's
    ours = trainer_logprobs(trained.model, prompt, check["token_ids"])
    assert check["server_logprobs"] == pytest.approx(ours, abs=logprob_tolerance("http", "fp32"))
    init = LocalGenerator(init_dir, media_lookup=media_lookup)
    before = trainer_logprobs(init.model, init.encode_prompt(ITEMS[1]["messages"]), check["token_ids"])
    assert max(abs(a - b) for a, b in zip(before, ours)) > 1e-3  # the policy moved: the check can fail
