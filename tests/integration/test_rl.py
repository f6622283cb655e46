"""The GSPO engine on the tiny randomly initialised model saved to disk: rollouts and their token ids, the
GSPO update (advantages, a first-update ratio of exactly 1, weights that move only when rewards vary),
progressive hints with the minimal-level rule, checkpoint + resume equal to an uninterrupted run (and MLflow
metrics), the rollout/training input-consistency check on an image and a video (and its failures on altered
paths), and the two steps of the rejection-sampling loop.

Rewards are constructed so that a random policy gets a signal: `letter_share` (the share of a response's
characters that are ASCII letters) varies from one random completion to the next, so every group has
non-zero advantages; constant rewards give none."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from keyeflow import lineage
from keyeflow.datasets import sql, tables
from keyeflow.datasets.pretokenize import patchify
from keyeflow.longcot.collect import collect_questions
from keyeflow.longcot.rl_items import longcot_rl_items
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.config import tiny
from keyeflow.model.generation import LocalGenerator
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.steps.posttrain import record_hint_levels
from keyeflow.synthetic.longcot_questions import generate_longcot_questions
from keyeflow.training import distributed, rl
from keyeflow.training.config import GSPOStageConfig
from keyeflow.training.engine import LATEST, Engine, read_metrics
from keyeflow.training.hints import HintConfig
from keyeflow.training.losses import GSPOConfig, gspo_loss
from keyeflow.training.rl import (
    RolloutInputMismatch,
    check_rollout_training_inputs,
    completion_features,
    pass_rate_filter,
    rejection_sampling_round,
    rule_reward_fn,
    step_items,
    train_gspo,
)

G = 4
MAX_NEW = 8


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


TEXT_ITEMS = [
    {"id": "apples", "messages": user("How many apples are on the table? /think"), "reference": "3"},
    {
        "id": "boat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            user("What colour is the boat? /no_think")[0],
        ],
        "reference": "red",
    },
]
IMAGE_ITEM = {
    "id": "picture",
    "reference": "a cat",
    "messages": user([{"type": "image", "seed": 1}, {"type": "text", "text": "What is shown?"}]),
}


def image_patches(seed: int, height: int = 56, width: int = 84) -> MediaPatches:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return MediaPatches(patchify(pixels, 14, 2), [(1, height // 14, width // 14)])


def video_patches(seed: int, timestamps=(0.0, 0.5, 1.0)) -> MediaPatches:
    rng = np.random.default_rng(seed)
    sizes = [(56, 56), (28, 56), (56, 56)]  # Slow, Fast, Slow: 4, 2, 4 tokens
    return MediaPatches(
        patches=np.concatenate([patchify(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 14, 2)
                                for h, w in sizes]),
        grids=[(1, h // 14, w // 14) for h, w in sizes], frame_types=[0, 1, 0], timestamps=list(timestamps),
    )  # fmt: skip


def media_lookup(part) -> MediaPatches:
    return image_patches(part["seed"]) if part["type"] == "image" else video_patches(part["seed"])


def letter_share(text: str) -> float:
    return sum(ch.isascii() and ch.isalpha() for ch in text) / len(text) if text else 0.0


def letter_reward(item, response: str) -> float:
    return letter_share(response)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def init_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(tiny(tokenizer))
    path = tmp_path_factory.mktemp("tiny-policy")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def generator(init_dir) -> LocalGenerator:
    return LocalGenerator(init_dir, media_lookup=media_lookup)


def stage(**overrides) -> GSPOStageConfig:
    args = {
        "prompts_per_step": 3,
        "group_size": G,
        "max_new_tokens": MAX_NEW,
        "temperature": 1.0,
        "learning_rate": 1e-3,
        "max_steps": 1,
        "mini_batches_per_step": 2,
        "checkpoint_every": 1,
        "gspo": GSPOConfig(epsilon_low=0.2, epsilon_high=0.2),
        "hints": HintConfig(rollouts_per_level=G, max_level=3),
        "seed": 7,
    }
    return GSPOStageConfig(**(args | overrides))


def weights(path) -> dict[str, torch.Tensor]:
    return load_keye_checkpoint(path).state_dict()


# ---------------------------------------------------------------------------------------------- pieces


def test_config_is_validated():
    for overrides, match in (
        ({"group_size": 1}, "group_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"mini_batches_per_step": 13}, "more than the 12 responses"),
        ({"hints": HintConfig(rollouts_per_level=8)}, "rollouts_per_level=8 must equal group_size=4"),
        ({"success_threshold": 0.7}, "one rule decides a success"),
        ({"gspo": {"epsilon_low": 0.1}}, "must be a GSPOConfig"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
    ):
        with pytest.raises(ValueError, match=match):
            stage(**overrides)
    assert stage(hints=None).hints is None


def test_completions_carry_their_sampled_token_ids(generator, tokenizer):
    out = generator.generate(
        [TEXT_ITEMS[0]["messages"], IMAGE_ITEM["messages"]],
        n=G,
        max_new_tokens=MAX_NEW,
        temperature=1.0,
        seed=1,
        logprobs=True,
    )
    for group in out:
        assert len(group) == G
        for c in group:
            assert len(c.token_ids) == len(c.tokens) == len(c.token_logprobs) >= 1
            assert tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
    assert generator.generate([TEXT_ITEMS[0]["messages"]], n=1, max_new_tokens=4, temperature=1.0, seed=1,
                              logprobs=False)[0][0].token_ids == out[0][0].token_ids[:4]  # fmt: skip


def test_step_items_cover_each_epoch_without_repeats():
    items = [{"id": str(i)} for i in range(7)]
    steps = [[i["id"] for i in step_items(items, s, 3, seed=1)] for s in range(4)]  # 2 steps per epoch
    for epoch in (steps[:2], steps[2:]):
        flat = epoch[0] + epoch[1]
        assert len(set(flat)) == 6
    assert steps[:2] != steps[2:]  # a fresh order each epoch
    assert step_items(items, 3, 3, seed=1) == step_items(items, 3, 3, seed=1)


def test_rule_reward_fn_reads_the_item_row():
    reward = rule_reward_fn()
    assert reward(TEXT_ITEMS[0], "<think>one two three</think><answer>3</answer>").value == 1.0
    assert reward(TEXT_ITEMS[0], "<think>hm</think><answer>4</answer>").value < 0.5


# ---------------------------------------------------------------------------------------------- GSPO


def test_gspo_step_mechanics(init_dir, tmp_path):
    calls: dict[str, int] = {}

    def reward(item, response):
        calls[item["id"]] = calls.get(item["id"], 0) + 1
        return letter_share(response)

    items = [*TEXT_ITEMS, IMAGE_ITEM]
    result = train_gspo(
        stage(),
        init=init_dir,
        items=items,
        reward_fn=reward,
        out_dir=tmp_path / "run",
        media_lookup=media_lookup,
    )
    assert calls == {item["id"]: G for item in items}  # G rollouts scored per prompt, no hint sampling
    [record] = result.history
    assert record["num_active_responses"] == 3 * G  # every group's rewards vary
    first, second = record["updates"]
    # Old log-probs are the policy before the update: the first mini-batch's ratio is exactly 1 ...
    assert first["max_abs_log_ratio"] == 0.0 and first["mean_ratio"] == 1.0
    # ... and the second mini-batch sees the policy the first update moved.
    assert second["max_abs_log_ratio"] > 0
    assert record["num_updates"] == 2 and 0.0 <= record["clip_fraction"] <= 1.0
    assert record["sampler_logprob_gap"] < 1e-3  # the sampler and the trainer score the same inputs
    assert record["hint_levels"] == {item["id"]: 0 for item in items}
    for key in ("time_rollout", "time_reward", "time_update", "reward_mean", "pass_rate"):
        assert record[key] >= 0
    before, after = weights(init_dir), weights(result.checkpoint_dir / "model")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any(n.startswith("lm_head") for n in changed) and any(n.startswith("vision") for n in changed)
    hints = json.loads((tmp_path / "run" / "hints" / "step-00000001.json").read_text())
    assert set(hints["items"]) == {item["id"] for item in items}
    assert all(entry["level"] == 0 and set(entry["pass_rates"]) == {"0"} for entry in hints["items"].values())


def test_equal_rewards_give_zero_advantages_and_no_update(init_dir, tmp_path):
    result = train_gspo(
        stage(),
        init=init_dir,
        items=[*TEXT_ITEMS, IMAGE_ITEM],
        reward_fn=lambda item, r: 1.0,
        out_dir=tmp_path / "run",
        media_lookup=media_lookup,
    )
    [record] = result.history
    assert record["num_active_responses"] == 0 and record["num_updates"] == 0 and record["pass_rate"] == 1.0
    before, after = weights(init_dir), weights(result.checkpoint_dir / "model")
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_completion_holding_a_vision_pad_is_left_out_of_the_update(tokenizer, tmp_path):
    # A policy that writes <|image_pad|> with probability 0.06 at every step: the decoder layers add nothing,
    # every token embeds as the same vector, so the next-token distribution is one fixed softmax.
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(tiny(tokenizer))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.language_model.embed_tokens.weight.fill_(1.0)
        pad = model.config.image_token_id
        hidden = model.language_model.norm.weight  # ones: the final hidden state is this vector
        logits = model.lm_head.weight @ hidden
        others = torch.logsumexp(torch.cat([logits[:pad], logits[pad + 1 :]]), dim=0)
        model.lm_head.weight[pad] = hidden * float(others + math.log(0.06 / 0.94)) / float(hidden @ hidden)
    model.save_pretrained(tmp_path / "init")
    result = train_gspo(
        stage(prompts_per_step=2, mini_batches_per_step=1, hints=None),
        init=tmp_path / "init",
        items=TEXT_ITEMS,
        reward_fn=letter_reward,
        out_dir=tmp_path / "run",
    )
    [record] = result.history
    # P(no pad in 8 tokens) = 0.94^8 ≈ 0.61: some of the 8 responses hold one, most do not.
    assert 0 < record["num_unscorable_responses"] < 2 * G
    assert record["num_active_responses"] == 2 * G - record["num_unscorable_responses"]
    assert record["num_updates"] == 1 and math.isfinite(record["loss"])


def test_hints_train_on_the_minimal_successful_level(init_dir, tmp_path):
    # Item → the weakest hint level with which the (constructed) reward can pass; rewards vary above it.
    needs = {"easy": 0, "needs-2": 2, "never": 9, "no-hints": 1}
    items = [{"id": item_id, "messages": user(f"Question {item_id}: what is it? /think"),
              **({"hints": {k: f"level-{k} idea" for k in range(1, 6)}} if item_id != "no-hints" else {})}
             for item_id in needs]  # fmt: skip
    seen: list[tuple[str, int]] = []

    def reward(item, response):
        found = re.search(r"Hint: level-(\d)", item["messages"][-1]["content"])
        level = int(found.group(1)) if found else 0
        seen.append((item["id"], level))
        return 0.5 + 0.5 * letter_share(response) if level >= needs[item["id"]] else 0.0

    result = train_gspo(
        stage(prompts_per_step=4, mini_batches_per_step=1),
        init=init_dir,
        items=items,
        reward_fn=reward,
        out_dir=tmp_path / "run",
    )
    [record] = result.history
    assert record["hint_levels"] == {"easy": 0, "needs-2": 2, "never": None, "no-hints": None}
    assert (record["num_hinted"], record["num_unsolved"], record["num_all_fail"]) == (1, 2, 3)
    report = json.loads((tmp_path / "run" / "hints" / "step-00000001.json").read_text())["items"]
    assert report["needs-2"]["pass_rates"] == {"0": 0.0, "1": 0.0, "2": 1.0}
    assert report["needs-2"]["hint"] == "level-2 idea"
    assert report["never"]["pass_rates"] == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0}  # up to max_level=3
    assert report["no-hints"] == {"level": None, "pass_rates": {"0": 0.0}, "note": "item has no hints"}
    # Each level's G rollouts are scored once (level 0 is the step's own rollouts, not sampled again) ...
    assert sorted(seen) == sorted(
        [("easy", 0)] * G
        + [("needs-2", k) for k in (0, 1, 2) for _ in range(G)]
        + [("never", k) for k in (0, 1, 2, 3) for _ in range(G)]
        + [("no-hints", 0)] * G
    )
    # ... and the update trains on "easy" and on "needs-2" at level 2 (the all-failed groups carry no signal).
    assert record["num_active_responses"] == 2 * G


def test_a_failed_group_is_retried_with_the_items_own_hints_at_the_minimal_level_and_the_level_is_recorded(
    init_dir, tmp_path, home
):
    """RL items from the LongCoT questions carry hints L1-L5 derived from their reference solutions; a group
    that fails gets hinted rollouts level by level and trains at the lowest level with a success; the level
    per item is in the step's hint file, in the metrics (per level counts) and in ``rl_hint_levels``."""
    questions = generate_longcot_questions(tmp_path / "questions")  # text questions only: no media given
    collect_questions([str(questions["text"])], str(tmp_path))
    by_text = {
        i["messages"][-1]["content"].removesuffix(" /think"): i
        for i in longcot_rl_items(tables.ref("longcot_questions"))
    }
    easy, step = by_text["What is 1 divided by 2?"], by_text["Solve for x: 3x + 5 = 20."]
    answer = by_text["What is 15% of 240?"]
    # The constructed reward passes "easy" unhinted, "step" once the prompt carries its first worked step (L4)
    # and "answer" only once the prompt gives the answer away (L5, the only level that states it).
    needs = {
        easy["id"]: None,
        step["id"]: step["hints"]["L4"],
        answer["id"]: f"The answer is {answer['reference']}.",
    }

    def reward(item, response):
        needed = needs[item["id"]]
        return (
            0.5 + 0.5 * letter_share(response)
            if needed is None or needed in item["messages"][-1]["content"]
            else 0.0
        )

    result = train_gspo(
        stage(
            prompts_per_step=3, mini_batches_per_step=1, hints=HintConfig(rollouts_per_level=G, max_level=5)
        ),
        init=init_dir,
        items=[easy, step, answer],
        reward_fn=reward,
        out_dir=tmp_path / "run",
    )
    [record] = result.history
    assert record["hint_levels"] == {easy["id"]: 0, step["id"]: 4, answer["id"]: 5}
    assert [record[f"num_hint_level_{k}"] for k in range(6)] == [1, 0, 0, 0, 1, 1]
    report = json.loads((tmp_path / "run" / "hints" / "step-00000001.json").read_text())["items"]
    assert report[step["id"]]["hint"] == step["hints"]["L4"]
    assert report[answer["id"]]["pass_rates"] == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0, "5": 1.0}
    assert record_hint_levels(tmp_path / "run", "run-1", "gspo-test") == 3
    assert record_hint_levels(tmp_path / "run", "run-1", "gspo-test") == 3  # a rerun adds no second row
    levels = sql.query("select item_id, level, step, stage from rl_hint_levels order by level")
    assert levels.values.tolist() == [
        [easy["id"], 0, 1, "gspo-test"], [step["id"], 4, 1, "gspo-test"], [answer["id"], 5, 1, "gspo-test"]
    ]  # fmt: skip


def test_checkpoint_resume_continues_like_an_uninterrupted_run(init_dir, tmp_path, home):
    items = [*TEXT_ITEMS, IMAGE_ITEM, {"id": "pears", "messages": user("Count the pears. /think")}]
    config = stage(prompts_per_step=2, mini_batches_per_step=2, hints=None)
    run_id = lineage.start_run("gspo-test")
    first = train_gspo(
        dataclasses.replace(config, max_steps=2),
        init=init_dir,
        items=items,
        reward_fn=letter_reward,
        out_dir=tmp_path / "run",
        sink=lineage.RunSink(run_id),
        media_lookup=media_lookup,
    )
    assert (first.step, first.resumed_from_step) == (2, None)
    assert (tmp_path / "run" / LATEST).read_text().strip() == "step-00000002"
    # Fresh run over the same out_dir with more steps: resumes from step 2 (a "kill" after step 2's
    # checkpoint).
    resumed = train_gspo(
        dataclasses.replace(config, max_steps=3),
        init=init_dir,
        items=items,
        reward_fn=letter_reward,
        out_dir=tmp_path / "run",
        sink=lineage.RunSink(run_id),
        media_lookup=media_lookup,
    )
    assert (resumed.step, resumed.resumed_from_step) == (3, 2)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    straight = train_gspo(
        dataclasses.replace(config, max_steps=3),
        init=init_dir,
        items=items,
        reward_fn=letter_reward,
        out_dir=tmp_path / "straight",
        media_lookup=media_lookup,
    )
    assert [r["reward_mean"] for r in resumed.history] == [r["reward_mean"] for r in straight.history]
    a, b = weights(resumed.checkpoint_dir / "model"), weights(straight.checkpoint_dir / "model")
    assert all(torch.equal(a[name], b[name]) for name in a)
    history = lineage.client().get_metric_history(run_id, "reward_mean")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert len(lineage.client().get_metric_history(run_id, "time_rollout")) == 3
    with pytest.raises(ValueError, match="another item list"):
        train_gspo(
            dataclasses.replace(config, max_steps=4),
            init=init_dir,
            items=items[:3],
            reward_fn=letter_reward,
            out_dir=tmp_path / "run",
            media_lookup=media_lookup,
        )


# ---------------------------------------------------------------------------------------------- consistency


VIDEO_AND_IMAGE = user(
    [
        {"type": "video", "seed": 3},
        {"type": "image", "seed": 4},
        {"type": "text", "text": "What happens in the clip, and what is in the picture?"},
    ]
)


def test_rollout_and_training_inputs_agree_on_image_and_video(generator):
    features = check_rollout_training_inputs(generator, VIDEO_AND_IMAGE, "A ball rolls; a cat sits.")
    assert features.grid_thw.tolist() == [[1, 4, 4], [1, 2, 4], [1, 4, 4], [1, 4, 6]]
    assert features.pixel_values.shape[0] == 16 + 8 + 16 + 24
    check_rollout_training_inputs(generator, IMAGE_ITEM["messages"], "a cat")


class FlatPositionGenerator(LocalGenerator):
    """A rollout path that forgets 3D RoPE: positions are token indices in every stream."""

    def encode_prompt(self, messages):
        features = super().encode_prompt(messages)
        features.position_ids = torch.arange(len(features)).expand(3, -1).clone()
        return features


def test_consistency_check_names_the_first_difference(generator, init_dir):
    with pytest.raises(RolloutInputMismatch, match=r"pixel_values at \(0, 0\)") as error:
        check_rollout_training_inputs(
            generator,
            VIDEO_AND_IMAGE,
            "ok",
            media_lookup=lambda part: media_lookup(dict(part, seed=part["seed"] + 10)),
        )
    assert error.value.field == "pixel_values"

    # The trainer reads the video with other timestamps: the timestamp text tokens differ.
    def other_times(part):
        return video_patches(part["seed"], (0.0, 0.7, 1.0)) if part["type"] == "video" else media_lookup(part)

    with pytest.raises(RolloutInputMismatch, match="input_ids"):
        check_rollout_training_inputs(generator, VIDEO_AND_IMAGE, "ok", media_lookup=other_times)
    flat = FlatPositionGenerator(init_dir, media_lookup=media_lookup)
    with pytest.raises(RolloutInputMismatch, match="position_ids") as error:
        check_rollout_training_inputs(flat, VIDEO_AND_IMAGE, "ok")
    stream, index = error.value.position
    prompt = generator.encode_prompt(VIDEO_AND_IMAGE)
    vision = torch.isin(prompt.input_ids, torch.tensor([generator.model.config.video_token_id]))
    # The first vision token sits where text would; the second is the first whose 3D position differs.
    assert (stream, index) == (0, int(vision.nonzero()[0]) + 1)


# ---------------------------------------------------------------------------------------------- loop


def test_pass_rate_filter_keeps_items_strictly_between_0_and_1(generator):
    items = [
        *TEXT_ITEMS,
        IMAGE_ITEM,
        {"id": "mixed", "messages": user("Name a colour.")},
        {"id": "broken", "messages": user([{"type": "image", "seed": 1}, {"type": "text", "text": "?"}])},
    ]
    counts: dict[str, int] = {}

    def reward(item, response):  # apples: always right; boat: never; mixed: right on its first rollout only
        counts[item["id"]] = counts.get(item["id"], 0) + 1
        return {"apples": 1.0, "boat": 0.0, "mixed": float(counts.get("mixed") == 1)}[item["id"]]

    no_media = LocalGenerator(generator.model, generator.tokenizer)  # cannot read the images
    result = pass_rate_filter(
        no_media, [items[0], items[1], items[3], items[4]], G, reward, max_new_tokens=4, max_error_share=0.25
    )
    assert [item["id"] for item in result.kept] == ["mixed"] and result.kept[0]["pass_rate"] == 0.25
    assert result.pass_rates == {"apples": 1.0, "boat": 0.0, "mixed": 0.25, "broken": None}
    reasons = {r.item_id: r.reason for r in result.records}
    assert reasons["apples"].startswith("too easy") and reasons["boat"].startswith("too hard")
    assert "generation failed" in reasons["broken"] and "media_lookup" in reasons["broken"]
    with pytest.raises(ValueError, match="at least 2"):
        pass_rate_filter(no_media, items[:1], 1, reward)


def test_rejection_sampling_round_replaces_references_it_prefers(generator):
    rows = [{"id": "better", "messages": [*user("Say something long."),
                                          {"role": "assistant", "content": "x"}]},
            {"id": "wrong", "messages": [*user("Say nothing."), {"role": "assistant", "content": "ok"}]},
            {"id": "worse", "messages": [*user("Say a lot."),
                                         {"role": "assistant", "content": "a reference far longer than any "
                                          "eight-token sample could ever get to be, surely"}]}]  # fmt: skip
    verified: dict[str, list[str]] = {}

    def verify(row, response):
        ok = row["id"] != "wrong" and bool(response)
        if ok:
            verified.setdefault(row["id"], []).append(response)
        return ok

    def prefer(candidate, incumbent):  # a stand-in for the reward model: longer is better
        return len(candidate) > len(incumbent)

    out = rejection_sampling_round(generator, rows, verify, prefer, k=3, max_new_tokens=MAX_NEW, seed=2)
    assert [r.replaced for r in out.records] == [True, False, False] and out.num_replaced == 1
    better = out.rows[0]["messages"]
    assert better[:-1] == rows[0]["messages"][:-1]
    assert better[-1] == {"role": "assistant", "content": max(verified["better"], key=len)}
    assert (
        out.records[0].previous_reference == "x" and "preferred over the reference" in out.records[0].reason
    )
    assert out.rows[1] == rows[1] and out.records[1].reason == "none of 3 samples verified correct"
    assert out.rows[2] == rows[2] and "none preferred" in out.records[2].reason
    assert (out.records[0].num_sampled, out.records[1].num_verified) == (3, 0)
    with pytest.raises(ValueError, match="must end with the reference assistant"):
        rejection_sampling_round(generator, [{"id": "q", "messages": user("hi")}], verify, prefer, k=2)


# ------------------------------------------------------------------------------------ the packed update


def sampled_part(generator: LocalGenerator, items: list[dict]) -> list[tuple]:
    """The G sampled responses of each item as `_updates` trains them (inputs, advantage, completion, prompt
    key), with advantages that are all non-zero."""
    sampled = generator.generate(
        [i["messages"] for i in items], n=G, max_new_tokens=MAX_NEW, temperature=1.0, seed=5, logprobs=True
    )
    part = []
    for key, (item, completions) in enumerate(zip(items, sampled)):
        prompt = generator.encode_prompt(item["messages"])
        for j, completion in enumerate(completions):
            advantage = (j - (G - 1) / 2) / G
            part.append((completion_features(prompt, completion.token_ids), advantage, completion, key))
    return part


def update_gradients(config: GSPOStageConfig, init_dir, part: list[tuple]) -> tuple[dict, dict]:
    """The gradients of one GSPO update over `part` (one mini-batch, the KL term on, so the reference is
    scored as well) and the update's statistics."""
    dist = distributed.setup()
    engine = Engine(load_keye_checkpoint(init_dir), dist=dist, learning_rate=1e-3, lr_at=lambda _: 1e-3,
                    grad_clip=0.0, train_mode=False)  # fmt: skip
    reference = load_keye_checkpoint(init_dir).eval().requires_grad_(False)
    grads = {}

    def step() -> float:
        grads.update({n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None})
        return 0.0

    engine.step = step
    [update], _ = rl._updates(config, engine, reference, [part], len(part))
    return grads, update


def test_token_budget_micro_batches_give_the_one_batch_gradients(generator, init_dir):
    part = sampled_part(generator, [TEXT_ITEMS[0], IMAGE_ITEM, TEXT_ITEMS[1]])
    config = stage(mini_batches_per_step=1, gspo=GSPOConfig(epsilon_low=0.2, epsilon_high=0.2, kl_coef=0.1))
    lengths = [len(f) for f, *_ in part]
    budget = max(lengths) + min(lengths)  # the longest (an image prompt's) response fits, text ones pack
    cuts = rl.micro_batches(part, budget)
    assert len(cuts) >= 3 and any(len(rows) > 1 for rows in cuts)  # really several packed micro-batches
    one, one_update = update_gradients(config, init_dir, part)
    micro, micro_update = update_gradients(
        dataclasses.replace(config, max_tokens_per_micro_batch=budget), init_dir, part
    )
    assert one.keys() == micro.keys() and any(n.startswith("vision") for n in one)
    for name, grad in one.items():
        torch.testing.assert_close(micro[name], grad, rtol=0, atol=1e-6, msg=name)
    assert max(g.abs().max() for g in one.values()) > 1e-3  # gradients large enough for 1e-6 to mean much
    for key in ("loss", "mean_ratio", "kl", "clip_fraction"):
        assert micro_update[key] == pytest.approx(one_update[key], rel=1e-6, abs=1e-7), key
    with pytest.raises(ValueError, match="longer than GSPOStageConfig.max_tokens_per_micro_batch=5"):
        rl.micro_batches(part, 5)


def test_the_vit_once_per_prompt_gives_the_per_response_loss_and_gradients(generator, init_dir):
    part = sampled_part(generator, [IMAGE_ITEM, TEXT_ITEMS[0]])
    model = load_keye_checkpoint(init_dir).double().eval()
    config = GSPOConfig(epsilon_low=0.2, epsilon_high=0.2)
    advantages = torch.tensor([a for _, a, _, _ in part], dtype=torch.float64)
    features = [f for f, *_ in part]

    def gradients() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    # The ViT on every response's copy of the pixels, one forward.
    logps, mask = rl.packed_completion_logprobs(model, features)
    per_response = gspo_loss(config, logps, advantages, mask, old_logps=logps.detach() - 0.01)
    per_response.loss.backward()
    expected = gradients()

    # The ViT once per prompt, shared by its responses over two micro-batches, its backward once.
    vision = rl.PromptVision(model, part, grad=True)
    assert list(vision.prompts) == [0]  # only the image prompt has pixels
    loss = 0.0
    for rows in (range(3), range(3, len(part))):  # the image prompt's 4 responses span both micro-batches
        keys = [part[i][3] for i in rows]
        logps, mask = rl.packed_completion_logprobs(
            model, [features[i] for i in rows], vision_embeddings=vision.embeddings(keys)
        )
        out = gspo_loss(config, logps, advantages[list(rows)], mask, old_logps=logps.detach() - 0.01)
        (out.loss * len(rows) / len(part)).backward()
        loss += out.loss.item() * len(rows) / len(part)
        vision.done(keys)
        assert (0 in vision.leaves) == (
            rows[0] == 0
        )  # the ViT's backward waits for the prompt's last response
    shared = gradients()

    assert loss == pytest.approx(per_response.loss.item(), rel=1e-12)
    assert shared.keys() == expected.keys() and any(n.startswith("vision") for n in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_gspo_with_a_token_budget_trains_as_the_one_batch_update(init_dir, tmp_path):
    items = [*TEXT_ITEMS, IMAGE_ITEM]
    runs = {
        budget: train_gspo(stage(hints=None, max_tokens_per_micro_batch=budget), init=init_dir, items=items,
                           reward_fn=letter_reward, out_dir=tmp_path / str(budget), media_lookup=media_lookup)
        for budget in (None, 64)
    }  # fmt: skip
    [one], [micro] = runs[None].history, runs[64].history
    assert micro["num_active_responses"] == one["num_active_responses"] == 3 * G
    for first, second in zip(one["updates"], micro["updates"], strict=True):
        for key in ("loss", "mean_ratio", "grad_norm", "clip_fraction"):
            assert second[key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), key
    assert micro["updates"][0]["max_abs_log_ratio"] == 0.0  # the first mini-batch's ratio is still exactly 1
    state = json.loads((runs[64].checkpoint_dir / "state.json").read_text())
    assert state["config"]["max_tokens_per_micro_batch"] == 64
    assert (
        "max_tokens_per_micro_batch"
        not in json.loads((runs[None].checkpoint_dir / "state.json").read_text())["config"]
    )  # off: the config (and its hash) is what it was before the field existed


def test_rejection_sampling_round_takes_a_judge_that_reads_the_rows_batch_by_batch(generator):
    """`rows_prefer_fn([(row, candidate, incumbent), ...])` (a judge told each row's question, asked once per
    challenge position with every row's challenge there) gives the round `prefer_fn` gives row by row, every
    row sampled in the one generate call; a failed judgement fails only its own row."""
    rows = [
        dict(item, messages=[*item["messages"], {"role": "assistant", "content": "ref"}])
        for item in TEXT_ITEMS
    ]
    calls: list[list[str]] = []

    def rows_prefer(challenges):
        calls.append([row["id"] for row, _, _ in challenges])
        return [len(candidate) > len(incumbent) for _, candidate, incumbent in challenges]

    args = {"k": 3, "max_new_tokens": 6, "seed": 5, "verify_fn": lambda row, text: len(text) % 2 == 0}
    batched = rejection_sampling_round(generator, rows, prefer_fn=None, rows_prefer_fn=rows_prefer, **args)
    plain = rejection_sampling_round(generator, rows, prefer_fn=lambda a, b: len(a) > len(b), **args)
    assert batched.rows == plain.rows and batched.records == plain.records
    verified = [r.num_verified for r in batched.records]
    # One call per challenge position, each holding the rows with that many verified samples.
    assert len(calls) == max(verified) >= 1
    assert [len(c) for c in calls] == [sum(v > j for v in verified) for j in range(max(verified))]
    assert sum(len(c) for c in calls) == sum(verified) and all(len(set(c)) == len(c) for c in calls)

    judged = next(n for n, v in enumerate(verified) if v)  # a row that reaches the judge

    def one_row_fails(challenges):
        return [
            ValueError("judge said nothing") if row["id"] == rows[judged]["id"] else len(c) > len(i)
            for row, c, i in challenges
        ]

    out = rejection_sampling_round(
        generator, rows, prefer_fn=None, rows_prefer_fn=one_row_fails, max_error_share=1.0, **args
    )
    assert out.records[judged].failed and out.rows[judged] == rows[judged]
    assert "judgement failed: ValueError: judge said nothing" in out.records[judged].reason
    others = [n for n in range(len(rows)) if n != judged]
    assert [out.records[n] for n in others] == [plain.records[n] for n in others]
    assert [out.rows[n] for n in others] == [plain.rows[n] for n in others]

    def refuses_the_batch(challenges):  # a judge that raises for a whole batch holding the bad row
        if any(row["id"] == rows[judged]["id"] for row, _, _ in challenges):
            raise ValueError("bad row in the batch")
        return [len(c) > len(i) for _, c, i in challenges]

    out = rejection_sampling_round(
        generator, rows, prefer_fn=None, rows_prefer_fn=refuses_the_batch, max_error_share=1.0, **args
    )
    assert out.records[judged].failed
    assert "judgement failed: ValueError: bad row" in out.records[judged].reason
    assert [out.records[n] for n in others] == [plain.records[n] for n in others]
    with pytest.raises(ValueError, match="exactly one"):
        rejection_sampling_round(generator, rows, prefer_fn=None, **args)
