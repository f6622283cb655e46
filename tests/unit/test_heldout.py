"""Held-out evaluation: the interval is over items, the paired difference sees a change two separate
intervals cannot, the RL gate refuses a significant regression and too few items, and held-out pairs put the
reference answer over each wrong answer in the item's thinking mode."""

from __future__ import annotations

import math

import pytest
import torch

from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import collate, encode_sample
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.training.heldout import (
    Estimate,
    HeldoutConfig,
    PassRates,
    answer_pairs,
    estimate,
    paired_difference,
    preference_accuracy,
    reference_response,
    response_logprobs,
    response_loss,
    rl_promotion,
)
from keyeflow.training.preference import sequence_logprobs


def _rates(values: dict[str, float]) -> PassRates:
    return PassRates(values, estimate(list(values.values())))


def test_the_interval_is_1_96_standard_errors_of_the_item_mean():
    e = estimate([0.0, 0.5, 1.0, 0.5])
    sd = math.sqrt(((0.5**2) * 2) / 3)
    assert e.mean == 0.5 and e.num_items == 4
    assert e.half_width == pytest.approx(1.959964 * sd / 2)
    assert e.low == pytest.approx(0.5 - e.half_width)
    assert estimate([0.3]).half_width == math.inf  # one item says nothing about the spread


def test_pairing_sees_a_small_change_that_separate_intervals_do_not():
    # Items of very different difficulty, each a little better after: the item spread swamps the separate
    # intervals, the per-item differences do not have it.
    before = {f"i{k}": (k % 5) / 5 for k in range(50)}
    after = {k: v + 0.1 for k, v in before.items()}
    b, a = _rates(before), _rates(after)
    assert a.estimate.low < b.estimate.high  # the separate intervals overlap
    d = paired_difference(b, a)
    assert d.mean == pytest.approx(0.1) and d.half_width == pytest.approx(0.0, abs=1e-12)


def test_the_gate_refuses_a_significant_regression_and_promotes_noise():
    config = HeldoutConfig(min_items=40)
    before = _rates({f"i{k}": 0.5 + 0.25 * ((-1) ** k) for k in range(60)})
    worse = _rates({k: max(v - 0.25, 0.0) for k, v in before.rates.items()})
    decision = rl_promotion(before, worse, config)
    assert not decision.promoted
    assert "fell by" in decision.reason and "60 items" in decision.reason
    # A change the interval explains (half the items a bit up, half a bit down) is promoted.
    noisy = _rates({k: v + (0.125 if int(k[1:]) % 4 < 2 else -0.125) for k, v in before.rates.items()})
    assert rl_promotion(before, noisy, config).promoted
    # Tolerance widens what is forgiven.
    assert rl_promotion(before, worse, HeldoutConfig(min_items=40, tolerance=0.3)).promoted


def test_the_gate_refuses_to_decide_on_too_few_items():
    before = _rates({f"i{k}": 0.5 for k in range(10)})
    with pytest.raises(ValueError, match="at least 40 held-out items"):
        rl_promotion(before, before, HeldoutConfig(min_items=40))


def test_pass_rates_survive_a_trip_through_json_dicts():
    rates = PassRates({"a": 0.25, "b": 1.0}, estimate([0.25, 1.0]), {"c": "generation failed"})
    assert PassRates.from_dict(rates.to_dict()) == rates
    assert isinstance(rates.estimate, Estimate)


def test_held_out_pairs_put_the_reference_over_each_wrong_answer_in_the_items_mode():
    think = {
        "id": "q1", "mode": "think", "reference": "5", "messages": [{"role": "user", "content": "How many?"}],
        "solution_steps": ["Step 1: 2 squares.", "Step 2: 3 circles.", "Step 3: 2 + 3 = 5."],
        "wrong_answers": ["4", "6"], "task": "count",
    }  # fmt: skip
    no_think = dict(think, id="q2", mode="no_think")
    pairs = answer_pairs([think, no_think, dict(think, id="q3", wrong_answers=[])])
    assert [p["pair_id"] for p in pairs] == ["q1/wrong-0", "q1/wrong-1", "q2/wrong-0", "q2/wrong-1"]
    first = pairs[0]
    assert first["chosen"] == (
        "<think>Step 1: 2 squares.\n\nStep 2: 3 circles.\n\nStep 3: 2 + 3 = 5.</think><answer>5</answer>"
    )
    # the wrong answer's reasoning reaches the wrong answer, not the reference's last step
    assert first["rejected"].endswith("So the answer is 4.</think><answer>4</answer>")
    assert "2 + 3 = 5" not in first["rejected"]
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == ("5", "4")
    # a cap takes every item's first wrong answer before any item's second
    capped = answer_pairs([think, no_think], limit=3)
    assert [p["pair_id"] for p in capped] == ["q1/wrong-0", "q2/wrong-0", "q1/wrong-1"]
    assert answer_pairs([think], limit=0) == []
    assert reference_response({"mode": "think", "reference": "x"}, "x") == (
        "<think>The answer is x.</think><answer>x</answer>"
    )


def test_held_out_config_refuses_one_sample_per_item():
    with pytest.raises(ValueError, match="samples_per_item"):
        HeldoutConfig(samples_per_item=1)


def test_preference_accuracy_and_response_loss_follow_what_the_model_learned():
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    model = KeyeForConditionalGeneration(tiny(tokenizer))
    items = [
        {"id": f"q{k}", "mode": "no_think", "reference": "red", "wrong_answers": ["blue", "green"],
         "messages": [{"role": "user", "content": f"Which colour, number {k}? /no_think"}]}
        for k in range(4)
    ]  # fmt: skip
    pairs = answer_pairs(items)
    swapped = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in pairs]
    loss_before = response_loss(model, tokenizer, None, items)
    # Teach the model that the answer is red: fit the reference responses of the first two items only.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        for item in items[:2]:
            scores = response_logprobs_with_grad(model, tokenizer, item)
            optimizer.zero_grad()
            (-scores).backward()
            optimizer.step()
    assert response_loss(model, tokenizer, None, items) < loss_before / 4
    assert preference_accuracy(model, tokenizer, None, pairs).mean == 1.0  # held-out items 2, 3 included
    assert preference_accuracy(model, tokenizer, None, swapped).mean == 0.0
    (total, count), _ = response_logprobs(model, tokenizer, None, [(items[2]["messages"], "red")] * 2)
    assert count >= 1 and total < 0


def response_logprobs_with_grad(model, tokenizer, item) -> torch.Tensor:
    features = encode_sample(
        [*item["messages"], {"role": "assistant", "content": item["reference"]}], tokenizer, None
    )
    total, _ = sequence_logprobs(model, collate([features], pack=False))
    return total[0]


def test_response_logprobs_of_a_batch_are_each_conversations_own():
    """Conversations of different lengths scored in one padded batch give what each gives alone."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    model = KeyeForConditionalGeneration(tiny(tokenizer))
    conversations = [
        ([{"role": "user", "content": "Which colour? /no_think"}], "red"),
        ([{"role": "user", "content": "How many squares are in the grid, every row? /no_think"}],
         "seven squares in all"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 2 and 3."}], "5"),
    ]  # fmt: skip
    alone = response_logprobs(model, tokenizer, None, conversations, batch_size=1)
    together = response_logprobs(model, tokenizer, None, conversations, batch_size=3)
    assert [c for _, c in together] == [c for _, c in alone] and len({c for _, c in alone}) > 1
    for (t_batch, _), (t_alone, _) in zip(together, alone):
        assert abs(t_batch - t_alone) < 1e-5 * max(1.0, abs(t_alone))
    with pytest.raises(ValueError, match="batch_size"):
        response_logprobs(model, tokenizer, None, conversations, batch_size=0)
