"""GSPO reinforcement learning (SPEC §4): the RL engine of the general and alignment RL rounds, and the two
steps of the rejection-sampling loop around it. No Prefect here: a task calls `train_gspo` as it calls the
SFT trainer.

**One GSPO step** (`train_gspo`), top to bottom:

1. *Prompts*: `prompts_per_step` items of the list, a fresh seeded permutation every epoch (the last
   `len(items) % prompts_per_step` items of an epoch's order wait for a later epoch), so step s's prompts
   follow from (seed, s) alone and a resumed run picks what the uninterrupted one would have.
2. *Rollouts*: G completions per prompt from the current policy (`LocalGenerator` sharing the model being
   trained: its KV-cached sampler, media resolved by `media_lookup`), seeded from (seed, step); with
   `rollout_server`, from a vLLM/SGLang/keyeflow server over HTTP, token ids in and out, its weights synced
   after every step (`keyeflow.training.rollout`).
3. *Rewards*: `reward_fn(item, response)` → a float in [0, 1] or a `Reward` (`rule_reward_fn` builds one
   from `keyeflow.quality.rewards`). The item handed over is the row with `messages` set to the conversation
   the response answered (so with the hint, when one was given). A reward that fails (`reward_fn` raises,
   e.g. a judge's `ScoringError`, or returns something that is not a reward) is never replaced by a value:
   the prompt's group is left out of the step's update, counted in `num_reward_errors` and recorded with
   the reason in the step's hint file (`reward_error`); the step raises `ErrorShareExceeded` when more than
   `max_reward_error_share` of its prompts failed (`keyeflow.quality.errors`). A failure while scoring a
   hinted level drops the group the same way.
4. *Progressive hints* (`keyeflow.training.hints`): an item whose every rollout fails (reward below
   `success_threshold`) gets hints one level at a time; the step trains on the G responses of the lowest
   level with a success, under the hinted prompt (the level used is recorded per item). The step's own
   rollouts are the level-0 attempt, so no rollout is sampled twice. An item never solved up to
   `hints.max_level`, or carrying no hints, keeps its all-failed group (all advantages 0: no gradient).
5. *Advantages* Â = group-normalised rewards (`losses.group_advantages`, one row per prompt).
6. *Teacher-forced log-probs* of every completion: Features = the prompt exactly as the generator encoded it
   (`LocalGenerator.encode_prompt`: media patches, grids, 3D RoPE positions) + the completion's sampled
   token ids (`Completion.token_ids`, never the re-tokenised text), labels on the completion only, positions
   continuing at one past the prompt's largest, as the sampler decoded them (`completion_features`).
7. *Update*: the step's responses are cut into `mini_batches_per_step` mini-batches, one AdamW update each,
   with the GSPO loss (`losses.gspo_loss`). A rank's part of a mini-batch is one padded forward, or, with
   `max_tokens_per_micro_batch`, packed micro-batches of at most that many tokens (a response never split;
   attention stays inside each response), each with its own forward and backward. A micro-batch's loss is
   the GSPO mean over its responses times their number over the mini-batch's share of N, so the gradients
   add up to the one-forward gradient exactly (up to float rounding). The packed path also runs the ViT once
   per prompt (`PromptVision`): the G responses of a prompt carry the same image/video, so its embeddings
   are computed once, shared by the G rows, and its backward runs once with their summed gradient.

**Old log-probs are recomputed by the trainer's forward, not taken from the sampler.** The sampler's numbers
come from another computation (a KV-cached decode, batch-of-one prefill, other kernels; on a serving engine,
another precision), so they differ from the training forward in the last bits or more. GSPO clips a
length-normalised ratio to 1 ± 3e-4, below that noise, so using the sampler's numbers would clip (or fail to
clip) responses for reasons that have nothing to do with the policy moving. Instead "old" is the policy
before the step's first update, evaluated by the same forward as the update: the first mini-batch's old
log-probs are its own forward, detached (the ratio is exactly 1), and those of later mini-batches are one
no-grad forward each before the first update (their ratio moves with the updates already made). The gap
between the sampler's and the trainer's log-probs of the sampled tokens is reported every step
(`sampler_logprob_gap`): a live version of the input-consistency check.

**Which responses are computed.** With `kl_coef` 0 a response whose advantage is 0 adds exactly 0 to the
objective and to the gradient (min(s·0, clip(s)·0) = 0), so it is not run through the model; each
mini-batch's loss is still normalised as GSPO's mean over *all* the step's responses (its sum over its
responses divided by N / mini_batches), so skipping them changes no number, only the work. A mini-batch with
no response left does no update. With `kl_coef` > 0 every response is computed (the KL term applies to all),
and the reference is the frozen `init` checkpoint. A response holding an image/video pad id cannot be
teacher-forced and is left out too, its reward still counting in its group (`vision_pad_ids`).

The policy runs in eval mode throughout (no dropout): with dropout, the old and new forwards would differ by
noise and the importance ratio would measure the noise. All parameters train (no freezing policy in RL).

**Several ranks** (torchrun): rank r rolls out the r-th contiguous share of a step's prompts; rollouts are
seeded per conversation, so they are the one-process rollouts. The ranks agree on the list of responses that
carry signal and cut it into the one-process mini-batches; each rank computes its part of each, and the
losses are divided by the whole step's counts, so the summed gradients (the engine sums them over ranks)
equal one process's, and so do the step's metrics (gathered over ranks).

**Checkpoints** are the training engine's (`keyeflow.training.engine`): `model/` (with the tokenizer: a
complete `LocalGenerator` input and the next stage's `init`), `trainer.pt` (AdamW, RNG) and `state.json`,
registered atomically in `out_dir/latest`. A run finding `latest` resumes from it: the model, the optimizer,
the RNG and the step; rollout seeds and prompts follow from the step, so the resumed run continues as the
uninterrupted one would. `out_dir/metrics.jsonl` has one line per step (a resume drops lines after its
checkpoint): reward mean and standard deviation, pass rate, clip fractions, hint levels, per-update ratios
and the time of the rollouts, rewards and update; the numeric ones also go to the metrics sink.
`out_dir/hints/step-XXXXXXXX.json` has the step's per-item record: the hint level trained on and the pass
rate of every level tried.

**Before RL starts** (`check_rollout_training_inputs`, DESIGN "better than peers" 9): for a sample with an
image and/or a video, the rollout path (the generator's prompt + a completion) and the training path
(`processor.encode_sample` on the messages + the assistant turn) must build the same input_ids, pixel
values, grids, 3D RoPE positions and labels, and the sampler's log-probs of a sampled completion must equal
the training forward's. `train_gspo` runs it on the first item that has media.

**Rejection-sampling loop** (SPEC §4, P §4.4.3): `pass_rate_filter` keeps RL items whose pass rate under
the policy is strictly between 0 and 1 (every drop with its reason); `rejection_sampling_round` re-samples
the cold-start set with the RL model and replaces a reference by a verified sample that `prefer_fn` (the
reward model's judgement, later) prefers. In both, an item whose generation, reward, verification or
judgement failed is recorded as failed with the reason (no pass rate; the reference kept), and more failed
items than `max_error_share` stop the call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import numbers
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keyeflow.faults import kill_point
from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.generation import BatchGenerationError, Completion, Generator, LocalGenerator
from keyeflow.model.processor import Features, MediaLookup, collate, encode_sample
from keyeflow.model.token_stream import IGNORE_INDEX
from keyeflow.model.tokenizer import IM_END
from keyeflow.quality.errors import (
    DEFAULT_MAX_ERROR_SHARE,
    ErrorShareExceeded,
    ScoringError,
    check_error_share,
    check_max_error_share,
)
from keyeflow.quality.rewards import Reward, RewardCombiner, RewardItem
from keyeflow.training import distributed, sharding
from keyeflow.training.config import GSPOStageConfig
from keyeflow.training.engine import (
    Engine,
    MetricsSink,
    NullSink,
    append_metrics,
    check_kind,
    chunks,
    prepare_out_dir,
    read_metrics,
    resume_point,
    seed_everything,
    write_atomically,
)
from keyeflow.training.hints import HintConfig, HintRecord, item_hints, progressive_hint_sampling
from keyeflow.training.losses import group_advantages, gspo_loss
from keyeflow.training.rollout import (
    RolloutInputMismatch,
    RolloutServer,
    first_difference,
    logprob_tolerance,
)
from keyeflow.training.trainer import vision_dummy

log = logging.getLogger(__name__)

RewardFn = Callable[[Mapping[str, Any], str], "float | Reward"]
# A judge of many rejection-sampling challenges at once: [(row, candidate, incumbent), ...] → per challenge,
# whether the candidate is preferred, or the error its judgement failed with.
RowsPreferFn = Callable[[Sequence[tuple[Mapping[str, Any], str, str]]], Sequence["bool | BaseException"]]
CHECKPOINT_FORMAT = 1
HINTS_DIR = "hints"


# ============================================================================================== items


def _has_media(messages: Sequence[Mapping]) -> bool:
    return any(
        isinstance(part, Mapping) and part.get("type") in ("image", "video")
        for m in messages
        if not isinstance(m.get("content"), str)
        for part in m.get("content") or ()
    )


def _check_items(items: Sequence[Mapping[str, Any]], hints: HintConfig | None) -> list[dict[str, Any]]:
    """The items as dicts, after checking ids, messages (ending with a user turn: rollouts answer it) and,
    when hint sampling is on, that an item with hints has every level up to max_level (before any rollout,
    so a missing hint never stops a run half-way)."""
    if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence) or not items:
        raise ValueError("items must be a non-empty list of {'id', 'messages', ...} rows")
    out, seen = [], set()
    for n, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TypeError(f"item {n} is a {type(item).__name__}, not a mapping")
        item_id = item.get("id")
        if not isinstance(item_id, str) or not item_id:
            raise ValueError(f"item {n}: needs a non-empty string 'id', got {item_id!r}")
        if item_id in seen:
            raise ValueError(f"item id {item_id!r} is repeated")
        seen.add(item_id)
        messages = item.get("messages")
        if (
            isinstance(messages, (str, Mapping))
            or not isinstance(messages, Sequence)
            or not messages
            or not all(isinstance(m, Mapping) for m in messages)
        ):
            raise ValueError(
                f"item {item_id!r}: 'messages' must be a non-empty list of {{'role', 'content'}}"
            )
        if messages[-1].get("role") != "user":
            raise ValueError(
                f"item {item_id!r}: the last message must be the user's turn to answer, got "
                f"{messages[-1].get('role')!r}"
            )
        if hints is not None and item.get("hints"):
            known = item_hints(item)
            missing = [k for k in range(1, hints.max_level + 1) if k not in known]
            if missing:
                raise ValueError(
                    f"item {item_id!r} has hints but none for levels {missing} "
                    f"(hints.max_level={hints.max_level})"
                )
        out.append(dict(item))
    return out


def with_last_user_content(messages: Sequence[Mapping], content: Any) -> list[dict]:
    """`messages` with the content of its last (user) message replaced, e.g. by a hinted prompt."""
    return [*[dict(m) for m in messages[:-1]], dict(messages[-1], content=content)]


def step_items(items: Sequence[Mapping[str, Any]], step: int, prompts_per_step: int, seed: int) -> list:
    """The prompts of step `step` (0-based): epoch e = step // steps_per_epoch uses a permutation seeded by
    (seed, e), cut into steps of `prompts_per_step`; an epoch's leftover items (fewer than a step) are skipped
    that epoch, so no step holds an item twice."""
    steps_per_epoch = len(items) // prompts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"prompts_per_step={prompts_per_step} is more than the {len(items)} items")
    epoch, slot = divmod(step, steps_per_epoch)
    order = list(range(len(items)))
    random.Random(f"keyeflow-gspo:{seed}:{epoch}").shuffle(order)
    return [items[i] for i in order[slot * prompts_per_step : (slot + 1) * prompts_per_step]]


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"keyeflow-gspo-rollout:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# What a reward function raises when it cannot score a response (ScoringError is a RuntimeError): the item is
# set aside as failed. Anything else is a bug and stops the run.
REWARD_ERRORS = (ValueError, TypeError, RuntimeError, KeyError, OSError)


def _reward_value(item_id: str, out: object) -> float:
    value = out.value if isinstance(out, Reward) else out
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"item {item_id!r}: reward_fn returned {out!r}, not a number in [0, 1] or a Reward")
    return float(value)


def rule_reward_fn(combiner: RewardCombiner | None = None) -> RewardFn:
    """A `reward_fn` over item rows from `keyeflow.quality.rewards`: the row's last user content is the
    prompt (its ``/think`` switch picks the format checked), ``reference``, ``task`` (default "math"),
    ``mode``, ``options`` and ``constraints`` go into a `RewardItem`, scored by `combiner` (default: rule
    rewards only)."""
    combiner = combiner or RewardCombiner()

    def reward(item: Mapping[str, Any], response: str) -> Reward:
        reward_item = RewardItem(
            prompt=item["messages"][-1]["content"],
            reference=item.get("reference"),
            task=item.get("task", "math"),
            mode=item.get("mode"),
            options=item.get("options"),
            constraints=tuple(item.get("constraints", ())),
        )
        return combiner(reward_item, response)

    return reward


# ============================================================================================== features


def vision_pad_ids(model: nn.Module) -> frozenset[int]:
    """The image/video pad ids. A completion holding one cannot be teacher-forced: the model reads every such
    id as the placeholder of a vision feature, and a sampled one has no pixels behind it. A trained VLM does
    not emit them; a random or broken policy can. Such a response keeps its reward (it counts in its group's
    advantages) but is left out of the update and counted (`num_unscorable_responses`)."""
    return frozenset({int(model.config.image_token_id), int(model.config.video_token_id)})


def completion_features(prompt: Features, token_ids: Sequence[int]) -> Features:
    """The training inputs of one rollout: `prompt` (as `LocalGenerator.encode_prompt` built it) followed by
    the sampled `token_ids`. Labels are on the completion only (a prompt's own assistant turns are context
    here, not trained); the completion's positions continue in all three RoPE streams at one past the
    prompt's largest position, as the sampler decoded them."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("a completion needs at least one token")
    start = int(prompt.position_ids.max()) + 1 if len(prompt) else 0
    positions = torch.arange(start, start + ids.numel()).expand(3, -1)
    return Features(
        input_ids=torch.cat([prompt.input_ids, ids]),
        labels=torch.cat([torch.full_like(prompt.input_ids, IGNORE_INDEX), ids]),
        pixel_values=prompt.pixel_values,
        grid_thw=prompt.grid_thw,
        position_ids=torch.cat([prompt.position_ids, positions], dim=1),
        num_vision_tokens=prompt.num_vision_tokens,
    )


def completion_logprobs(
    model: nn.Module, features: Sequence[Features], *, pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of the labelled tokens: `(logps, mask)`, both `[B, L − 1]`, one row per
    sample (right-padded, `processor.collate`); `logps[b, t]` scores token t + 1 of row b, `mask` is true on
    the completion tokens (`logps` is 0 elsewhere: only those positions are scored, in chunks, with no
    [tokens, vocabulary] logits). Gradients flow unless the caller disables them."""
    device = next(model.parameters()).device
    batch = collate(features, pack=False, pad_token_id=pad_token_id)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    scored = torch.where(batch["labels"] != IGNORE_INDEX, batch["input_ids"], IGNORE_INDEX).to(device)
    logps = model(**inputs, logprob_labels=scored).token_logprobs
    return logps, (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)


# A response as the update trains it: its inputs, its advantage, the sampled completion and a key naming its
# prompt within the step (responses with one key share the prompt's image/video).
_Response = tuple[Features, float, Completion, int]


def packed_completion_logprobs(
    model: nn.Module,
    features: Sequence[Features],
    *,
    pad_token_id: int = 0,
    vision_embeddings: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logprobs` of `features` packed into one row (attention stays inside each sample, so each
    computes what it would alone, with no padding between them): `(logps, mask)`, both `[n, T]`, row i
    holding sample i's completion-token log-probs from column 0 (T: the longest completion) and `mask` true on
    them. `vision_embeddings`: the LLM-width embeddings of every vision token of the row in order, computed
    by the caller (`PromptVision`: once per prompt, shared by its responses); None: the model runs its ViT
    on the samples' pixels."""
    device = next(model.parameters()).device
    batch = collate(features, pack=True, pad_token_id=pad_token_id)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if vision_embeddings is not None:
        del inputs["pixel_values"]
        inputs["vision_embeddings"] = vision_embeddings
    scored = torch.where(batch["labels"] != IGNORE_INDEX, batch["input_ids"], IGNORE_INDEX).to(device)
    logps = model(**inputs, logprob_labels=scored).token_logprobs[0]  # [L − 1]: t scores token t + 1
    labelled = (batch["labels"][0, 1:] != IGNORE_INDEX).to(device)
    # Samples lie in order and their labelled tokens in order within each: one split cuts them apart.
    counts = torch.bincount(batch["sample_index"][0, 1:][labelled.cpu()], minlength=len(features)).tolist()
    rows = torch.split(logps[labelled], counts)
    padded = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True)
    mask = (
        torch.arange(padded.shape[1], device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    )
    return padded, mask


class PromptVision:
    """The ViT run once per prompt of a mini-batch: a prompt's G responses hold the same image/video tokens,
    so their vision embeddings are the same numbers. `embeddings(keys)` runs a prompt's ViT at its first
    response and hands out its embeddings as a leaf tensor that collects the gradient of every micro-batch
    using it; `done(keys)`, after a micro-batch's backward, runs the ViT's backward of each prompt whose last
    response that was, with the summed gradient (the chain rule's sum over the responses, in one pass instead
    of G), and frees its graph. A prompt's responses are contiguous in a mini-batch, so about one prompt's
    ViT activations are held at a time. With `grad=False` (old and reference log-probs, under no_grad) it
    only saves the forwards."""

    def __init__(self, model: nn.Module, part: Sequence[_Response], *, grad: bool):
        self.model, self.grad = model, grad
        self.prompts: dict[int, Features] = {}
        self.remaining: dict[int, int] = {}  # responses of the prompt not yet through `done`
        for features, _, _, key in part:
            if features.pixel_values.numel():
                self.prompts.setdefault(key, features)
                self.remaining[key] = self.remaining.get(key, 0) + 1
        self.outputs: dict[int, torch.Tensor] = {}
        self.leaves: dict[int, torch.Tensor] = {}

    def embeddings(self, keys: Sequence[int]) -> torch.Tensor | None:
        """The vision embeddings of a micro-batch whose responses belong to prompts `keys` (one key per
        response, in row order)."""
        parts = []
        for key in keys:
            if key not in self.prompts:
                continue
            if key not in self.leaves:
                features = self.prompts[key]
                device = next(self.model.parameters()).device
                out = self.model.get_vision_embeddings(
                    features.pixel_values.to(device), features.grid_thw.to(device)
                ).to(self.model.language_model.embed_tokens.weight.dtype)
                self.outputs[key] = out
                self.leaves[key] = out.detach().requires_grad_(self.grad)
            parts.append(self.leaves[key])
        return torch.cat(parts) if parts else None

    def done(self, keys: Sequence[int]) -> None:
        for key in keys:
            if key not in self.remaining:
                continue
            self.remaining[key] -= 1
            if self.remaining[key] == 0:
                out, leaf = self.outputs.pop(key), self.leaves.pop(key)
                if leaf.grad is not None:
                    out.backward(leaf.grad)


# ================================================================================ input consistency check


def trainer_logprobs(model: nn.Module, prompt: Features, token_ids: Sequence[int]) -> list[float]:
    """The training forward's log-probs of `token_ids` after `prompt` (no grad): what a sampler's numbers are
    checked against."""
    with torch.no_grad():
        logps, mask = completion_logprobs(
            model, [completion_features(prompt, token_ids)], pad_token_id=_pad_id(model)
        )
    return logps[0][mask[0]].tolist()


def check_rollout_training_inputs(
    generator: LocalGenerator,
    messages: Sequence[Mapping],
    response: str,
    *,
    media_lookup: MediaLookup | None = None,
    logprob_atol: float | None = 1e-3,
    max_new_tokens: int = 8,
) -> Features:
    """Check that the rollout and training paths build the same multimodal inputs for `messages` (a prompt
    ending with a user turn, typically with an image and/or a video) answered by `response`; return the
    Features both paths agreed on. Raises `RolloutInputMismatch` naming the first differing field and
    position.

    - rollout path: `generator.encode_prompt(messages)` + the response's ids (`tokenizer.encode(response)` +
      `<|im_end|>`, the tokens a rollout that wrote this text and stopped would carry) via
      `completion_features`, what `train_gspo` trains on;
    - training path: `processor.encode_sample(messages + [assistant: response])` with `media_lookup` (default
      the generator's): the SFT processor, reading media the way the trainer does. Its last tokens, the
      untrained turn separator after `<|im_end|>`, are not part of a rollout; they must be exactly that
      separator. Labels are compared from the completion on (a prompt's own assistant turns are SFT targets
      but RL context);
    - compared: input_ids, pixel_values, grid_thw, position_ids (3D RoPE), labels;
    - then the sampler itself: one greedy completion of `max_new_tokens` from the generator, whose per-token
      log-probs must equal (within `logprob_atol`; None skips) the training forward's on the same ids, so the
      positions and vision features the KV-cached decode used are the trainer's too.
    """
    tokenizer = generator.tokenizer
    merge = generator.model.config.vision_config.spatial_merge_size
    prompt = generator.encode_prompt(messages)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    rollout = completion_features(prompt, [*tokenizer.encode(response, add_special_tokens=False), im_end])
    training = encode_sample(
        [*messages, {"role": "assistant", "content": response}],
        tokenizer,
        media_lookup if media_lookup is not None else generator.media_lookup,
        spatial_merge_size=merge,
    )

    separator = torch.tensor(tokenizer.encode("\n", add_special_tokens=False), dtype=torch.long)
    n = len(rollout)
    tail_ids, tail_labels = training.input_ids[n:], training.labels[n:]
    if (
        len(training) == n + len(separator)
        and torch.equal(tail_ids, separator)
        and bool((tail_labels == IGNORE_INDEX).all())
    ):
        training = Features(
            input_ids=training.input_ids[:n],
            labels=training.labels[:n],
            pixel_values=training.pixel_values,
            grid_thw=training.grid_thw,
            position_ids=training.position_ids[:, :n],
            num_vision_tokens=training.num_vision_tokens,
        )
    expected_labels = training.labels.clone()
    expected_labels[: min(len(prompt), len(expected_labels))] = IGNORE_INDEX

    first_difference("input_ids", rollout.input_ids, training.input_ids)
    first_difference("pixel_values", rollout.pixel_values, training.pixel_values)
    first_difference("grid_thw", rollout.grid_thw, training.grid_thw)
    first_difference("position_ids", rollout.position_ids, training.position_ids)
    first_difference("labels", rollout.labels, expected_labels)

    if logprob_atol is not None:
        model = generator.model
        sampled = generator.generate_one(
            list(messages), n=1, max_new_tokens=max_new_tokens, temperature=0.0, seed=0, logprobs=True
        )[0]
        # A vision pad id cannot be teacher-forced (`vision_pad_ids`): compare the tokens before the first
        # one.
        pads = vision_pad_ids(model)
        keep = next((i for i, t in enumerate(sampled.token_ids) if t in pads), len(sampled.token_ids))
        sampled_ids, sampled_logprobs = sampled.token_ids[:keep], sampled.token_logprobs[:keep]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logps, mask = (
                    completion_logprobs(model, [completion_features(prompt, sampled_ids)])
                    if keep
                    else (torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.bool))
                )
        finally:
            model.train(was_training)
        trained = logps[0][mask[0]].cpu()
        gaps = (trained - torch.tensor(sampled_logprobs)).abs()
        if bool((gaps > logprob_atol).any()):
            at = int((gaps > logprob_atol).nonzero()[0])
            raise RolloutInputMismatch(
                "sampler log-probs",
                (at,),
                f"the sampler gave {sampled_logprobs[at]:.6f} for completion "
                f"token {at}, the training forward {float(trained[at]):.6f} (tolerance {logprob_atol})",
            )
    return rollout


# ============================================================================================== training


@dataclass(frozen=True)
class GSPOResult:
    checkpoint_dir: Path  # the last checkpoint (its `model/` is the next round's init)
    step: int  # steps done
    resumed_from_step: int | None  # the checkpoint this run started from (None: a fresh start)
    history: list[dict[str, Any]]  # metrics.jsonl: one record per step, from step 1 (across resumes)


@dataclass
class _Group:
    """One prompt's G responses as trained: the conversation they answered, completions, rewards."""

    item: dict[str, Any]
    messages: list[dict]
    completions: list[Completion]
    rewards: list[float]
    level: int | None  # hint level trained on (0: none needed; None: unsolved, trained as sampled)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"rollout": 0.0, "reward": 0.0, "update": 0.0}

    def add(self, name: str, started: float) -> None:
        self.seconds[name] += time.perf_counter() - started


def _rollouts(
    generator: Generator,
    config: GSPOStageConfig,
    messages_batch: list[list[dict]],
    seed: int,
    timer: _Timer,
) -> list[list[Completion]]:
    started = time.perf_counter()
    out = generator.generate(
        messages_batch,
        n=config.group_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=seed,
        logprobs=True,
    )
    timer.add("rollout", started)
    return out


def score_responses(reward_fn: RewardFn, item: Mapping[str, Any], responses: Sequence[str]) -> list[float]:
    """The reward of every response to `item`; ScoringError naming the item, the response and the cause when
    one cannot be scored (no value stands in for it)."""
    rewards = []
    for k, response in enumerate(responses):
        try:
            rewards.append(_reward_value(item["id"], reward_fn(item, response)))
        except REWARD_ERRORS as error:
            raise ScoringError(
                f"item {item['id']!r}: reward of response {k} of {len(responses)} failed: "
                f"{type(error).__name__}: {error}"[:500]
            ) from error
    return rewards


def _score(
    reward_fn: RewardFn, item: dict, messages: list[dict], completions: list[Completion], timer: _Timer
) -> list[float]:
    started = time.perf_counter()
    try:
        return score_responses(reward_fn, dict(item, messages=messages), [c.text for c in completions])
    finally:
        timer.add("reward", started)


def _hinted_groups(
    generator: LocalGenerator,
    config: GSPOStageConfig,
    groups: Sequence[_Group],
    reward_fn: RewardFn,
    seed: int,
    timer: _Timer,
) -> tuple[dict[str, tuple[HintRecord, _Group]], dict[str, str]]:
    """Progressive hint sampling for the step's all-failed groups together, one generate call per level over
    every group still unsolved (each conversation keeps its own seed, so the results are those of searching
    the groups one by one). Returns, by item id, the record and the group at the level used (unchanged when
    no level succeeds), and the items whose hinted rollouts could not be scored, with why (their search
    stopped there; they are not trained)."""
    by_id = {group.item["id"]: group for group in groups}
    # One entry per level tried, in level order, per item.
    tried: dict[str, list[tuple[list[dict], list[Completion], list[float]]]] = {i: [] for i in by_id}
    failed: dict[str, str] = {}

    def rollout_batch(items: list[Mapping[str, Any]], prompts: list[Any], n: int) -> list[list[str]]:
        ids = [item["id"] for item in items]
        level_zero = not tried[ids[0]]  # level 0 is the step's own rollouts, already sampled and scored
        messages = [with_last_user_content(by_id[i].item["messages"], p) for i, p in zip(ids, prompts)]
        if level_zero:
            sampled = [by_id[i].completions for i in ids]
        else:
            sampled = _rollouts(generator, config, messages, seed, timer)
        for item_id, conversation, completions in zip(ids, messages, sampled):
            if level_zero:
                rewards = by_id[item_id].rewards
            else:
                try:
                    rewards = _score(reward_fn, by_id[item_id].item, conversation, completions, timer)
                except ScoringError as error:
                    failed[item_id] = f"while scoring hinted rollouts: {error}"
                    rewards = []
            tried[item_id].append((conversation, completions, rewards))
        return [[c.text for c in completions] for completions in sampled]

    def reward(item: Mapping[str, Any], response: str) -> float:
        # Called right after `rollout_batch`, on its responses: the scores are already known. An item whose
        # scoring failed counts as solved, which ends its search (as the error did searching one by one);
        # its record is dropped.
        if item["id"] in failed:
            return 1.0
        _, completions, rewards = tried[item["id"]][-1]
        return rewards[[c.text for c in completions].index(response)]

    hint_items = [dict(g.item, prompt=g.item["messages"][-1]["content"]) for g in groups]
    records = progressive_hint_sampling(
        hint_items, None, reward, config.hints, rollout_batch_fn=rollout_batch
    )
    out: dict[str, tuple[HintRecord, _Group]] = {}
    for record in records:
        if record.item_id in failed:
            continue
        group = by_id[record.item_id]
        if record.level is None:
            out[record.item_id] = (record, group)
        else:
            messages, completions, rewards = tried[record.item_id][record.level]
            out[record.item_id] = (record, _Group(group.item, messages, completions, rewards, record.level))
    return out, failed


def _pad_id(model: nn.Module) -> int:
    return model.config.text_config.pad_token_id or 0


def train_gspo(
    config: GSPOStageConfig,
    *,
    init: str | Path,
    items: Sequence[Mapping[str, Any]],
    reward_fn: RewardFn,
    out_dir: str | Path,
    sink: MetricsSink | None = None,
    media_lookup: MediaLookup | None = None,
) -> GSPOResult:
    """Train the policy at `init` (a checkpoint directory) with GSPO on `items` (rows with `id`, `messages`
    ending in a user turn, and whatever `reward_fn` reads: `reference`, `task`, …; `hints` level → text for
    progressive hint sampling), checkpointing into `out_dir` and resuming from `out_dir/latest` when present.
    `sink`: where parameters and per-step metrics are reported. `media_lookup` resolves image/video parts (as
    `encode_sample`). Under torchrun each rank rolls out its share of every step's prompts (module
    docstring)."""
    out_dir = Path(out_dir)
    items = _check_items(items, config.hints)
    if config.prompts_per_step > len(items):
        raise ValueError(
            f"GSPOStageConfig.prompts_per_step={config.prompts_per_step} is more than the {len(items)} items"
        )
    dist = distributed.setup(need_group=config.fsdp)
    try:
        if config.prompts_per_step < dist.world_size:
            raise ValueError(
                f"GSPOStageConfig.prompts_per_step={config.prompts_per_step}: fewer prompts per step "
                f"than the {dist.world_size} ranks (each rank rolls out at least one prompt)"
            )
        with contextlib.ExitStack() as resources:  # closes what the run started (a rollout server)
            return _train_gspo(
                config, init, items, reward_fn, out_dir, sink or NullSink(), media_lookup, dist, resources
            )
    finally:
        distributed.teardown(dist)


def _train_gspo(
    config: GSPOStageConfig,
    init: str | Path,
    items: list[dict],
    reward_fn: RewardFn,
    out_dir: Path,
    sink: MetricsSink,
    media_lookup: MediaLookup | None,
    dist: distributed.Distributed,
    resources: contextlib.ExitStack,
) -> GSPOResult:
    items_hash = hashlib.sha256(json.dumps([i["id"] for i in items]).encode()).hexdigest()[:16]

    # ---- Where to start: the last registered checkpoint, else `init`.
    resume_dir, saved = resume_point(out_dir)
    if saved:
        check_kind(saved, "gspo", CHECKPOINT_FORMAT)
        if saved["items_hash"] != items_hash:
            raise ValueError(
                f"cannot resume {resume_dir}: it trained on another item list (ids hash "
                f"{saved['items_hash']}, now {items_hash}); start a new out_dir with it as init"
            )
        if saved["config"].get("fsdp", False) != config.fsdp:
            raise ValueError(
                f"cannot resume {resume_dir}: it was written with fsdp={saved['config'].get('fsdp', False)}, "
                f"this run has {config.fsdp} (its weights and optimizer state are in another format)"
            )
        if saved["config_hash"] != config.config_hash():
            changed = sorted(k for k, v in config.to_dict().items() if saved["config"].get(k) != v)
            log.warning("resuming with changed GSPO settings: %s", ", ".join(changed))
    step = saved["step"] if saved else 0
    prepare_out_dir(out_dir, dist, step)

    # ---- Policy and its sampler: one model, shared, so rollouts always come from the current weights. The
    # policy stays in eval mode (no dropout; see the module docstring); every parameter trains. Sharded
    # (FSDP2), the policy is built on the meta device and each rank reads its shards; the sampler holds an
    # unsharded copy, synced from the shards before every step (module docstring).
    policy_dir = resume_dir / "model" if resume_dir else Path(init)
    generator = LocalGenerator(
        policy_dir, media_lookup=media_lookup, device=dist.device if config.fsdp else None
    )
    model, init_weights = sharding.unbuilt_model(policy_dir) if config.fsdp else (generator.model, None)
    engine = Engine(
        model,
        dist=dist,
        learning_rate=config.learning_rate,
        lr_at=lambda _: config.learning_rate,
        grad_clip=config.grad_clip,
        train_mode=False,
        activation_checkpointing=config.activation_checkpointing,
        fsdp=config.fsdp,
        init_weights=None if resume_dir else init_weights,  # a resume reads the shards from dcp/
    )
    reference = None
    if config.gspo.kl_coef > 0:
        reference = load_keye_checkpoint(Path(init)).to(generator.device).eval().requires_grad_(False)
    if saved:
        engine.load(resume_dir, config.seed + step)
    else:
        seed_everything(config.seed + dist.rank)

    # ---- Before any update: the rollout and training paths must see the same multimodal inputs.
    with_media = next((item for item in items if _has_media(item["messages"])), None)
    if with_media is not None:
        fp32 = next(generator.model.parameters()).dtype == torch.float32
        check_rollout_training_inputs(
            generator,
            with_media["messages"],
            str(with_media.get("reference") or "ok"),
            media_lookup=media_lookup,
            # fp32 in process: the same weights, only the computation differs (`rollout.LOGPROB_TOLERANCE`).
            logprob_atol=logprob_tolerance("in_process", "fp32") if fp32 else 1e-3,
        )

    # ---- Rollouts over HTTP (`keyeflow.training.rollout`): the server gets the current weights, is checked.
    # Sharded, the sampler's unsharded copy is what the server is sent: every rank refreshes it from the
    # shards (a collective) before rank 0 exports it, so the export needs no gather of its own.
    served = generator.model if engine.sharded else engine.module
    server = None
    if config.rollout_server is not None:
        if engine.deepspeed is not None:
            raise ValueError(
                "GSPOStageConfig.rollout_server: weight sync needs the full weights on rank 0 (DeepSpeed "
                "partitions them; use fsdp=True)"
            )
        check_item = with_media or items[0]
        server = RolloutServer(
            config.rollout_server, generator, out_dir, dist,
            functools.partial(trainer_logprobs, generator.model), check_item["messages"],
            vision_pad_ids(generator.model),
        )  # fmt: skip
        resources.callback(server.close)
        if engine.sharded:  # the copy holds exactly the policy's weights before the first export
            sharding.copy_full_weights(engine.model, generator.model)
        log.info("rollout server: %s", server.open(served, step))

    if dist.is_main:
        for stale in (out_dir / HINTS_DIR).glob("step-*.json"):  # steps after the checkpoint are run again
            if int(stale.stem.removeprefix("step-")) > step:
                stale.unlink()
        if not saved:
            sink.log_params(
                {
                    "gspo_stage": config.to_dict(),
                    "gspo_stage_hash": config.config_hash(),
                    "init": str(init),
                    "num_items": len(items),
                    "world_size": dist.world_size,
                }
            )
    checkpoint_dir = resume_dir
    log.info(
        "GSPO: steps %d → %d over %d items on %d rank(s)%s",
        step,
        config.max_steps,
        len(items),
        dist.world_size,
        f", resumed from {resume_dir}" if resume_dir else "",
    )

    copy_current = server is not None  # the sampler's copy was refreshed for the server
    while step < config.max_steps:
        started = time.perf_counter()
        if engine.sharded and not copy_current:  # the sampler's copy takes the policy's current weights
            sharding.copy_full_weights(engine.model, generator.model)
        metrics, hint_report = gspo_step(
            config, engine, generator, reference, items, reward_fn, step,
            sampler=server.sampler if server is not None else None,
        )  # fmt: skip
        step += 1
        if server is not None:  # the updated policy onto the server before the next rollouts
            if engine.sharded:
                sharding.copy_full_weights(engine.model, generator.model)
            metrics.update(server.sync(served, step))
        metrics["time_step"] = time.perf_counter() - started
        if dist.is_main:
            write_atomically(
                _hints_path(out_dir, step), json.dumps({"step": step, "items": hint_report}, indent=1)
            )
        append_metrics(out_dir, dist, sink, step, metrics, {"time": time.time()})
        kill_point("gspo.step")  # after the step's update and metrics, before its checkpoint
        log.info(
            "GSPO step %d/%d reward %.3f pass %.2f clip %.3f",
            step,
            config.max_steps,
            metrics["reward_mean"],
            metrics["pass_rate"],
            metrics["clip_fraction"],
        )
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            checkpoint_dir = engine.save(
                out_dir,
                step,
                {
                    "format": CHECKPOINT_FORMAT,
                    "kind": "gspo",
                    "config": config.to_dict(),
                    "config_hash": config.config_hash(),
                    "items_hash": items_hash,
                    "init": str(init),
                },
                tokenizer=generator.tokenizer,
            )
            if dist.is_main:
                sink.set_checkpoint(checkpoint_dir)

    engine.wait_for_checkpoint()  # sharded: the last checkpoint's background write, registered
    assert checkpoint_dir is not None  # the last step always writes one
    return GSPOResult(
        checkpoint_dir=checkpoint_dir,
        step=step,
        resumed_from_step=saved["step"] if saved else None,
        history=read_metrics(out_dir),
    )


def _over_ranks(engine: Engine, value: float, count: int) -> float:
    """The mean over every rank's responses of a per-rank mean `value` over `count` responses."""
    gathered = engine.gather((value, count))
    if len(gathered) == 1:
        return value
    total = sum(n for _, n in gathered)
    return sum(v * n for v, n in gathered if n) / total if total else math.nan


def gspo_step(
    config: GSPOStageConfig,
    engine: Engine,
    generator: LocalGenerator,
    reference: nn.Module | None,
    items: list[dict],
    reward_fn: RewardFn,
    step: int,
    *,
    sampler: Generator | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One step (0-based `step`): rollouts, rewards, hints, advantages, updates. Returns the step's metrics
    and its per-item hint report, both for the whole step (every rank's prompts). Rollouts come from
    `sampler` (an HTTP rollout server) or, by default, `generator` (the policy in process); prompts are
    encoded for the update by `generator` either way.

    With W ranks, rank r rolls out the r-th contiguous share of the step's prompts (each conversation's
    samples are seeded by the conversation, not by its place, so they are the one-process samples); the
    list of responses that carry signal is agreed over all ranks, cut into the same mini-batches as on one
    process, and each rank computes the part of each mini-batch it rolled out. Losses are divided by the
    whole step's counts, so the summed gradients equal one process's."""
    timer = _Timer()
    groups, first, metrics, report = _sample_groups(
        config, engine, sampler or generator, items, reward_fn, step, timer
    )
    started = time.perf_counter()
    plan, num_responses = _mini_batch_plan(config, engine, generator, groups, first, metrics)
    updates, gap_parts = _updates(config, engine, reference, plan, num_responses)
    timer.add("update", started)

    def mean_of(key: str) -> float:
        return sum(u[key] for u in updates) / len(updates) if updates else math.nan

    metrics.update({
        "num_updates": len(updates),
        "loss": mean_of("loss"), "mean_ratio": mean_of("mean_ratio"),
        "clip_fraction": mean_of("clip_fraction") if updates else 0.0,
        "clip_low_fraction": mean_of("clip_low_fraction") if updates else 0.0,
        "clip_high_fraction": mean_of("clip_high_fraction") if updates else 0.0,
        "grad_norm": mean_of("grad_norm"),
        "sampler_logprob_gap": float(torch.cat(gap_parts).mean()) if gap_parts else math.nan,
        "time_rollout": timer.seconds["rollout"], "time_reward": timer.seconds["reward"],
        "time_update": timer.seconds["update"],
        "updates": updates,
    })  # fmt: skip
    return metrics, report


def _sample_groups(
    config: GSPOStageConfig,
    engine: Engine,
    generator: LocalGenerator,
    items: list[dict],
    reward_fn: RewardFn,
    step: int,
    timer: _Timer,
) -> tuple[list[_Group], int, dict[str, Any], dict[str, Any]]:
    """This rank's groups (rollouts, rewards, the hint level trained on), the index of its first prompt in
    the step, the step's reward metrics and its hint report (all ranks)."""
    dist = engine.dist
    seed = _step_seed(config.seed, step)
    batch = step_items(items, step, config.prompts_per_step, config.seed)
    first = dist.rank * len(batch) // dist.world_size
    mine = batch[first : (dist.rank + 1) * len(batch) // dist.world_size]

    # ---- Rollouts and rewards of this rank's prompts; a prompt whose reward failed is not trained.
    sampled = _rollouts(generator, config, [item["messages"] for item in mine], seed, timer)
    groups: list[_Group] = []
    failed: dict[str, str] = {}  # item id → why its reward failed
    for item, completions in zip(mine, sampled):
        try:
            rewards = _score(reward_fn, item, item["messages"], completions, timer)
        except ScoringError as error:
            failed[item["id"]] = str(error)
            continue
        groups.append(_Group(item, item["messages"], completions, rewards, None))
    _check_reward_errors(config, engine, batch, failed, step)
    threshold = config.success_threshold
    all_rewards = [
        r for rank_rewards in engine.gather([r for g in groups for r in g.rewards]) for r in rank_rewards
    ]
    group_rewards = [rs for rank_groups in engine.gather([g.rewards for g in groups]) for rs in rank_groups]
    metrics: dict[str, Any] = {
        "reward_mean": sum(all_rewards) / len(all_rewards),
        # 0 means no group had anything to learn from: every response of the step scored the same.
        "reward_std": statistics.pstdev(all_rewards),
        "pass_rate": sum(r >= threshold for r in all_rewards) / len(all_rewards),
        "num_all_fail": sum(all(r < threshold for r in rs) for rs in group_rewards),
        "num_all_pass": sum(all(r >= threshold for r in rs) for rs in group_rewards),
    }

    # ---- Progressive hints for the groups where every rollout failed.
    report: dict[str, Any] = {
        item_id: {"level": None, "reward_error": why} for item_id, why in failed.items()
    }
    searched = [
        g
        for g in groups
        if config.hints is not None and g.item.get("hints") and all(r < threshold for r in g.rewards)
    ]
    hinted, hint_failed = (
        _hinted_groups(generator, config, searched, reward_fn, seed, timer) if searched else ({}, {})
    )
    for k, group in enumerate(groups):
        item_id = group.item["id"]
        rate = sum(r >= threshold for r in group.rewards) / len(group.rewards)
        if rate > 0:
            groups[k].level = 0
            report[item_id] = {"level": 0, "pass_rates": {"0": rate}}
        elif config.hints is None or not group.item.get("hints"):
            report[item_id] = {
                "level": None,
                "pass_rates": {"0": 0.0},
                "note": "hint sampling off" if config.hints is None else "item has no hints",
            }
        elif item_id in hint_failed:
            report[item_id] = {"level": None, "reward_error": hint_failed[item_id]}
        else:
            record, groups[k] = hinted[item_id]
            report[item_id] = {
                "level": record.level,
                "hint": record.hint,
                "pass_rates": {str(level): rate for level, rate in record.pass_rates.items()},
            }
    groups = [g for g in groups if g.item["id"] not in hint_failed]
    _check_reward_errors(config, engine, batch, {**failed, **hint_failed}, step)
    report = {k: v for rank_report in engine.gather(report) for k, v in rank_report.items()}
    metrics["num_reward_errors"] = sum(1 for entry in report.values() if "reward_error" in entry)
    levels = {item_id: entry["level"] for item_id, entry in report.items() if "reward_error" not in entry}
    metrics["hint_levels"] = levels
    metrics["num_hinted"] = sum(1 for v in levels.values() if v)
    metrics["num_unsolved"] = sum(1 for v in levels.values() if v is None)
    # How many items trained at each level (0 = no hint needed), as numbers a metrics sink keeps per step.
    max_level = config.hints.max_level if config.hints is not None else 0
    for level in range(max_level + 1):
        metrics[f"num_hint_level_{level}"] = sum(1 for v in levels.values() if v == level)

    return groups, first, metrics, report


def _check_reward_errors(
    config: GSPOStageConfig, engine: Engine, batch: list[dict], failed: Mapping[str, str], step: int
) -> None:
    """Raise (on every rank alike) when more of the step's prompts failed than `max_reward_error_share`
    allows, or when none is left to train on."""
    failed_all = {k: v for rank_failed in engine.gather(dict(failed)) for k, v in rank_failed.items()}
    if not failed_all:
        return
    failures = [(item["id"], failed_all[item["id"]]) for item in batch if item["id"] in failed_all]
    what = f"GSPO step {step + 1} rewards"
    check_error_share(what, failures, len(batch), config.max_reward_error_share)
    if len(failures) == len(batch):  # only reachable with a share of 1, which the config refuses
        raise ErrorShareExceeded(f"{what}: every prompt's reward failed; first: {failures[0][1]}")


def _mini_batch_plan(
    config: GSPOStageConfig,
    engine: Engine,
    generator: LocalGenerator,
    groups: list[_Group],
    first: int,
    metrics: dict[str, Any],
) -> tuple[list[list[_Response]], int]:
    """Advantages, and this rank's part of each mini-batch of the responses that carry signal (agreed over
    the ranks); also the step's number of responses (the GSPO mean's N). Adds the counts to `metrics`."""
    # ---- Advantages and the responses that carry signal, agreed over the ranks.
    # (reshaped: a rank whose every prompt failed has no group, and the agreed plan still needs its part)
    advantages = group_advantages(
        torch.tensor([g.rewards for g in groups], dtype=torch.float32).reshape(
            len(groups), config.group_size
        ),
        eps=config.gspo.advantage_eps,
    )
    responses: dict[tuple[int, int], _Response] = {}
    vision_pads = vision_pad_ids(generator.model)
    num_unscorable = 0
    for g, group in enumerate(groups):
        prompt = generator.encode_prompt(group.messages)
        for j, completion in enumerate(group.completions):
            advantage = float(advantages[g, j])
            if vision_pads.intersection(completion.token_ids):
                num_unscorable += 1  # see `vision_pad_ids`; its reward still counts in the group's advantages
            elif advantage != 0.0 or config.gspo.kl_coef > 0:
                responses[(first + g, j)] = (
                    completion_features(prompt, completion.token_ids),
                    advantage,
                    completion,
                    first + g,
                )
    active = sorted(key for rank_keys in engine.gather(sorted(responses)) for key in rank_keys)
    metrics["num_unscorable_responses"] = sum(engine.gather(num_unscorable))
    num_responses = sum(engine.gather(sum(len(g.rewards) for g in groups)))
    num_mini = config.mini_batches_per_step
    # The one-process mini-batches (contiguous slices of the active responses), each rank's part of each.
    plan = [
        [responses[key] for key in chunk if key in responses] for chunk in chunks(active, num_mini) if chunk
    ]
    metrics["num_active_responses"] = len(active)
    lengths = [
        n
        for rank_lengths in engine.gather([len(c.token_ids) for g in groups for c in g.completions])
        for n in rank_lengths
    ]
    metrics["completion_tokens_mean"] = sum(lengths) / num_responses
    levels_used = [level for rank_levels in engine.gather([g.level for g in groups]) for level in rank_levels]
    metrics["hint_level_mean"] = sum(level or 0 for level in levels_used) / len(levels_used)

    return plan, num_responses


def micro_batches(part: Sequence[_Response], max_tokens: int | None) -> list[list[int]]:
    """`part`'s responses (their positions) cut, in order, into micro-batches of at most `max_tokens` tokens
    (prompt + completion); None: one micro-batch of them all."""
    if max_tokens is None:
        return [list(range(len(part)))]
    out: list[list[int]] = []
    used = 0
    for k, (features, *_) in enumerate(part):
        if len(features) > max_tokens:
            raise ValueError(
                f"a response of {len(features)} tokens (prompt + completion) is longer than "
                f"GSPOStageConfig.max_tokens_per_micro_batch={max_tokens}"
            )
        if not out or used + len(features) > max_tokens:
            out.append([])
            used = 0
        out[-1].append(k)
        used += len(features)
    return out


def _mean_over(values: Sequence[float], weights: Sequence[int]) -> float:
    """The `weights`-weighted mean; one value is returned as it is (no rounding through × n / n)."""
    if len(values) == 1:
        return values[0]
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def _updates(
    config: GSPOStageConfig,
    engine: Engine,
    reference: nn.Module | None,
    plan: list[list[_Response]],
    num_responses: int,
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """One update per mini-batch; each update's statistics (all ranks) and the sampler/trainer log-prob
    gaps.

    Without `max_tokens_per_micro_batch` a rank's part of a mini-batch is one padded forward. With it the
    part is cut into packed micro-batches of at most that many tokens, each its own forward and backward,
    the ViT run once per prompt (`PromptVision`); a micro-batch's loss is GSPO's mean over its responses
    times its number of responses over the mini-batch's share of N, so the micro-batches' gradients add up to
    the whole part's."""
    num_mini = config.mini_batches_per_step
    budget = config.max_tokens_per_micro_batch
    model = engine.model
    pad = _pad_id(model)
    cuts = [micro_batches(part, budget) for part in plan]
    # Sharded (FSDP2), every unit's all-gather and reduce-scatter is a collective: every rank runs as many
    # forwards (and backwards) as the rank with the most micro-batches, padding with empty ones, and each
    # forward runs the ViT, on a dummy image (`trainer.vision_dummy`, unlabelled: it changes no number) when
    # it holds no pixels. The ViT-once path is off there: its own ViT forward and backward would run outside
    # the model's, a different number of times on each rank.
    sharded = engine.sharded
    dummy = vision_dummy(model.config) if sharded else None
    once_per_prompt = budget is not None and not sharded
    if sharded:
        most = [max(counts) for counts in zip(*engine.gather([len(c) for c in cuts]))]
        cuts = [c + [[] for _ in range(n - len(c))] for c, n in zip(cuts, most)]

    def logprobs(
        net: nn.Module, part: list[_Response], rows: list[int], vision: PromptVision | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' log-probs and mask; for an empty (padding) micro-batch, the dummy image's."""
        features = [part[i][0] for i in rows]
        if dummy is not None and not any(f.grid_thw.numel() for f in features):
            features.append(dummy)
        if budget is None:
            logps, mask = completion_logprobs(net, features, pad_token_id=pad)
        else:
            shared = vision.embeddings([part[i][3] for i in rows]) if vision is not None else None
            logps, mask = packed_completion_logprobs(
                net, features, pad_token_id=pad, vision_embeddings=shared
            )
            if vision is not None and not torch.is_grad_enabled():
                vision.done([part[i][3] for i in rows])  # nothing to backpropagate: free the embeddings
        return (logps[: len(rows)], mask[: len(rows)]) if rows else (logps, mask)

    # ---- Old (and reference) log-probs, all before the first update (module docstring); one tensor per
    # micro-batch.
    old: list[list[torch.Tensor] | None] = [None] * len(plan)
    ref: list[list[torch.Tensor | None]] = [[None] * len(c) for c in cuts]
    with torch.no_grad():
        for k, part in enumerate(plan):
            if not part and not sharded:
                continue
            if k > 0:
                vision = PromptVision(model, part, grad=False) if once_per_prompt else None
                old[k] = [logprobs(model, part, rows, vision)[0] for rows in cuts[k]]
            if reference is not None:  # an unsharded model: no collective, no padding needed
                vision = PromptVision(reference, part, grad=False) if budget is not None else None
                ref[k] = [logprobs(reference, part, rows, vision)[0] if rows else None for rows in cuts[k]]

    # ---- Updates: one per mini-batch; a rank without a part of it still takes part in the gradient sum.
    keys = [
        "loss",
        "mean_ratio",
        "clip_fraction",
        "clip_low_fraction",
        "clip_high_fraction",
        *(["kl"] if reference is not None else []),
    ]
    updates, gaps = [], []
    for k, part in enumerate(plan):
        record: dict[str, Any] = {}
        if part or sharded:
            vision = PromptVision(engine.module, part, grad=True) if once_per_prompt else None
            first_old = old[k] is None
            if first_old:
                old[k] = []
            stats: dict[str, list[float]] = {key: [] for key in (*keys, "max_abs_log_ratio")}
            for m, rows in enumerate(cuts[k]):
                logps, mask = logprobs(engine.forward, part, rows, vision)
                if first_old:
                    old[k].append(logps.detach())
                if not rows:  # padding (sharded): the units' collectives, a zero gradient
                    engine.backward(logps.sum() * 0.0)
                    continue
                old_logps = old[k][m]
                adv = torch.tensor([part[i][1] for i in rows], dtype=torch.float32, device=logps.device)
                out = gspo_loss(config.gspo, logps, adv, mask, old_logps=old_logps, ref_logps=ref[k][m])
                # GSPO's mean over all N responses of the step, spread evenly over the mini-batches (module
                # docstring).
                engine.backward(out.loss * len(rows) / (num_responses / num_mini))
                if vision is not None:
                    vision.done([part[i][3] for i in rows])  # the ViT's backward of prompts now complete
                log_ratio = ((logps.detach() - old_logps) * mask).sum(dim=1) / mask.sum(dim=1)
                stats["loss"].append(float(out.loss.detach()))
                stats["mean_ratio"].append(float(out.mean_ratio))
                stats["max_abs_log_ratio"].append(float(log_ratio.abs().max()))
                stats["clip_fraction"].append(float(out.clip_fraction))
                stats["clip_low_fraction"].append(float(out.clip_low_fraction))
                stats["clip_high_fraction"].append(float(out.clip_high_fraction))
                if out.kl is not None:
                    stats["kl"].append(float(out.kl.detach()))
                for row, i in enumerate(rows):
                    trained = old_logps[row][mask[row]].cpu()
                    gaps.append((trained - torch.tensor(part[i][2].token_logprobs)).abs())
        if part:
            sizes = [len(rows) for rows in cuts[k] if rows]
            record = {key: _mean_over(stats[key], sizes) for key in keys}
            record["max_abs_log_ratio"] = max(stats["max_abs_log_ratio"])
        grad_norm = engine.step()
        size = sum(engine.gather(len(part)))
        update = {"num_responses": size}
        for (
            key
        ) in keys:  # every rank gathers every key (collectives must match), a rank without a part adds 0
            update[key] = _over_ranks(engine, record.get(key, math.nan), len(part) if record else 0)
        update["max_abs_log_ratio"] = max(
            r for r in engine.gather(record.get("max_abs_log_ratio", -math.inf))
        )
        update["grad_norm"] = grad_norm
        updates.append(update)
    gap_parts = [g for g in engine.gather(torch.cat(gaps) if gaps else None) if g is not None]
    return updates, gap_parts


def _hints_path(out_dir: Path, step: int) -> Path:
    path = out_dir / HINTS_DIR / f"step-{step:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ============================================================================ the rejection-sampling loop


@dataclass(frozen=True)
class PassRateRecord:
    item_id: str
    pass_rate: float | None  # share of the G rollouts that passed (None: generation or a reward failed)
    kept: bool
    reason: str
    failed: bool = False  # generation or a reward failed: no pass rate, not kept


@dataclass(frozen=True)
class PassRateFilterResult:
    kept: list[dict[str, Any]]  # the items with 0 < pass rate < 1, in order, each with its `pass_rate`
    records: list[PassRateRecord]  # one per item, in order, kept or not and why

    @property
    def pass_rates(self) -> dict[str, float | None]:
        return {r.item_id: r.pass_rate for r in self.records}


def _generate_each(
    generator: Generator, messages_batch: list[list[dict]], **kwargs: Any
) -> list[list[Completion] | Exception]:
    """Completions per conversation, or the error of each conversation that failed (the others are kept)."""
    try:
        return list(generator.generate(messages_batch, **kwargs))
    except BatchGenerationError as error:
        return error.results
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        if len(messages_batch) == 1:  # a batch of one raises its conversation's own error
            return [error]
        raise


def pass_rate_filter(
    policy_generator: Generator,
    items: Sequence[Mapping[str, Any]],
    G: int,
    reward_fn: RewardFn,
    *,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    seed: int = 0,
    success_threshold: float = 0.5,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
) -> PassRateFilterResult:
    """The RL item rule of the rejection-sampling loop: sample `G` responses per item from the policy, score
    them with `reward_fn`; keep the items whose pass rate (share with reward >= `success_threshold`) is
    strictly between 0 and 1 (an item always solved or never solved gives GSPO no signal). Every item gets a
    record with its rate; an item whose generation or any of whose rewards failed is dropped as failed, with
    the error as its reason (no pass rate: it is unknown, not 0), and more failed items than
    `max_error_share` raise ErrorShareExceeded."""
    if isinstance(G, bool) or not isinstance(G, int) or G < 2:
        raise ValueError(f"G={G!r}: a pass rate strictly between 0 and 1 needs at least 2 rollouts")
    check_max_error_share("pass_rate_filter", max_error_share)
    items = _check_items(items, None)
    results = _generate_each(
        policy_generator,
        [item["messages"] for item in items],
        n=G,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        logprobs=False,
    )
    kept, records = [], []
    for item, result in zip(items, results):
        if isinstance(result, Exception):
            records.append(
                PassRateRecord(
                    item["id"],
                    None,
                    False,
                    f"generation failed: {type(result).__name__}: {result}",
                    failed=True,
                )
            )
            continue
        try:
            rewards = score_responses(reward_fn, item, [c.text for c in result])
        except ScoringError as error:
            records.append(PassRateRecord(item["id"], None, False, str(error), failed=True))
            continue
        rate = sum(r >= success_threshold for r in rewards) / len(rewards)
        if rate == 0.0:
            records.append(PassRateRecord(item["id"], rate, False, f"too hard: 0 of {G} rollouts passed"))
        elif rate == 1.0:
            records.append(PassRateRecord(item["id"], rate, False, f"too easy: all {G} rollouts passed"))
        else:
            records.append(
                PassRateRecord(item["id"], rate, True, f"{round(rate * G)} of {G} rollouts passed")
            )
            kept.append(dict(item, pass_rate=rate))
    failures = [(r.item_id, r.reason) for r in records if r.failed]
    check_error_share("pass-rate filter", failures, len(items), max_error_share)
    return PassRateFilterResult(kept, records)


@dataclass(frozen=True)
class RejectionRecord:
    row_id: str
    replaced: bool
    reason: str
    num_sampled: int
    num_verified: int
    previous_reference: str  # the reference the row had before this round
    failed: bool = False  # generation, verification or the judgement failed: the reference is kept


@dataclass(frozen=True)
class RejectionRound:
    rows: list[dict[str, Any]]  # the cold-start rows, references replaced where a sample was preferred
    records: list[RejectionRecord]  # one per row, in order

    @property
    def num_replaced(self) -> int:
        return sum(r.replaced for r in self.records)

    @property
    def num_failed(self) -> int:
        return sum(r.failed for r in self.records)


def rejection_sampling_round(
    rl_generator: Generator,
    cold_start_rows: Sequence[Mapping[str, Any]],
    verify_fn: Callable[[Mapping[str, Any], str], bool],
    prefer_fn: Callable[[str, str], bool] | None,
    k: int,
    *,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    seed: int = 0,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
    rows_prefer_fn: RowsPreferFn | None = None,
) -> RejectionRound:
    """One round of SPEC §4's rejection-sampling loop over the cold-start set. Each row has an `id` and
    `messages` ending with the reference assistant response. The RL model samples `k` responses to the
    conversation before it; `verify_fn(row, response)` keeps the correct ones; they then challenge the
    reference one by one, `prefer_fn(candidate, incumbent)` deciding, and a preferred candidate becomes the
    incumbent (as many judge calls as verified samples, and under a consistent judge the result is preferred
    over the reference and over every other verified sample). The row's reference becomes the final
    incumbent. A row whose generation, verification or judgement failed (`verify_fn` or `prefer_fn` raised:
    a judge gives no "not preferred" for a failed request) keeps its reference, recorded as failed with the
    error as the reason; more failed rows than `max_error_share` raise ErrorShareExceeded. A judge that must
    know the row (the question the two responses answer) is given as `rows_prefer_fn` instead of `prefer_fn`
    (exactly one of them): it is asked once per challenge position with every row's challenge at that
    position, `[(row, candidate, incumbent), ...]` → a bool or the error its judgement failed with, each (a
    batched judge decodes them together; the rounds, incumbents and records are those of asking row by
    row). Every row's samples come from one generate call."""
    if (prefer_fn is None) == (rows_prefer_fn is None):
        raise ValueError("give exactly one of prefer_fn and rows_prefer_fn")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: must be an integer >= 1")
    check_max_error_share("rejection_sampling_round", max_error_share)
    rows, prompts = [], []
    for n, row in enumerate(cold_start_rows):
        row_id = row.get("id") if isinstance(row, Mapping) else None
        messages = row.get("messages") if isinstance(row, Mapping) else None
        if not isinstance(row_id, str) or not row_id:
            raise ValueError(f"cold-start row {n}: needs a non-empty string 'id'")
        if (
            isinstance(messages, (str, Mapping))
            or not isinstance(messages, Sequence)
            or len(messages) < 2
            or not isinstance(messages[-1], Mapping)
            or messages[-1].get("role") != "assistant"
            or not isinstance(messages[-1].get("content"), str)
        ):
            raise ValueError(
                f"cold-start row {row_id!r}: 'messages' must end with the reference assistant "
                "response (a string) after the conversation it answers"
            )
        rows.append(dict(row))
        prompts.append([dict(m) for m in messages[:-1]])
    results = _generate_each(
        rl_generator,
        prompts,
        n=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        logprobs=False,
    )
    if rows_prefer_fn is None:

        def rows_prefer_fn(challenges: Sequence[tuple[Mapping[str, Any], str, str]]) -> list:
            out: list[bool | Exception] = []
            for _, candidate, incumbent in challenges:
                try:
                    out.append(bool(prefer_fn(candidate, incumbent)))
                except REWARD_ERRORS as error:
                    out.append(error)
            return out

    # Per row: its verified samples (or why it failed), then its incumbent and the sample that became it.
    verified: list[list[str]] = []
    failed: dict[int, str] = {}
    for n, (row, result) in enumerate(zip(rows, results)):
        verified.append([])
        if isinstance(result, Exception):
            failed[n] = f"generation failed: {type(result).__name__}: {result}"
            continue
        try:
            verified[n] = [c.text for c in result if verify_fn(row, c.text)]
        except REWARD_ERRORS as error:
            failed[n] = f"verification failed: {type(error).__name__}: {error}"[:500]
    incumbents = [row["messages"][-1]["content"] for row in rows]
    winners: list[int | None] = [None] * len(rows)
    # Challenge position j: every row's j-th verified sample against its incumbent, one judge call for all.
    for j in range(max((len(v) for v in verified), default=0)):
        pending = [n for n in range(len(rows)) if n not in failed and len(verified[n]) > j]
        if not pending:
            continue
        challenges = [(rows[n], verified[n][j], incumbents[n]) for n in pending]
        try:
            decisions = list(rows_prefer_fn(challenges))
        except REWARD_ERRORS:
            # A judge that refuses the whole batch over one row: asked one at a time, only that row fails.
            decisions = []
            for challenge in challenges:
                try:
                    decisions += list(rows_prefer_fn([challenge]))
                except REWARD_ERRORS as error:
                    decisions.append(error)
        if len(decisions) != len(pending):
            raise ValueError(f"rows_prefer_fn gave {len(decisions)} decisions for {len(pending)} challenges")
        for n, decision in zip(pending, decisions):
            if isinstance(decision, BaseException):
                failed[n] = f"judgement failed: {type(decision).__name__}: {decision}"[:500]
            elif decision:
                incumbents[n], winners[n] = verified[n][j], j
    new_rows, records = [], []
    for n, (row, prompt, result) in enumerate(zip(rows, prompts, results)):
        reference = row["messages"][-1]["content"]
        num_sampled = 0 if isinstance(result, Exception) else len(result)
        if n in failed:
            new_rows.append(row)
            records.append(
                RejectionRecord(
                    row["id"], False, failed[n], num_sampled, len(verified[n]), reference, failed=True
                )
            )
            continue
        winner = winners[n]
        if not verified[n]:
            reason = f"none of {k} samples verified correct"
        elif winner is None:
            reason = f"{len(verified[n])} of {k} verified, none preferred over the reference"
        else:
            reason = (
                f"verified sample {winner + 1} of {len(verified[n])} ({k} sampled) preferred over the "
                "reference"
            )
        if winner is None:
            new_rows.append(row)
        else:
            new_rows.append(dict(row, messages=[*prompt, dict(row["messages"][-1], content=incumbents[n])]))
        records.append(
            RejectionRecord(row["id"], winner is not None, reason, num_sampled, len(verified[n]), reference)
        )
    failures = [(r.row_id, r.reason) for r in records if r.failed]
    check_error_share("rejection sampling", failures, len(records), max_error_share)
    return RejectionRound(new_rows, records)
