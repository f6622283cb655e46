"""MPO (SPEC §4): preference pairs from sampled responses, and the training stage that learns from them.

**Pairs** (`build_preference_pairs`). For every item (an id, the prompt as chat messages that may hold image
and video parts, an optional reference answer and how to check it) the generator samples `n` responses; a
scorer gives each a value (`make_scorer`: the reference check of `rewards.answer_reward` where the item has a
reference, the reward model where it has none, the reward model as a tie-breaker beside the check when both
are given); the best response becomes `chosen` and the worst `rejected` when their scores differ by at least
`min_margin`. SPEC's "high/low responses scored by the reward model plus human labels" names no rule, so the
choices made here (UNSTATED) are:
- best against worst, one pair per item: the widest margin is the least noisy label, and one pair per prompt
  keeps a prompt with many samples from outweighing the others;
- the chosen response must be complete (generation stopped on its own, not at `max_new_tokens`): the chosen
  text is trained with SFT and closed by `<|im_end|>`, so a cut-off chosen answer would teach the model to
  stop mid-sentence; a cut-off response may still be the rejected one;
- ties go to the earlier sample, so nothing about a response but its score decides (in particular not its
  length: the reward model's length bias is handled by its own debiasing pass, `quality.reward_model`).
Every item that gives no pair is recorded with why (generation failed, too few scored responses, no complete
response, all responses identical or scored alike, margin below `min_margin`), as DESIGN rule 5 asks. A
failure is not a verdict: an item whose generation failed, or any of whose responses the scorer could not
score (a reward model whose request failed or whose reply does not parse), gives no pair, with `failed` set
in its record (pairing the responses that did score would pick a best and a worst among a subset, and the
missing one may be either); more failed items than `max_error_share` of the items stop the step
(`keyeflow.quality.errors`).

**Training** (`train_mpo`). The policy starts from `init`; the reference model is `init` too, frozen. A step
takes `pairs_per_step` pairs (a seeded shuffle of all pairs per epoch, so a step's pairs follow from the step
number alone and a resume needs no loader state), scores each pair's chosen and rejected conversation (the
prompt messages plus the response as the assistant turn, encoded by `processor.encode_sample`; only the
assistant tokens and their `<|im_end|>` count) under the policy and the reference, and minimises
`losses.mpo_loss`. The step's pairs are one batch: the BCO shift and the pooled SFT term are defined over
the batch, so it is not cut into accumulated micro-batches (that would change the loss); under torchrun the
ranks share it instead (rank r scores pairs r, r + W, … of the step) and `mpo_loss` normalises every term by
the whole step's counts, so the summed gradients equal one process's. BCO's running reward shift
(`RewardShift`) is part of the checkpoint. AdamW, linear warm-up then a constant rate (an MPO run is short,
usually one epoch; InternVL's recipe is not stated for Keye).

**The reference's log-probs are computed once, before the first update** (`reference_logprobs`), by the
policy itself while it still is `init`: one no-grad pass over every pair, kept as two numbers per pair
(chosen, rejected) and stored in every checkpoint's `state.json`. The reference is frozen, so scoring it again
at every step only repeats work, and holding it as a second full model beside the policy costs a model's
memory for the whole run. The pass scores the pairs in the batches of the first epoch's steps (each rank its
share of each), the layout in which a reference forward over the step's own batch scored them before. A
resume reads the numbers from the checkpoint and loads no second model (a checkpoint written before they
were stored gets them from a temporary fp32 copy of `init`, freed before training).

The loop runs on the training engine (`keyeflow.training.engine`: fp32 master weights, data parallelism,
the one checkpoint format with `latest`, metrics.jsonl and the metrics sink); `state.json` adds the step's
losses, the reward shift, the config, a fingerprint of the pairs and the init path. A run finding `latest`
resumes from it and continues bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from keyeflow.faults import kill_point
from keyeflow.model.generation import BatchGenerationError, Generator
from keyeflow.model.modeling import IGNORE_INDEX
from keyeflow.model.processor import Features, MediaLookup, collate, encode_sample
from keyeflow.model.tokenizer import checkpoint_tokenizer
from keyeflow.quality.errors import DEFAULT_MAX_ERROR_SHARE, check_error_share, check_max_error_share
from keyeflow.quality.rewards import TASKS, Reward, RewardItem, answer_reward
from keyeflow.training import distributed, sharding
from keyeflow.training.config import MPOStageConfig
from keyeflow.training.engine import (
    Engine,
    MetricsSink,
    NullSink,
    append_metrics,
    check_kind,
    prepare_out_dir,
    read_metrics,
    resume_point,
    seed_everything,
)
from keyeflow.training.losses import MPOOutput, RewardShift, mpo_loss
from keyeflow.training.trainer import load_model, vision_dummy

log = logging.getLogger(__name__)

MPO_CHECKPOINT_FORMAT = 1


# ============================================================================================== items


@dataclass(frozen=True)
class PreferenceItem:
    """One prompt to sample responses for. `messages`: the chat up to the user turn the policy answers
    (content a string or parts, image/video parts included). `reference`/`task`/`options`: the reference
    answer and how `rewards.answer_reward` checks it (None: no reference, the reward model scores).
    `task_definition`: what the reward model is told the task is (None: its default)."""

    item_id: str
    messages: Sequence[Mapping[str, Any]]
    reference: object = None
    task: str = "math"
    options: Mapping[str, str] | None = None
    task_definition: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.item_id, str) or not self.item_id:
            raise ValueError(f"PreferenceItem.item_id={self.item_id!r}: must be a non-empty string")
        check_prompt(self.messages, f"PreferenceItem {self.item_id!r}")
        object.__setattr__(self, "messages", [dict(m) for m in self.messages])
        if self.task not in TASKS:
            raise ValueError(f"PreferenceItem {self.item_id!r}: task={self.task!r} must be one of {TASKS}")

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> PreferenceItem:
        """From `{"id" or "item_id", "messages", "reference"?, "task"?, "options"?, "task_definition"?}`."""
        item_id = row.get("item_id", row.get("id"))
        fields = {
            k: row[k] for k in ("reference", "task", "options", "task_definition") if row.get(k) is not None
        }
        if "messages" not in row:
            raise ValueError(f"item {item_id!r} has no 'messages'")
        return cls(item_id=item_id, messages=row["messages"], **fields)

    def prompt_content(self) -> str | list[Mapping[str, Any]]:
        """The content of the last user turn (what `RewardItem.prompt` and the mode switches read)."""
        return self.messages[-1]["content"]

    def reward_item(self) -> RewardItem:
        return RewardItem(
            prompt=self.prompt_content(), reference=self.reference, task=self.task, options=self.options
        )


def check_prompt(messages: object, where: str) -> None:
    """A prompt is a non-empty list of {role, content} messages whose last one is the user's (the turn the
    response answers)."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} messages")
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: message {k} must be a mapping with role system/user/assistant")
        if not isinstance(message.get("content"), (str, list)):
            raise ValueError(f"{where}: message {k} content must be a string or a list of parts")  # noqa: TRY004
    if messages[-1]["role"] != "user":
        raise ValueError(
            f"{where}: the last message must be the user's (the turn the response answers), "
            f"got {messages[-1]['role']!r}"
        )


# ============================================================================================= scoring

Scorer = Callable[[PreferenceItem, str], "float | Reward"]
RewardModel = Callable[[RewardItem, str], "Reward | float | tuple[float, str] | None"]


def _as_reward(name: str, out: object) -> Reward | None:
    """A reward model's output (a Reward, a number in [0, 1] or (number, reason)) as a Reward; None stays
    None."""
    if out is None or isinstance(out, Reward):
        return out
    value, reason = out if isinstance(out, tuple) and len(out) == 2 else (out, f"{name} score")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} returned {out!r}: expected a finite number, a Reward or (number, reason)")
    return Reward(float(value), str(reason))


def make_scorer(reward_model: RewardModel | None = None, *, model_weight: float = 0.1) -> Scorer:
    """The usual scorer of `build_preference_pairs`:
    - an item with a reference: `answer_reward` (1 right, 0 wrong); with `reward_model` too, the value is
      (1 − w)·check + w·model, w = `model_weight` < 0.5, so every right answer still outranks every wrong one
      and the reward model only orders answers the check scores alike (two right answers, one clearer);
    - an item without a reference: the reward model's value (`RewardModelJudge.reward` fits); without one,
      a ValueError (the item fails: recorded, counted, no pair).
    A reward model that fails raises (`ScoringError`), and so does the scorer: never a stand-in value.
    `reward_model(item, response)` returns a Reward, a number in [0, 1], (number, reason) or None (no say)."""
    if (
        isinstance(model_weight, bool)
        or not isinstance(model_weight, (int, float))
        or not 0.0 <= model_weight < 0.5
    ):
        raise ValueError(
            f"model_weight={model_weight!r}: must be in [0, 0.5) so a right answer always outranks "
            "a wrong one"
        )

    def score(item: PreferenceItem, response: str) -> Reward:
        model = (
            _as_reward("reward model", reward_model(item.reward_item(), response))
            if reward_model is not None and (item.reference is None or model_weight > 0)
            else None
        )
        if item.reference is None:
            if model is None:
                raise ValueError(
                    f"item {item.item_id!r} has no reference and "
                    + ("no reward model" if reward_model is None else "the reward model gave no score")
                )
            return model
        check = answer_reward(response, item.reference, item.task, options=item.options)
        if model is None:
            return check
        value = (1 - model_weight) * check.value + model_weight * model.value
        return Reward(
            value,
            f"answer {check.value:.2f}: {check.reason}; reward model {model.value:.2f}: {model.reason}",
            {"answer": check, "reward_model": model},
        )

    return score


def _score(scorer: Scorer, item: PreferenceItem, response: str) -> tuple[float, str]:
    out = scorer(item, response)
    if isinstance(out, Reward):
        return out.value, out.reason
    if isinstance(out, bool) or not isinstance(out, numbers.Real) or not math.isfinite(out):
        raise TypeError(f"the scorer returned {out!r}: expected a finite number or a Reward")
    return float(out), "score"


# =============================================================================================== pairs


def build_preference_pairs(
    generator: Generator,
    items: Sequence[PreferenceItem | Mapping[str, Any]],
    *,
    n: int,
    scorer: Scorer,
    min_margin: float,
    seed: int,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    batch_size: int = 8,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sample `n` responses per item, score them, pair the best complete one with the worst (module
    docstring).

    Returns (pairs, records). A pair: `pair_id` (= item_id), `item_id`, `messages` (the prompt), `chosen`,
    `rejected`, `chosen_score`, `rejected_score`, `margin`, `reason`, `num_responses`, `scores` (every scored
    response's value, in sample order), and the item's `reference`, `task`, `options`, `task_definition`. A
    record (an item without a pair): `item_id`, `reason`, `num_responses`, `scores`, `failed` (its generation
    or a response's scoring failed). Raises ErrorShareExceeded when more than `max_error_share` of the items
    failed.
    `seed` makes the sampling reproducible (each conversation gets its own stream from it, see
    `generation.conversation_seed`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n={n!r}: must be an integer >= 2 (a pair needs two responses)")
    if (
        isinstance(min_margin, bool)
        or not isinstance(min_margin, (int, float))
        or not math.isfinite(min_margin)
        or min_margin < 0
    ):
        raise ValueError(f"min_margin={min_margin!r}: must be a finite number >= 0")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0 (n greedy samples are all the same)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: must be an integer")  # noqa: TRY004
    if not callable(scorer):
        raise ValueError("scorer must be a callable (item, response) -> float")  # noqa: TRY004
    check_max_error_share("build_preference_pairs", max_error_share)
    parsed = [item if isinstance(item, PreferenceItem) else PreferenceItem.from_dict(item) for item in items]
    seen: set[str] = set()
    for item in parsed:
        if item.item_id in seen:
            raise ValueError(f"item id {item.item_id!r} appears twice: a pair is named by its item")
        seen.add(item.item_id)

    pairs: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for start in range(0, len(parsed), batch_size):
        batch = parsed[start : start + batch_size]
        for item, result in zip(batch, _sample(generator, batch, n, max_new_tokens, temperature, seed)):
            if isinstance(result, Exception):
                records.append(
                    _record(item, f"generation failed: {type(result).__name__}: {result}"[:300], failed=True)
                )
                continue
            pair, record = _pair_of(item, result, scorer, min_margin)
            if pair is not None:
                pairs.append(pair)
            else:
                records.append(record)
    failures = [(r["item_id"], r["reason"]) for r in records if r["failed"]]
    log.info("preference pairs: %d of %d items paired, %d failed", len(pairs), len(parsed), len(failures))
    check_error_share("preference pairs", failures, len(parsed), max_error_share)
    return pairs, records


def _sample(
    generator: Generator,
    batch: list[PreferenceItem],
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[list[Any] | Exception]:
    """Per item, its completions or the error its request failed with (the other items keep theirs)."""
    try:
        return generator.generate(
            [item.messages for item in batch],
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            logprobs=False,
        )
    except BatchGenerationError as error:
        return error.results
    except (RuntimeError, ValueError, KeyError, OSError) as error:  # a server down, a prompt it refuses, …
        return [error] * len(batch)


def _record(
    item: PreferenceItem,
    reason: str,
    num_responses: int = 0,
    scores: list[float] | None = None,
    *,
    failed: bool = False,
) -> dict:
    return {
        "item_id": item.item_id,
        "reason": reason,
        "num_responses": num_responses,
        "scores": scores or [],
        "failed": failed,
    }


def _pair_of(
    item: PreferenceItem, completions: list[Any], scorer: Scorer, min_margin: float
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    scored: list[tuple[float, str, str, bool]] = []  # (value, reason, text, complete)
    problems: list[str] = []
    for k, completion in enumerate(completions):
        text = completion.text
        if not text.strip():
            problems.append(f"response {k} is empty")
            continue
        try:
            value, reason = _score(scorer, item, text)
        except (ValueError, TypeError, RuntimeError, KeyError) as error:
            # The item fails as a whole: a pair from the responses that did score is not the best against
            # the worst (the unscored one may be either).
            why = f"scoring failed for response {k} of {len(completions)}: {type(error).__name__}: {error}"
            return None, _record(item, why[:300], len(completions), [s[0] for s in scored], failed=True)
        scored.append((value, reason, text, completion.finish_reason == "stop"))
    scores = [s[0] for s in scored]
    num = len(completions)

    def fail(why: str) -> tuple[None, dict[str, Any]]:
        detail = f" ({'; '.join(problems[:3])})" if problems else ""
        return None, _record(item, why + detail, num, scores)

    if len(scored) < 2:
        return fail(f"too few scored responses: {len(scored)} of {num}")
    if len({s[2] for s in scored}) == 1:
        return fail(f"all {len(scored)} scored responses are identical")
    if len(set(scores)) == 1:
        return fail(f"all {len(scored)} responses scored alike ({scores[0]:.3f})")
    complete = [s for s in scored if s[3]]
    if not complete:
        return fail(f"no complete response: all {len(scored)} hit max_new_tokens")
    best = max(
        complete, key=lambda s: s[0]
    )  # max/min keep the first of equals: ties go to the earlier sample
    worst = min(scored, key=lambda s: s[0])
    margin = best[0] - worst[0]
    if margin < min_margin:
        cut = "" if best[0] == max(scores) else " (the best response was cut off)"
        return fail(
            f"margin {margin:.3f} < min_margin {min_margin}: best complete {best[0]:.3f}, "
            f"worst {worst[0]:.3f}{cut}"
        )
    reason = (
        f"best of {len(scored)} {best[0]:.3f} ({best[1]}) vs worst {worst[0]:.3f} ({worst[1]}): "
        f"margin {margin:.3f} >= {min_margin}"
    )
    pair = {
        "pair_id": item.item_id, "item_id": item.item_id, "messages": item.messages,
        "chosen": best[2], "rejected": worst[2], "chosen_score": best[0], "rejected_score": worst[0],
        "margin": margin, "reason": reason, "num_responses": num, "scores": scores,
        "reference": item.reference, "task": item.task,
        "options": dict(item.options) if item.options else None, "task_definition": item.task_definition,
    }  # fmt: skip
    return pair, {}


@dataclass(frozen=True)
class MPOResult:
    checkpoint_dir: Path  # the last checkpoint (its `model/` is the next stage's init)
    step: int
    losses: list[float]  # the loss of every step, from step 1 (across resumes)
    metrics: list[dict[str, Any]]  # metrics.jsonl: one record per step


# ============================================================================================ training


def sequence_logprobs(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: Σ log p of the trained (assistant) tokens, and their number. The model scores only those
    tokens, in chunks (`logprob_labels`): the [rows, tokens, vocabulary] logits of a real vocabulary would not
    fit beside the activations."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logps = model(**inputs, logprob_labels=batch["labels"]).token_logprobs  # [t] scores the token at t + 1
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return (logps * mask).sum(dim=1), mask.sum(dim=1)


def _pair_fields(pair: Mapping[str, Any], k: int) -> tuple[list[dict], str, str]:
    if not isinstance(pair, Mapping):
        raise ValueError(f"pair {k}: must be a mapping with messages, chosen and rejected")  # noqa: TRY004
    check_prompt(pair.get("messages"), f"pair {k} ({pair.get('pair_id', pair.get('item_id'))!r})")
    for key in ("chosen", "rejected"):
        if not isinstance(pair.get(key), str) or not pair[key].strip():
            raise ValueError(f"pair {k}: {key} must be a non-empty string")
    if pair["chosen"] == pair["rejected"]:
        raise ValueError(f"pair {k}: chosen and rejected are the same text")
    return list(pair["messages"]), pair["chosen"], pair["rejected"]


def pairs_fingerprint(pairs: Sequence[tuple[list[dict], str, str]]) -> str:
    """A hash of the pairs' prompts and responses in order: a resume must see the same pairs, or the step →
    pairs mapping (and with it the run) would silently change."""
    digest = hashlib.sha256()
    for messages, chosen, rejected in pairs:
        digest.update(json.dumps([messages, chosen, rejected], sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def pair_indices(num_pairs: int, step: int, pairs_per_step: int, seed: int) -> list[int]:
    """The pairs of optimizer step `step` (0-based): positions step·P … step·P + P − 1 of the epochs laid end
    to end, each epoch a shuffle seeded by (seed, epoch). A function of the step alone, so a resume needs no
    loader state."""
    out = []
    for position in range(step * pairs_per_step, (step + 1) * pairs_per_step):
        epoch, offset = divmod(position, num_pairs)
        order = list(range(num_pairs))
        random.Random(f"keyeflow-mpo:{seed}:{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def train_mpo(
    config: MPOStageConfig,
    *,
    init: str | Path,
    pairs: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    sink: MetricsSink | None = None,
    media_lookup: MediaLookup | None = None,
) -> MPOResult:
    """Train the policy at `init` with MPO on `pairs` (dicts with `messages`, `chosen`, `rejected`; other keys
    are ignored), checkpointing into `out_dir`; resumes from `out_dir/latest` when present. `media_lookup`
    resolves image/video parts of the prompts (as for `processor.encode_sample`). `sink`: where parameters and
    per-step metrics are reported (None: only `out_dir/metrics.jsonl`). Under torchrun each rank scores its
    share of every step's pairs (module docstring)."""
    init, out_dir = Path(init), Path(out_dir)
    if not init.is_dir():
        raise ValueError(f"init {init} is not a checkpoint directory")
    parsed = [_pair_fields(pair, k) for k, pair in enumerate(pairs)]
    if not parsed:
        raise ValueError("train_mpo needs at least one pair")
    dist = distributed.setup(need_group=config.fsdp)
    try:
        if config.pairs_per_step < dist.world_size:
            raise ValueError(
                f"MPOStageConfig.pairs_per_step={config.pairs_per_step}: fewer pairs per step than "
                f"the {dist.world_size} ranks (each rank scores at least one pair)"
            )
        return _train_mpo(config, init, parsed, out_dir, sink or NullSink(), media_lookup, dist)
    finally:
        distributed.teardown(dist)


def _train_mpo(
    config: MPOStageConfig,
    init: Path,
    parsed: list[tuple[list[dict], str, str]],
    out_dir: Path,
    sink: MetricsSink,
    media_lookup: MediaLookup | None,
    dist: distributed.Distributed,
) -> MPOResult:
    fingerprint = pairs_fingerprint(parsed)
    # ---- Where to start: the last registered checkpoint, else `init`.
    resume_dir, saved = resume_point(out_dir)
    if saved:
        _check_resumable(saved, config, init, fingerprint)
    prepare_out_dir(out_dir, dist, saved["step"] if saved else 0)

    # ---- The policy on the engine. The frozen reference (always `init`, also on a resume) is not a model
    # held beside it: its log-probs are computed once, below. Sharded (FSDP2), the policy is built on the
    # meta device and each rank reads its shards (of `init`, or of the checkpoint's dcp/ on a resume).
    tokenizer = checkpoint_tokenizer(init)
    policy_dir = resume_dir / "model" if resume_dir else init
    model, init_weights = (
        sharding.unbuilt_model(policy_dir) if config.fsdp else (load_model(policy_dir), None)
    )
    engine = Engine(
        model,
        dist=dist,
        learning_rate=config.learning_rate,
        lr_at=config.lr_at,
        grad_clip=config.grad_clip,
        activation_checkpointing=config.activation_checkpointing,
        fsdp=config.fsdp,
        init_weights=None if resume_dir else init_weights,
    )
    policy = engine.model
    merge = policy.config.vision_config.spatial_merge_size
    pad_id = policy.config.text_config.pad_token_id or 0

    def encode(messages: list[dict], response: str) -> Features:
        return encode_sample(
            messages + [{"role": "assistant", "content": response}],
            tokenizer,
            media_lookup,
            spatial_merge_size=merge,
        )

    # Refuse over-long pairs before any compute is spent, naming them (cutting one could drop its answer).
    too_long = []
    for k, (messages, chosen, rejected) in enumerate(parsed):
        longest = max(len(encode(messages, chosen)), len(encode(messages, rejected)))
        if longest > config.max_length:
            too_long.append(f"pair {k} ({longest} tokens)")
    if too_long:
        raise ValueError(
            f"{len(too_long)} pairs are longer than max_length={config.max_length}: "
            f"{', '.join(too_long[:5])}; filter them or raise max_length"
        )

    step, losses, shift = 0, [], RewardShift()
    if saved:
        step, losses = saved["step"], list(saved["losses"])
        shift = RewardShift(**saved["reward_shift"])
        engine.load(resume_dir, config.seed + step)
    else:
        seed_everything(config.seed)

    # ---- The reference's log-probs of every pair, once (module docstring).
    if not saved:
        reference = reference_logprobs(engine, engine.module, config, parsed, encode, pad_id)
    elif "reference_logps" in saved:
        reference = torch.tensor(saved["reference_logps"], dtype=torch.float32)
    else:  # a checkpoint written before the numbers were stored with it
        # fp32, as the policy was before its first update (the engine keeps fp32 master weights).
        init_model = load_model(init).float().to(dist.device).requires_grad_(False)
        reference = reference_logprobs(engine, init_model, config, parsed, encode, pad_id)
        del init_model
    if dist.is_main and not saved:
        sink.log_params(
            {
                "mpo_stage": config.to_dict(),
                "mpo_stage_hash": config.config_hash(),
                "init": str(init),
                "num_pairs": len(parsed),
                "pairs_fingerprint": fingerprint,
                "world_size": dist.world_size,
            }
        )
    checkpoint_dir = resume_dir
    log.info(
        "MPO: steps %d → %d over %d pairs on %d rank(s)%s",
        step,
        config.max_steps,
        len(parsed),
        dist.world_size,
        f", resumed from {resume_dir}" if resume_dir else "",
    )

    while step < config.max_steps:
        started = time.perf_counter()
        indices = pair_indices(len(parsed), step, config.pairs_per_step, config.seed)
        lr = engine.lr
        out, num_chosen_tokens = mpo_step(
            engine, config, [parsed[i] for i in indices], reference[indices], encode, pad_id, shift
        )
        grad_norm = engine.step()
        step += 1

        loss = (
            engine.all_reduce_sum(out.loss.detach().double()).item()
            if dist.world_size > 1
            else out.loss.item()
        )
        losses.append(loss)
        terms = [out.dpo, out.bco, out.sft]
        if dist.world_size > 1:
            terms = list(engine.all_reduce_sum(torch.stack([t.detach().double() for t in terms])))
        metrics = {
            "loss": loss,
            "dpo": terms[0].item(),
            "bco": terms[1].item(),
            "sft": terms[2].item(),
            "reward_margin": out.reward_margin.item(),
            "reward_accuracy": out.reward_accuracy.item(),
            "chosen_reward": out.chosen_rewards.mean().item(),
            "rejected_reward": out.rejected_rewards.mean().item(),
            "bco_shift": out.bco_shift,
            "lr": lr,
            "grad_norm": grad_norm,
            "chosen_tokens": num_chosen_tokens,
            "seconds": time.perf_counter() - started,
        }
        append_metrics(out_dir, dist, sink, step, metrics, {"time": time.time(), "pairs": indices})
        kill_point("mpo.step")  # after the step's update and metrics, before its checkpoint
        log.info(
            "MPO step %d/%d loss %.4f margin %.4f accuracy %.2f",
            step,
            config.max_steps,
            loss,
            metrics["reward_margin"],
            metrics["reward_accuracy"],
        )

        if step % config.checkpoint_every == 0 or step == config.max_steps:
            checkpoint_dir = engine.save(
                out_dir,
                step,
                {
                    "format": MPO_CHECKPOINT_FORMAT,
                    "kind": "mpo",
                    "losses": losses,
                    "reward_shift": {"mean": shift.mean, "num_batches": shift.num_batches},
                    "config": config.to_dict(),
                    "config_hash": config.config_hash(),
                    "init": str(init),
                    "pairs_fingerprint": fingerprint,
                    "num_pairs": len(parsed),
                    # float32 values as Python floats: JSON writes them back exactly.
                    "reference_logps": reference.tolist(),
                },
            )
            if dist.is_main:
                sink.set_checkpoint(checkpoint_dir)

    engine.wait_for_checkpoint()  # sharded: the last checkpoint's background write, registered
    assert checkpoint_dir is not None  # the last step always writes one
    return MPOResult(checkpoint_dir=checkpoint_dir, step=step, losses=losses, metrics=read_metrics(out_dir))


def reference_logprobs(
    engine: Engine,
    model: torch.nn.Module,
    config: MPOStageConfig,
    parsed: list[tuple[list[dict], str, str]],
    encode: Callable[[list[dict], str], Features],
    pad_id: int,
) -> torch.Tensor:
    """The reference log-probs of every pair, `[num_pairs, 2]` float32 on the CPU (chosen, rejected: Σ log p
    of the response tokens), from `model` (the policy before its first update, or a copy of `init`), in eval
    mode and without gradients. The pairs are scored in the batches of the first epoch's steps, each rank its
    share of each (`mpo_step`'s layout), and the ranks' numbers are gathered, so every rank holds them all."""
    dist = engine.dist
    num_pairs = len(parsed)
    mine: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), engine.autocast():
            # Every pair sits at one position of the first epoch, in step position // pairs_per_step.
            for step in range(math.ceil(num_pairs / config.pairs_per_step)):
                indices = pair_indices(num_pairs, step, config.pairs_per_step, config.seed)
                indices = indices[dist.rank :: dist.world_size]
                if not indices:
                    continue
                rows = [encode(parsed[i][0], response) for i in indices for response in parsed[i][1:]]
                batch = _batch(engine, rows, pad_id)
                logps, _ = sequence_logprobs(model, batch)
                for row, index in enumerate(indices):
                    # The last step of the epoch may reach into the next one: keep a pair's first number.
                    mine.setdefault(index, logps[2 * row : 2 * row + 2].float().cpu().clone())
    finally:
        model.train(was_training)
    gathered = {index: value for rank_part in engine.gather(mine) for index, value in rank_part.items()}
    assert sorted(gathered) == list(range(num_pairs))  # every pair is in the first epoch
    return torch.stack([gathered[index] for index in range(num_pairs)])


def mpo_step(
    engine: Engine,
    config: MPOStageConfig,
    step_pairs: list[tuple[list[dict], str, str]],
    step_reference: torch.Tensor,
    encode: Callable[[list[dict], str], Features],
    pad_id: int,
    shift: RewardShift,
) -> tuple[MPOOutput, int]:
    """The gradient of one step's MPO loss, this rank's share of the step's pairs (`step_pairs[rank::world]`;
    the loss's counts are the whole step's, so the ranks' gradients add up to the one-process gradient).
    `step_reference`: the reference log-probs of `step_pairs`, `[len(step_pairs), 2]` (`reference_logprobs`).
    Returns the loss terms and the whole step's number of chosen tokens."""
    dist = engine.dist
    mine = step_pairs[dist.rank :: dist.world_size]
    reference = step_reference[dist.rank :: dist.world_size].to(dist.device)
    # Rows alternate chosen, rejected: one forward scores the rank's pairs.
    rows = [encode(messages, response) for messages, *responses in mine for response in responses]
    with engine.autocast():
        logps, counts = sequence_logprobs(engine.forward, _batch(engine, rows, pad_id))
    logps, counts = logps[: len(rows)], counts[: len(rows)]  # without the dummy image's row (`_batch`)
    out = mpo_loss(
        config.mpo,
        logps[0::2],
        logps[1::2],
        reference[:, 0],
        reference[:, 1],
        counts[0::2],
        reward_shift=shift,
        all_reduce=engine.all_reduce_sum if dist.world_size > 1 else None,
    )
    engine.backward(out.loss)
    num_chosen = engine.all_reduce_sum(counts[0::2].sum().double()).item()
    return out, int(num_chosen)


def _batch(engine: Engine, rows: list[Features], pad_id: int) -> dict[str, torch.Tensor]:
    """`rows` collated on the engine's device. Sharded (FSDP2), every rank must run the ViT (its units'
    all-gathers are collectives): rows without pixels get an unlabelled dummy image as one more row, which
    the caller drops from the output (it changes no number)."""
    if engine.sharded and not any(f.grid_thw.numel() for f in rows):
        rows = [*rows, vision_dummy(engine.model.config)]
    return {k: v.to(engine.dist.device) for k, v in collate(rows, pack=False, pad_token_id=pad_id).items()}


def _check_resumable(saved: Mapping[str, Any], config: MPOStageConfig, init: Path, fingerprint: str) -> None:
    check_kind(saved, "mpo", MPO_CHECKPOINT_FORMAT)
    if saved["config"].get("fsdp", False) != config.fsdp:
        raise ValueError(
            f"cannot resume: the checkpoint was written with fsdp={saved['config'].get('fsdp', False)}, this "
            f"run has {config.fsdp} (its weights and optimizer state are in another format)"
        )
    if saved["pairs_fingerprint"] != fingerprint:
        raise ValueError(
            "cannot resume: the checkpoint trained on other pairs (fingerprint "
            f"{saved['pairs_fingerprint']}, these pairs {fingerprint}); use a new out_dir"
        )
    if Path(saved["init"]).resolve() != init.resolve():
        raise ValueError(
            f"cannot resume: the checkpoint's reference model is {saved['init']}, this run names "
            f"{init} (the reference must stay the same for the whole run)"
        )
    if saved["config_hash"] != config.config_hash():
        changed = sorted(k for k, v in config.to_dict().items() if saved["config"].get(k) != v)
        log.warning("resuming MPO with changed settings: %s", ", ".join(changed))
