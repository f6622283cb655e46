"""Preference pairs, MPO and the reward model with real parts: the tiny random model saved with
save_pretrained, the OpenAI-compatible server (`python -m keyeflow.model.serving`) and the synthetic
teacher's server with fixed replies (`keyeflow.synthetic.synthetic_teacher`) as real processes on 127.0.0.1,
real Lance tables and MLflow.

- pairs: sampled over HTTP from the fixed replies (canned answers, checked against references) and in process
  from the tiny model; every item without a pair is recorded with why;
- MPO: the loss falls and the reward margin grows on the training pairs; a resumed run equals an uninterrupted
  one bit for bit; metrics reach MLflow;
- the judge: the tiny model behind the real server writes nonsense, which becomes reasons, never an exception;
  well-formed outputs (fixed replies) are parsed and averaged over both orders; and the reward model trained
  for a few steps with the stage trainer learns to write a verdict the parser accepts."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from keyeflow import lineage
from keyeflow.datasets import tables
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.config import tiny
from keyeflow.model.generation import LocalGenerator, OpenAICompatibleGenerator
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches, collate, encode_sample
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.quality.errors import ScoringError
from keyeflow.quality.reward_model import (
    DIMENSION_NAMES,
    ComparisonRequest,
    RewardModelConfig,
    RewardModelJudge,
    build_reward_model_data,
)
from keyeflow.quality.rewards import RewardCombiner, RewardConfig, RewardItem
from keyeflow.synthetic import synthetic_teacher as chat_server
from keyeflow.training import distributed
from keyeflow.training.config import MPOStageConfig, StageConfig
from keyeflow.training.engine import LATEST, Engine, seed_everything
from keyeflow.training.losses import MPOConfig, RewardShift, mpo_loss
from keyeflow.training.preference import (
    PreferenceItem,
    build_preference_pairs,
    make_scorer,
    pair_indices,
    sequence_logprobs,
    train_mpo,
)
from keyeflow.training.reward_model_trainer import train_reward_model

REPO = Path(__file__).resolve().parents[2]

SERVED_NAME = "keye-tiny"


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init")
    KeyeForConditionalGeneration(tiny(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------- pairs


def pair_recordings() -> dict:
    def answers(*texts: str) -> list[dict]:
        return [{"text": t, "logprob": -0.1} for t in texts]

    return {"model": "replay-policy", "entries": [
        {"match": "What is 2+2?", "completions": answers(
            "<think>2 and 2 make 4.</think><answer>4</answer>", "<answer>5</answer>", "The answer is 4.")},
        {"match": "What is 3+4?", "completions": answers("<answer>6</answer>", "<answer>8</answer>")},
        {"match": "Say hello.", "completions": answers("Hello!")},
        {"match": "Describe the sky.", "completions": answers("It is blue.", "Blue, surely.")},
        {"match": "What is 5+5?", "completions": answers(
            "<answer>10</answer> (sure)", "<answer>10</answer>")},
        {"match": "What is 9+9?", "respond": {
            "status": 400, "body": {"error": {"message": "prompt refused"}}}},
    ]}  # fmt: skip


def test_pairs_from_a_served_policy_with_reference_checks_and_recorded_drops(tmp_path):
    items = [
        PreferenceItem("sum", user("What is 2+2?"), reference="4"),
        {"id": "all-wrong", "messages": user("What is 3+4?"), "reference": "7"},
        {"id": "identical", "messages": user("Say hello."), "reference": "hello"},
        PreferenceItem("no-reference", user("Describe the sky.")),
        PreferenceItem("close", user("What is 5+5?"), reference="10"),
        PreferenceItem("refused", user("What is 9+9?"), reference="18"),
    ]

    def reward_model(item: RewardItem, response: str) -> tuple[float, str]:
        return (0.9, "confident") if "sure" in response else (0.1, "hedged")

    with chat_server.start_server(pair_recordings(), tmp_path / "replay") as (url, _):
        generator = OpenAICompatibleGenerator(url, "replay-policy", timeout=10, max_retries=0)
        pairs, records = build_preference_pairs(
            generator, items, n=3, scorer=make_scorer(), min_margin=0.5, seed=1, max_error_share=0.5
        )
        # the reward model as a tie-breaker: the two right answers of "close" differ by 0.1 · 0.8 only
        close, close_records = build_preference_pairs(
            generator,
            items[4:5],
            n=2,
            scorer=make_scorer(reward_model, model_weight=0.1),
            min_margin=0.05,
            seed=1,
        )

    assert len(pairs) == 1
    pair = pairs[0]
    assert pair["item_id"] == pair["pair_id"] == "sum" and pair["messages"] == user("What is 2+2?")
    assert (
        pair["chosen"] == "<think>2 and 2 make 4.</think><answer>4</answer>"
    )  # ties go to the earlier sample
    assert pair["rejected"] == "<answer>5</answer>"
    assert (pair["chosen_score"], pair["rejected_score"], pair["margin"]) == (1.0, 0.0, 1.0)
    assert pair["scores"] == [1.0, 0.0, 1.0] and pair["reference"] == "4" and pair["num_responses"] == 3
    assert "best of 3 1.000" in pair["reason"] and "margin 1.000 >= 0.5" in pair["reason"]
    reasons = {r["item_id"]: r["reason"] for r in records}
    assert set(reasons) == {"all-wrong", "identical", "no-reference", "close", "refused"}
    assert reasons["all-wrong"] == "all 3 responses scored alike (0.000)"
    assert reasons["identical"] == "all 3 scored responses are identical"
    # a response that cannot be scored fails its item (no pair from the others), recorded as failed
    assert reasons["no-reference"] == (
        "scoring failed for response 0 of 3: ValueError: item 'no-reference' has no reference and "
        "no reward model"
    )
    assert {r["item_id"] for r in records if r["failed"]} == {"no-reference", "refused"}
    assert reasons["close"] == "all 3 responses scored alike (1.000)"
    assert (
        reasons["refused"].startswith("generation failed: GenerationServerError")
        and "prompt refused" in reasons["refused"]
    )
    assert close_records == [] and close[0]["chosen"] == "<answer>10</answer> (sure)"
    assert close[0]["margin"] == pytest.approx(0.08) and "reward model 0.90: confident" in close[0]["reason"]


def test_pairs_from_the_tiny_model_in_process_record_why_none_formed(init_dir):
    # The random model never stops by itself within 4 tokens: no response is complete enough to be chosen;
    # an image the generator cannot look up fails its own item only.
    items = [
        PreferenceItem("text", user("What is 2+2?"), reference="4"),
        PreferenceItem(
            "image",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "x.png"},
                        {"type": "text", "text": "What is shown?"},
                    ],
                }
            ],
        ),
    ]
    pairs, records = build_preference_pairs(
        LocalGenerator(init_dir),
        items,
        n=2,
        max_new_tokens=4,
        scorer=lambda item, response: float(len(response)),
        min_margin=0.0,
        seed=0,
        max_error_share=0.5,
    )
    assert pairs == []
    reasons = {r["item_id"]: r["reason"] for r in records}
    assert reasons["text"] == "no complete response: all 2 hit max_new_tokens"
    assert reasons["image"].startswith("generation failed: ValueError: image part found but no media_lookup")
    with pytest.raises(ValueError, match="n=1: must be an integer >= 2"):
        build_preference_pairs(
            LocalGenerator(init_dir), items, n=1, scorer=make_scorer(), min_margin=0, seed=0
        )
    with pytest.raises(ValueError, match="the last message must be the user's"):
        PreferenceItem("x", [*user("hi"), {"role": "assistant", "content": "hello"}])


# ---------------------------------------------------------------------------------------------- MPO

MPO_PAIRS = [
    {
        "messages": user(f"What is {i}+{i}?"),
        "chosen": f"The answer is {2 * i}.",
        "rejected": f"I think it might be {2 * i + 1}, not sure.",
    }
    for i in range(4)
]


def mpo_config(max_steps: int) -> MPOStageConfig:
    return MPOStageConfig(
        learning_rate=3e-3,
        max_steps=max_steps,
        pairs_per_step=4,
        max_length=64,
        checkpoint_every=2,
        mpo=MPOConfig(),
    )


def test_mpo_config_is_validated_with_clear_errors():
    with pytest.raises(ValueError, match=r"MPOStageConfig.pairs_per_step=0: must be >= 1"):
        MPOStageConfig(learning_rate=1e-3, max_steps=2, pairs_per_step=0, max_length=64)
    with pytest.raises(ValueError, match=r"MPOStageConfig.learning_rate=0: must be a finite number > 0"):
        MPOStageConfig(learning_rate=0, max_steps=2, pairs_per_step=1, max_length=64)
    with pytest.raises(ValueError, match=r"warmup_steps=3: must be <= max_steps"):
        MPOStageConfig(learning_rate=1e-3, max_steps=2, pairs_per_step=1, max_length=64, warmup_steps=3)
    with pytest.raises(ValueError, match=r"MPOStageConfig.mpo=\{\}: must be an MPOConfig"):
        MPOStageConfig(learning_rate=1e-3, max_steps=2, pairs_per_step=1, max_length=64, mpo={})
    assert (
        MPOStageConfig(learning_rate=1, max_steps=4, pairs_per_step=1, max_length=8, warmup_steps=2).lr_at(0)
        == 0.5
    )


def pair_margins(policy_dir: Path, init_dir: Path, pairs: list[dict]) -> list[float]:
    """β-free implicit reward margins: (log π − log π_ref)(chosen) − (log π − log π_ref)(rejected), per
    pair."""
    tokenizer = load_tokenizer()
    rows = [
        encode_sample(p["messages"] + [{"role": "assistant", "content": p[key]}], tokenizer)
        for p in pairs
        for key in ("chosen", "rejected")
    ]
    batch = collate(rows, pack=False, pad_token_id=tokenizer.pad_token_id or 0)
    with torch.no_grad():
        policy, _ = sequence_logprobs(load_keye_checkpoint(policy_dir).eval(), batch)
        reference, _ = sequence_logprobs(load_keye_checkpoint(init_dir).eval(), batch)
    ratio = policy - reference
    return (ratio[0::2] - ratio[1::2]).tolist()


def test_mpo_loss_falls_margin_grows_and_a_resume_continues_bit_for_bit(init_dir, tmp_path, home):
    run_id = lineage.start_run("mpo-test")
    full = train_mpo(
        mpo_config(4), init=init_dir, pairs=MPO_PAIRS, out_dir=tmp_path / "full", sink=lineage.RunSink(run_id)
    )
    assert full.step == 4 and len(full.losses) == 4 and [m["step"] for m in full.metrics] == [1, 2, 3, 4]
    margins = [m["reward_margin"] for m in full.metrics]
    assert margins[0] == 0.0  # step 1 scores the pairs before any update: policy = reference
    assert all(later > earlier for earlier, later in itertools.pairwise(margins))
    assert full.losses[-1] < full.losses[0] and full.metrics[-1]["reward_accuracy"] == 1.0
    assert {"loss", "dpo", "bco", "sft", "reward_margin", "reward_accuracy", "bco_shift"} <= set(
        full.metrics[0]
    )
    assert all(margin > 0 for margin in pair_margins(full.checkpoint_dir / "model", init_dir, MPO_PAIRS))
    assert (tmp_path / "full" / LATEST).read_text().strip() == "step-00000004"
    state = json.loads((full.checkpoint_dir / "state.json").read_text())
    assert state["reward_shift"]["num_batches"] == 4 and state["init"] == str(init_dir)
    history = lineage.client().get_metric_history(run_id, "reward_margin")
    assert [m.step for m in history] == [1, 2, 3, 4] and history[-1].value == pytest.approx(margins[-1])

    # Interrupted after step 2: the metrics of a step 3 that never reached a checkpoint, and a half-written
    # checkpoint directory, are left behind. The resumed run drops both and continues exactly.
    out = tmp_path / "resumed"
    first = train_mpo(mpo_config(2), init=init_dir, pairs=MPO_PAIRS, out_dir=out)
    assert first.losses == full.losses[:2]
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    (out / ".tmp-step-00000003").mkdir()
    resumed = train_mpo(mpo_config(4), init=init_dir, pairs=MPO_PAIRS, out_dir=out)
    assert resumed.losses == full.losses  # bit for bit
    assert [m["reward_margin"] for m in resumed.metrics] == margins
    assert not (out / ".tmp-step-00000003").exists()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000002", "step-00000004"]
    with pytest.raises(ValueError, match="cannot resume: the checkpoint trained on other pairs"):
        train_mpo(mpo_config(6), init=init_dir, pairs=MPO_PAIRS[:3], out_dir=out)
    with pytest.raises(ValueError, match=r"pairs are longer than max_length=8: pair 0 \("):
        train_mpo(
            MPOStageConfig(learning_rate=1e-3, max_steps=1, pairs_per_step=1, max_length=8),
            init=init_dir,
            pairs=MPO_PAIRS,
            out_dir=tmp_path / "short",
        )


def mpo_with_a_reference_model(config: MPOStageConfig, init: Path, pairs: list[dict]) -> tuple[list, dict]:
    """The MPO loop as it ran before the reference log-probs were computed once: a frozen copy of `init` held
    beside the policy and run over every step's batch. Returns the losses and the final weights."""
    tokenizer = load_tokenizer()
    dist = distributed.setup()
    engine = Engine(
        load_keye_checkpoint(init),
        dist=dist,
        learning_rate=config.learning_rate,
        lr_at=config.lr_at,
        grad_clip=config.grad_clip,
    )
    reference = load_keye_checkpoint(init).eval().requires_grad_(False)
    seed_everything(config.seed)
    shift, losses = RewardShift(), []
    for step in range(config.max_steps):
        step_pairs = [pairs[i] for i in pair_indices(len(pairs), step, config.pairs_per_step, config.seed)]
        rows = [
            encode_sample(p["messages"] + [{"role": "assistant", "content": p[key]}], tokenizer)
            for p in step_pairs
            for key in ("chosen", "rejected")
        ]
        batch = collate(rows, pack=False, pad_token_id=tokenizer.pad_token_id or 0)
        logps, counts = sequence_logprobs(engine.forward, batch)
        with torch.no_grad():
            ref_logps, _ = sequence_logprobs(reference, batch)
        out = mpo_loss(
            config.mpo, logps[0::2], logps[1::2], ref_logps[0::2], ref_logps[1::2], counts[0::2],
            reward_shift=shift,
        )  # fmt: skip
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return losses, engine.model.state_dict()


def test_reference_logprobs_computed_once_give_the_losses_and_weights_of_a_held_reference_model(
    init_dir, tmp_path
):
    # Pairs of different lengths, 3 steps of 2 over 5 pairs: the third step mixes the first epoch's last pair
    # with the second epoch's first, so it is scored in a batch the reference pass never saw.
    pairs = [*MPO_PAIRS, {"messages": user("Name a colour."), "chosen": "Red.", "rejected": "A number, 7."}]
    config = MPOStageConfig(learning_rate=3e-3, max_steps=3, pairs_per_step=2, max_length=64)
    expected_losses, expected_weights = mpo_with_a_reference_model(config, init_dir, pairs)
    result = train_mpo(config, init=init_dir, pairs=pairs, out_dir=tmp_path / "mpo")
    assert result.losses == expected_losses
    weights = load_keye_checkpoint(result.checkpoint_dir / "model").state_dict()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)
    # The numbers travel with the checkpoint: one per response of every pair.
    state = json.loads((result.checkpoint_dir / "state.json").read_text())
    assert len(state["reference_logps"]) == len(pairs) and all(len(p) == 2 for p in state["reference_logps"])
    # A checkpoint written before the numbers were stored: the resume scores the pairs with a copy of init
    # and gets the same numbers.
    stored = state.pop("reference_logps")
    (result.checkpoint_dir / "state.json").write_text(json.dumps(state))
    resumed = train_mpo(
        dataclasses.replace(config, max_steps=4), init=init_dir, pairs=pairs, out_dir=tmp_path / "mpo"
    )
    assert resumed.losses[:3] == expected_losses
    assert json.loads((resumed.checkpoint_dir / "state.json").read_text())["reference_logps"] == stored


def test_mpo_trains_on_prompts_with_images_through_the_media_lookup(init_dir, tmp_path):
    image = {"type": "image", "image": "red-square.png"}
    pairs = [
        {
            "messages": [
                {"role": "user", "content": [image, {"type": "text", "text": "What colour is it?"}]}
            ],
            "chosen": "Red.",
            "rejected": "It is green, probably.",
        }
    ]
    config = MPOStageConfig(learning_rate=3e-3, max_steps=2, pairs_per_step=1, max_length=64)
    with pytest.raises(ValueError, match="image part found but no media_lookup was given"):
        train_mpo(config, init=init_dir, pairs=pairs, out_dir=tmp_path / "no-lookup")
    patches = np.random.default_rng(0).integers(0, 256, size=(4, 588), dtype=np.uint8)  # 2×2 patches: 1 token
    looked_up = []

    def lookup(part: dict) -> MediaPatches:
        looked_up.append(part["image"])
        return MediaPatches(patches=patches, grids=[(1, 2, 2)])

    result = train_mpo(config, init=init_dir, pairs=pairs, out_dir=tmp_path / "image", media_lookup=lookup)
    assert (
        result.step == 2 and result.metrics[-1]["reward_margin"] > 0 and set(looked_up) == {"red-square.png"}
    )


# ---------------------------------------------------------------------------------------------- judge


@pytest.fixture(scope="module")
def model_server(init_dir, tmp_path_factory, serve_model):
    """`python -m keyeflow.model.serving` around the tiny random model; yields its base URL (…/v1)."""
    with serve_model(init_dir, SERVED_NAME, tmp_path_factory.mktemp("server-log")) as url:
        yield url


def test_judge_through_the_real_server_turns_nonsense_into_reasons(model_server):
    generator = OpenAICompatibleGenerator(model_server, SERVED_NAME, timeout=60, max_retries=0)
    for mode in ("think", "no_think"):
        judge = RewardModelJudge(
            generator,
            RewardModelConfig(mode=mode),
            max_new_tokens=6,
            baseline=lambda item: "A baseline answer.",
        )
        # nonsense is a failure naming the query and the cause, never a 0.5 "tie"
        with pytest.raises(ScoringError) as failed:
            judge.reward(RewardItem(prompt="What is 2+2?", reference="4"), "4")
        assert str(failed.value).startswith(
            "reward model: query 'What is 2+2?': reward model no usable verdict "
            "(response as A: unusable output: "
        )
        assert str(failed.value).count("unusable output") == 2 and "0.5" not in str(failed.value)
        # one request the server cannot take (an internal image part) fails alone
        image_query = [{"type": "image", "image": "x.png"}, {"type": "text", "text": "What is shown?"}]
        text_result, image_result = judge.compare(
            [
                ComparisonRequest("Name a colour.", "Red.", "Blue."),
                ComparisonRequest(image_query, "A cat.", "A dog."),
            ]
        )
        assert all(p.startswith("unusable output: ") for p in text_result.problems)
        assert all(
            p.startswith("request failed (ValueError: conversation 0: an internal 'image' part")
            for p in image_result.problems
        )
        assert text_result.value is None and image_result.value is None
        # as RewardCombiner's reward_model for an item without a reference, against the baseline: it fails too
        combiner = RewardCombiner(
            RewardConfig(weights={"reward_model": 1.0}, check_format=False), reward_model=judge.reward
        )
        with pytest.raises(
            ScoringError,
            match=r"^reward_model: reward model: query 'Describe the sky.': reward model no usable",
        ):
            combiner(RewardItem(prompt="Describe the sky."), "It is blue.")
    without_competitor = RewardModelJudge(generator, RewardModelConfig(mode="no_think"))
    assert without_competitor.reward(RewardItem(prompt="Describe the sky."), "It is blue.") is None


def think_reply(a: int, b: int, verdict: str, drop: str | None = None) -> dict:
    lines = [f"{n}: A={a}, B={b}" for n in DIMENSION_NAMES if n != drop]
    return {
        "text": "<think>\nComparing both.\n" + "\n".join(lines) + f"\n</think>\nVerdict: {verdict}",
        "logprob": -0.1,
    }


def test_judge_parses_served_verdicts_and_averages_both_orders(tmp_path):
    recordings = {
        "model": "replay-judge", "default": {"text": "Verdict: perhaps", "logprob": -1.0}, "entries": [
        # a consistent judge: "4" wins in both positions
        {"match": "Response A:\n4\n\nResponse B:\n5", "completions": [think_reply(9, 2, "A")]},
        {"match": "Response A:\n5\n\nResponse B:\n4", "completions": [think_reply(2, 9, "B")]},
        # a position-biased judge: A always wins, scores equal
        {"match": "Response A:\nRed.", "completions": [think_reply(5, 5, "A")]},
        {"match": "Response A:\nBlue.", "completions": [think_reply(5, 5, "A")]},
        # one order malformed (a dimension missing), the other usable
        {"match": "Response A:\nC-A-T", "completions": [think_reply(8, 3, "A", drop="answer_form")]},
        {"match": "Response A:\nK-A-T", "completions": [think_reply(3, 8, "B")]},
    ]}  # fmt: skip
    with chat_server.start_server(recordings, tmp_path / "replay") as (url, requests_log):
        generator = OpenAICompatibleGenerator(url, "replay-judge", timeout=10, max_retries=0)
        judge = RewardModelJudge(
            generator, RewardModelConfig(mode="think", verdict_weight=0.5), baseline=lambda item: "5"
        )
        reward = judge.reward(RewardItem(prompt="What is 2+2?"), "4")
        biased, spelled, unknown = judge.compare(
            [
                ComparisonRequest("Name a colour.", "Red.", "Blue."),
                ComparisonRequest("Spell cat.", "C-A-T", "K-A-T"),
                ComparisonRequest("Anything?", "x", "y"),
            ]
        )
        sent = [json.loads(line) for line in requests_log.read_text().splitlines()]
    assert reward.value == pytest.approx(
        0.5 + 0.5 * (0.5 + 7 / 18)
    )  # verdict 1, score margin 7 of 9, both orders
    assert "response as A: verdict A → 0.94; response as B: verdict B → 0.94" in reward.reason
    assert biased.value == pytest.approx(0.5)  # 0.75 as A, 0.25 as B: the position bias cancels
    assert [j.verdict for j in biased.judgements] == ["A", "A"]
    assert spelled.judgements[0] is None and spelled.problems[0] == (
        "unusable output: no scores for answer_form in the <think> block"
    )
    # one usable order alone would bring back the position bias the swap cancels: no value
    assert spelled.value is None and spelled.judgements[1].verdict == "B"
    assert unknown.value is None and all("got 'Verdict: perhaps'" in p for p in unknown.problems)
    assert all(
        body["temperature"] == 0.0 and body["messages"][1]["content"].endswith("/think") for body in sent
    )


# ---------------------------------------------------------------------------------------------- training


def test_reward_model_trained_with_the_stage_trainer_learns_the_verdict_format(init_dir, tmp_path, home):
    pairs = [
        {
            "pair_id": "short",
            "messages": user("What is 1+1?"),
            "chosen": "2",
            "rejected": "It is 3, I believe.",
        },
        {
            "pair_id": "long1",
            "messages": user("What is 2+2?"),
            "chosen": "It is 4, since 2 and 2 make 4.",
            "rejected": "5",
        },
        {
            "pair_id": "long2",
            "messages": user("What is 3+3?"),
            "chosen": "It is 6: 3 and 3 make 6.",
            "rejected": "7",
        },
    ]
    conversations, report = build_reward_model_data(
        pairs, RewardModelConfig(min_shorter_share=0.5), modes=("no_think",)
    )
    debias = report.length_debias
    assert (debias.share_before, debias.share_after, debias.num_added) == (pytest.approx(1 / 3), 0.5, 1)
    stage = StageConfig(
        name="reward-model",
        learning_rate=5e-3,
        max_steps=12,
        max_length=512,
        window_size=4,
        schedule="constant",
        checkpoint_every=100,
    )
    trained = train_reward_model(conversations, stage, init=init_dir, out_dir=tmp_path / "rm")
    assert trained.step == 12 and trained.losses[-1] < trained.losses[0] / 2
    assert (trained.num_samples, trained.num_occurrences, dict(trained.unusable)) == (6, 8, {})
    rows = (
        tables.dataset(trained.mixture.uri, version=trained.mixture.version)
        .to_table(columns=["repeats"], filter=pc.field("mixture_id") == trained.mixture_id)
        .column("repeats")
        .to_pylist()
    )
    assert sorted(rows) == [1, 1, 1, 1, 2, 2]  # the shorter-preferred pair's two orders, used twice each

    judge = RewardModelJudge(
        LocalGenerator(trained.checkpoint_dir / "model"), RewardModelConfig(mode="no_think")
    )
    results = judge.compare([ComparisonRequest(p["messages"], p["chosen"], p["rejected"]) for p in pairs])
    assert all(problem is None for result in results for problem in result.problems), [
        r.reason for r in results
    ]
    assert all(0.0 <= result.value <= 1.0 for result in results)


def test_a_judgement_longer_than_the_stage_is_left_out_with_its_reason_and_the_others_train(
    init_dir, tmp_path, home
):
    pairs = [
        {"pair_id": "fits", "messages": user("What is 1+1?"), "chosen": "2", "rejected": "3"},
        {"pair_id": "long", "messages": user("What is 2+2?"), "chosen": "4", "rejected": "five " * 400},
    ]
    conversations, _ = build_reward_model_data(pairs, RewardModelConfig(), modes=("no_think",))
    stage = StageConfig(
        name="reward-model",
        learning_rate=1e-3,
        max_steps=1,
        max_length=256,
        window_size=2,
        checkpoint_every=1,
    )
    trained = train_reward_model(conversations, stage, init=init_dir, out_dir=tmp_path / "rm")
    assert trained.step == 1 and trained.num_samples == 2  # the short pair's two orders
    assert len(trained.unusable) == 2  # the long pair's two orders
    assert all("more than the stage's max_length 256" in why for why in trained.unusable.values())
