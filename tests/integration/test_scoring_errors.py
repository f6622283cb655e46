"""Errors stay errors (issue 13, point 3): a reward model behind a real local server (fixed replies of the
synthetic teacher's server) that answers nonsense or fails its requests is never scored as a tie. The failed
item is recorded with its reason and counted, GSPO leaves its group out of the step's update, and every batch
step stops with a clear error once the failed share passes its threshold; a real "tie" verdict still gives
0.5."""

from __future__ import annotations

import json

import pytest
import torch

from keyeflow.model.config import tiny
from keyeflow.model.generation import LocalGenerator, OpenAICompatibleGenerator
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.quality.errors import ErrorShareExceeded, ScoringError
from keyeflow.quality.reward_model import ComparisonRequest, RewardModelConfig, RewardModelJudge
from keyeflow.quality.rewards import RewardCombiner, RewardConfig, RewardItem
from keyeflow.synthetic import synthetic_teacher as chat_server
from keyeflow.training.config import GSPOStageConfig
from keyeflow.training.losses import GSPOConfig
from keyeflow.training.preference import build_preference_pairs, make_scorer
from keyeflow.training.rl import pass_rate_filter, rejection_sampling_round, train_gspo

G = 4

# The judge: a real verdict for responses to the "tie" question, a server error for the "down" question, and
# nonsense for everything else (what a broken or untrained reward model writes).
RECORDINGS = {
    "model": "judge",
    "default": {"text": "Verdict: perhaps", "logprob": -1.0},
    "entries": [
        {"match": "Which is the tie question?", "completions": [{"text": "Verdict: tie", "logprob": -0.1}]},
        {
            "match": "Which is the down question?",
            "respond": {"status": 500, "body": {"error": {"message": "CUDA out of memory"}}},
        },
    ],
}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    with chat_server.start_server(RECORDINGS, tmp_path_factory.mktemp("judge")) as (url, _):
        generator = OpenAICompatibleGenerator(url, "judge", timeout=10, max_retries=0)
        yield RewardModelJudge(generator, RewardModelConfig(mode="no_think"))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy")
    KeyeForConditionalGeneration(tiny(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def judged(judge: RewardModelJudge):
    """A reward over item rows: the reward model against the item's reference."""
    combiner = RewardCombiner(
        RewardConfig(
            weights={"reward_model": 1.0}, check_format=False, reward_model_only_without_reference=False
        ),
        reward_model=judge.reward,
    )
    return lambda item, response: combiner(
        RewardItem(prompt=item["messages"][-1]["content"], reference=item["reference"]), response
    )


def test_a_real_tie_is_half_and_a_failed_judgement_is_an_error(judge):
    tie = judge.reward(RewardItem(prompt="Which is the tie question?", reference="either"), "both")
    assert tie.value == 0.5 and "verdict tie → 0.50" in tie.reason
    with pytest.raises(ScoringError) as nonsense:
        judge.reward(RewardItem(prompt="What is 2+2?", reference="4"), "5")
    message = str(nonsense.value)
    assert message.startswith("reward model: query 'What is 2+2?': reward model no usable verdict")
    assert "got 'Verdict: perhaps'" in message and "0.5" not in message
    with pytest.raises(
        ScoringError, match="query 'Which is the down question\\?'.*HTTP 500: CUDA out of memory"
    ):
        judge.reward(RewardItem(prompt="Which is the down question?", reference="x"), "y")
    # The rejection-sampling judgement: a failed comparison has no value, never "not preferred".
    (comparison,) = judge.compare([ComparisonRequest("What is 2+2?", "4", "5")])
    assert comparison.value is None and all(p.startswith("unusable output") for p in comparison.problems)


def test_gspo_leaves_a_failed_group_out_and_stops_past_the_threshold(judge, init_dir, tmp_path):
    items = [
        {"id": "letters", "messages": user("Write some letters."), "reference": "abc"},
        {"id": "judged", "messages": user("What is 2+2?"), "reference": "4"},
        {"id": "more-letters", "messages": user("Write more letters."), "reference": "abc"},
    ]
    judge_reward = judged(judge)

    def reward(item, response):  # the judge for one item, a varying rule for the others
        if item["id"] == "judged":
            return judge_reward(item, response)
        return sum(ch.isascii() and ch.isalpha() for ch in response) / max(len(response), 1)

    def stage(**overrides) -> GSPOStageConfig:
        args = {"prompts_per_step": 3, "group_size": G, "max_new_tokens": 8, "learning_rate": 1e-3,
                "max_steps": 1, "checkpoint_every": 1, "gspo": GSPOConfig(epsilon_low=0.2, epsilon_high=0.2),
                "hints": None, "seed": 7}  # fmt: skip
        return GSPOStageConfig(**(args | overrides))  # fmt: skip

    result = train_gspo(
        stage(max_reward_error_share=0.5),
        init=init_dir,
        items=items,
        reward_fn=reward,
        out_dir=tmp_path / "ok",
    )
    [record] = result.history
    assert record["num_reward_errors"] == 1
    assert record["num_active_responses"] == 2 * G  # the failed group is not trained
    assert set(record["hint_levels"]) == {"letters", "more-letters"}
    report = json.loads((tmp_path / "ok" / "hints" / "step-00000001.json").read_text())["items"]
    assert set(report["judged"]) == {"level", "reward_error"} and report["judged"]["level"] is None
    assert report["judged"]["reward_error"].startswith(
        "item 'judged': reward of response 0 of 4 failed: ScoringError: reward_model: reward model: query "
        "'What is 2+2?': reward model no usable verdict"
    )

    with pytest.raises(
        ErrorShareExceeded,
        match=r"^GSPO step 1 rewards: 1 of 3 items failed \(33.3% > max_error_share 5.0%\); "
        r"first: judged: item 'judged': reward of response 0 of 4 failed",
    ):
        train_gspo(stage(), init=init_dir, items=items, reward_fn=reward, out_dir=tmp_path / "stops")
    assert not (tmp_path / "stops" / "latest").exists()  # no checkpoint of a step that stopped


def test_pairs_pass_rates_and_rejection_sampling_record_failed_items(judge, init_dir):
    generator = LocalGenerator(init_dir)
    items = [
        {"id": "tie", "messages": user("Which is the tie question?")},
        {"id": "nonsense", "messages": user("What is 2+2?")},
    ]
    # MPO pairs, items without a reference: the reward model scores them. A tie everywhere is a real
    # verdict (all scored alike: no pair); nonsense fails its item.
    scorer = make_scorer(lambda item, response: judge.reward(item, response))
    judge.baseline = lambda item: "a baseline answer"
    try:
        kwargs = {"n": 2, "scorer": scorer, "min_margin": 0.1, "seed": 0, "max_new_tokens": 4}
        pairs, records = build_preference_pairs(generator, items, max_error_share=0.5, **kwargs)
        with pytest.raises(
            ErrorShareExceeded, match=r"^preference pairs: 1 of 2 items failed .*first: nonsense: "
        ):
            build_preference_pairs(generator, items, **kwargs)
    finally:
        judge.baseline = None
    by_id = {r["item_id"]: r for r in records}
    assert pairs == [] and not by_id["tie"]["failed"] and by_id["tie"]["scores"] == [0.5, 0.5]
    assert by_id["nonsense"]["failed"] and by_id["nonsense"]["reason"].startswith(
        "scoring failed for response 0 of 2: ScoringError: reward model: query 'What is 2+2?'"
    )
    assert by_id["nonsense"]["scores"] == []  # no stand-in value

    # The pass-rate filter: a failed reward is no pass rate (unknown, not 0).
    rl_items = [dict(item, reference="4") for item in items]
    filtered = pass_rate_filter(generator, rl_items, 2, judged(judge), max_new_tokens=4, max_error_share=0.5)
    assert filtered.pass_rates == {"tie": 1.0, "nonsense": None}  # a tie (0.5) reaches the 0.5 threshold
    failed = {r.item_id: r for r in filtered.records if r.failed}
    assert (
        set(failed) == {"nonsense"}
        and "reward of response 0 of 2 failed: ScoringError" in failed["nonsense"].reason
    )
    with pytest.raises(ErrorShareExceeded, match=r"^pass-rate filter: 1 of 2 items failed"):
        pass_rate_filter(generator, rl_items, 2, judged(judge), max_new_tokens=4)

    # Rejection sampling: a failed judgement keeps the reference and is recorded as failed.
    rows = [
        {
            "id": "tie",
            "messages": [*user("Which is the tie question?"), {"role": "assistant", "content": "r"}],
        },
        {"id": "nonsense", "messages": [*user("What is 2+2?"), {"role": "assistant", "content": "4"}]},
    ]

    def prefer_for(query: str):
        def prefer(candidate: str, incumbent: str) -> bool:
            (comparison,) = judge.compare([ComparisonRequest(query, candidate, incumbent)])
            if comparison.value is None:
                raise ScoringError(comparison.reason)
            return comparison.value > 0.5

        return prefer

    out = [
        rejection_sampling_round(
            generator, [row], lambda r, s: True, prefer_for(row["messages"][0]["content"]), 2,
            max_new_tokens=4, max_error_share=1.0,
        )
        for row in rows
    ]  # fmt: skip
    tie, nonsense = out[0].records[0], out[1].records[0]
    assert not tie.failed and tie.reason == "2 of 2 verified, none preferred over the reference"
    assert nonsense.failed and not nonsense.replaced and out[1].rows == rows[1:]
    assert nonsense.reason.startswith("judgement failed: ScoringError: reward model no usable verdict")
    with pytest.raises(ErrorShareExceeded, match=r"^rejection sampling: 1 of 1 items failed"):
        rejection_sampling_round(
            generator, rows[1:], lambda r, s: True, prefer_for("What is 2+2?"), 2, max_new_tokens=4
        )
