"""What post-training learned, measured on held-out items and pairs no stage trained on.

- **Pass rate** (`heldout_pass_rate`): ``samples_per_item`` responses per held-out item, sampled as RL samples
  them, scored by the RL reward; an item's pass rate is its share of passing responses and the set's pass
  rate is the mean over items. The 95% interval is over items (1.96 standard errors of the item mean): the
  responses of one item are not independent tries of the set, the items are.
- **Paired difference** (`paired_difference`): two checkpoints on the same items with the same seeds; the
  mean of the per-item differences and its 95% interval. Pairing removes the items' own difficulty from the
  noise, so a change is seen with fewer items than two separate intervals need.
- **The RL promotion gate** (`rl_promotion`): refuses to decide on fewer than ``min_items`` items, and refuses
  a checkpoint whose pass rate is below the one it started from by more than the paired interval's half-width
  plus ``tolerance`` (a regression the noise does not explain).
- **Preference accuracy** (`preference_accuracy`): the share of held-out pairs whose chosen response gets a
  higher mean log-probability per token than the rejected one. MPO's before → after.
- **Response loss** (`response_loss`): the mean token loss of held-out items' reference responses. SFT's
  before → after.
- **Reward-model accuracy** (`judge_accuracy`): the share of held-out pairs where the judge prefers the
  chosen response (`Comparison.value` > 0.5, both orders asked). A failed judgement is not a wrong one: it is
  counted apart with its reason, and a judge that decides no pair has no accuracy.

Held-out pairs (`answer_pairs`): per item, the reference answer (chosen) over each wrong answer its reference
solution lists (rejected), both written as the item's thinking mode expects (`reference_response`). Built from
training items, the same pairs are training data for MPO and the reward model (`PreferenceSettings`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from keyeflow.config import check_int, check_number
from keyeflow.model.generation import Generator
from keyeflow.model.processor import MediaLookup, collate, encode_sample
from keyeflow.quality.errors import DEFAULT_MAX_ERROR_SHARE
from keyeflow.quality.reward_model import ComparisonRequest, RewardModelJudge
from keyeflow.training import rl
from keyeflow.training.preference import sequence_logprobs

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True, kw_only=True)
class HeldoutConfig:
    """How held-out items are sampled and how the RL promotion gate decides."""

    samples_per_item: int = 8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    seed: int = 1234  # not a training seed: held-out samples never coincide with a rollout's by construction
    min_items: int = 100  # the gate refuses to decide on fewer items
    tolerance: float = 0.0  # a drop within the interval's half-width plus this is not a regression

    def __post_init__(self) -> None:
        # samples_per_item >= 2: one sample per item would make every item's rate 0 or 1 by construction.
        for name, minimum in (("samples_per_item", 2), ("max_new_tokens", 1), ("seed", 0), ("min_items", 1)):
            object.__setattr__(
                self, name, check_int("HeldoutConfig", name, getattr(self, name), minimum=minimum)
            )
        check_number("HeldoutConfig", "temperature", self.temperature, minimum=0)
        check_number("HeldoutConfig", "tolerance", self.tolerance, minimum=0)


@dataclass(frozen=True)
class Estimate:
    """A mean over items with its 95% interval's half-width."""

    mean: float
    half_width: float
    num_items: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.half_width:.3f} (95%, {self.num_items} items)"

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "half_width": self.half_width, "num_items": self.num_items}


def estimate(values: Sequence[float]) -> Estimate:
    """Mean and 95% half-width (normal approximation over the values, sample standard deviation)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to estimate a mean from")
    sd = statistics.stdev(values) if len(values) > 1 else math.inf
    return Estimate(statistics.fmean(values), Z95 * sd / math.sqrt(len(values)), len(values))


@dataclass(frozen=True)
class PassRates:
    """Per-item pass rates of one checkpoint on the held-out items, and their mean with its interval."""

    rates: Mapping[str, float]  # item id → share of its samples that passed
    estimate: Estimate
    failed: Mapping[str, str] = field(default_factory=dict)  # item id → why it has no rate

    def to_dict(self) -> dict[str, Any]:
        return {"rates": dict(self.rates), "estimate": self.estimate.to_dict(), "failed": dict(self.failed)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PassRates:
        return cls(dict(data["rates"]), Estimate(**data["estimate"]), dict(data.get("failed") or {}))


def heldout_pass_rate(
    generator: Generator,
    items: Sequence[Mapping[str, Any]],
    reward_fn: rl.RewardFn,
    config: HeldoutConfig,
    *,
    success_threshold: float = 0.5,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
) -> PassRates:
    """Pass rate of the policy behind `generator` on `items` (module docstring); an item whose generation or
    reward failed has no rate (counted in `failed`), and more of them than `max_error_share` raise."""
    if not items:
        raise ValueError("no held-out items to evaluate")
    # The pass-rate filter's per-item rates are exactly this measurement; its keep/drop verdicts are not used.
    records = rl.pass_rate_filter(
        generator,
        items,
        config.samples_per_item,
        reward_fn,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        success_threshold=success_threshold,
        max_error_share=max_error_share,
    ).records
    rates = {r.item_id: r.pass_rate for r in records if r.pass_rate is not None}
    failed = {r.item_id: r.reason for r in records if r.pass_rate is None}
    if not rates:
        raise ValueError(f"no held-out item could be scored; first failure: {next(iter(failed.values()))}")
    return PassRates(rates, estimate(list(rates.values())), failed)


def paired_difference(before: PassRates, after: PassRates) -> Estimate:
    """after − before over the items both have a rate for (module docstring)."""
    shared = sorted(set(before.rates) & set(after.rates))
    if not shared:
        raise ValueError("the two evaluations share no item")
    return estimate([after.rates[i] - before.rates[i] for i in shared])


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    difference: Estimate


def rl_promotion(before: PassRates, after: PassRates, config: HeldoutConfig) -> PromotionDecision:
    """Whether a checkpoint whose held-out pass rates are `after` may replace the one measured as `before`."""
    difference = paired_difference(before, after)
    if difference.num_items < config.min_items:
        raise ValueError(
            f"the RL promotion gate needs at least {config.min_items} held-out items with a pass rate on "
            f"both checkpoints, got {difference.num_items}: add held-out items or lower "
            "HeldoutConfig.min_items"
        )
    limit = difference.half_width + config.tolerance
    if difference.mean < -limit:
        return PromotionDecision(
            False,
            f"held-out pass rate fell by {-difference.mean:.3f} (from {before.estimate.mean:.3f} to "
            f"{after.estimate.mean:.3f}), more than the paired 95% half-width {difference.half_width:.3f}"
            + (f" + tolerance {config.tolerance}" if config.tolerance else "")
            + f", over {difference.num_items} items",
            difference,
        )
    return PromotionDecision(
        True,
        f"held-out pass rate {before.estimate.mean:.3f} → {after.estimate.mean:.3f} "
        f"(paired change {difference.mean:+.3f} ± {difference.half_width:.3f}, {difference.num_items} items)",
        difference,
    )


# ================================================================================== pairs and log-probs


def answer_pairs(items: Sequence[Mapping[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """Preference pairs: per item with a reference and ``wrong_answers``, the reference response (chosen) over
    each wrong answer written the same way (rejected), item by item. With `limit`, at most that many, taken
    round-robin (every item's first wrong answer, then every second one, …) so a cap still covers every item
    and family."""
    per_item = []
    for item in items:
        if not item.get("reference"):
            continue
        chosen = reference_response(item, str(item["reference"]))
        pairs = []
        for k, wrong in enumerate(item.get("wrong_answers") or []):
            rejected = reference_response(item, str(wrong))
            if rejected != chosen:
                pairs.append({
                    "pair_id": f"{item['id']}/wrong-{k}", "item_id": item["id"],
                    "messages": list(item["messages"]), "chosen": chosen, "rejected": rejected,
                    "reference": item["reference"], "task": item.get("task", "math"),
                    "chosen_score": 1.0, "rejected_score": 0.0, "reason": "reference vs a wrong answer",
                })  # fmt: skip
        per_item.append(pairs)
    if limit is None:
        return [p for pairs in per_item for p in pairs]
    rounds = max((len(pairs) for pairs in per_item), default=0)
    spread = [pairs[k] for k in range(rounds) for pairs in per_item if k < len(pairs)]
    return spread[:limit]


def reference_response(item: Mapping[str, Any], answer: str) -> str:
    """`answer` as a response in the item's thinking mode: a ``no_think`` answer is the bare answer; otherwise
    the reference solution's steps as the reasoning (``<think>…</think><answer>…</answer>``), or one line
    naming the answer when the item has no solution steps."""
    if item.get("mode") == "no_think":
        return answer
    steps = [str(s) for s in (item.get("solution_steps") or [])]
    if steps and answer != str(item.get("reference")):
        # A wrong answer's reasoning must reach it: the last step is the one that states the answer.
        steps = [*steps[:-1], f"So the answer is {answer}."]
    thinking = "\n\n".join(steps) if steps else f"The answer is {answer}."
    return f"<think>{thinking}</think><answer>{answer}</answer>"


# Conversations scored per forward: padded rows of one batch. On the tiny CPU model a forward costs per-op
# overhead more than FLOPs, so 16 rows cost about what one does; the padding of a batch is its longest
# conversation (a held-out video item is ~200 tokens), small beside what a real model's eval would batch.
RESPONSE_LOGPROBS_BATCH = 16


def response_logprobs(
    model: torch.nn.Module,
    tokenizer,
    media_lookup: MediaLookup | None,
    conversations: Sequence[tuple[Sequence[Mapping], str]],
    *,
    batch_size: int = RESPONSE_LOGPROBS_BATCH,
) -> list[tuple[float, int]]:
    """(Σ log p, number of tokens) of each response after its prompt, `batch_size` conversations per forward
    (one padded row each: a row's sums are its own conversation's, up to the last bits of a batched
    matmul), in eval mode with no grad (the model's mode is restored)."""
    check_int("response_logprobs", "batch_size", batch_size, minimum=1)
    merge = model.config.vision_config.spatial_merge_size
    pad_id = model.config.text_config.pad_token_id or 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(conversations), batch_size):
                features = [
                    encode_sample(
                        [*messages, {"role": "assistant", "content": response}],
                        tokenizer,
                        media_lookup,
                        spatial_merge_size=merge,
                    )
                    for messages, response in conversations[start : start + batch_size]
                ]
                batch = {
                    k: v.to(device) for k, v in collate(features, pack=False, pad_token_id=pad_id).items()
                }
                total, count = sequence_logprobs(model, batch)
                out += [(float(t), int(c)) for t, c in zip(total, count)]
    finally:
        model.train(was_training)
    return out


def preference_accuracy(
    model: torch.nn.Module, tokenizer, media_lookup: MediaLookup | None, pairs: Sequence[Mapping[str, Any]]
) -> Estimate:
    """Share of `pairs` whose chosen response has the higher mean log-probability per token (a tie is half
    right: the model does not prefer either)."""
    if not pairs:
        raise ValueError("no held-out pairs to evaluate")
    conversations = [(p["messages"], p[side]) for p in pairs for side in ("chosen", "rejected")]
    scores = response_logprobs(model, tokenizer, media_lookup, conversations)
    right = []
    for k in range(len(pairs)):
        (chosen, n_chosen), (rejected, n_rejected) = scores[2 * k], scores[2 * k + 1]
        right.append(_rightness(chosen / max(n_chosen, 1), rejected / max(n_rejected, 1)))
    return estimate(right)


def _rightness(chosen: float, rejected: float) -> float:
    """1 when the chosen side scores higher, 0.5 on a tie (no preference either way), 0 when lower."""
    return 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0


def response_loss(
    model: torch.nn.Module, tokenizer, media_lookup: MediaLookup | None, items: Sequence[Mapping[str, Any]]
) -> float:
    """Mean token loss of the items' reference responses (Σ −log p / Σ tokens)."""
    conversations = [
        (i["messages"], reference_response(i, str(i["reference"]))) for i in items if i["reference"]
    ]
    if not conversations:
        raise ValueError("no held-out items with a reference to compute a loss on")
    scores = response_logprobs(model, tokenizer, media_lookup, conversations)
    return -sum(s for s, _ in scores) / sum(n for _, n in scores)


@dataclass(frozen=True)
class JudgeAccuracy:
    estimate: Estimate | None  # over the pairs the judge decided; None when it decided none
    failed: Mapping[str, str]  # pair id → why its judgement failed


def judge_accuracy(
    judge: RewardModelJudge,
    pairs: Sequence[Mapping[str, Any]],
    *,
    query_of: Callable[[Mapping[str, Any]], Any] = lambda p: p["messages"][-1]["content"],
) -> JudgeAccuracy:
    """Share of `pairs` on which `judge` prefers the chosen response (module docstring). This is a
    measurement, not a decision: a pair the judge gave no usable verdict for is counted in `failed` with the
    reason, never scored, and a judge that decides none has no accuracy (None). Where a judgement decides
    something (rejection sampling, rewards) a failure is an error there."""
    if not pairs:
        raise ValueError("no held-out pairs to evaluate")
    comparisons = judge.compare(
        [
            ComparisonRequest(query_of(p), p["chosen"], p["rejected"], reference=p.get("reference"))
            for p in pairs
        ]
    )
    right, failed = [], {}
    for pair, comparison in zip(pairs, comparisons):
        if comparison.value is None:
            failed[pair["pair_id"]] = comparison.reason
        else:
            right.append(_rightness(comparison.value, 0.5))  # the judge's preference for the chosen
    return JudgeAccuracy(estimate(right) if right else None, failed)
