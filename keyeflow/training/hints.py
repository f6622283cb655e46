"""Progressive hint sampling (SPEC §4, P §4.4.2): give the policy a learning signal on items it always fails.

An item whose every rollout is wrong gives GSPO nothing: all rewards equal, every advantage 0. Keye appends a
hint after the query and raises it one level at a time, then trains on the responses at the lowest level
that succeeds. The levels (:data:`HINT_LEVELS`), weakest to strongest:

- L1 concept / observation — what to notice, which idea applies;
- L2 strategy / method — how to attack the problem;
- L3 tool / formula — the theorem, formula or tool to use;
- L4 first concrete step — the opening step carried out;
- L5 complete solution — a full worked solution.

(Keye's measurement, ≈8,000 items with 4 rollouts: the all-wrong share falls from 25.6% without a hint to
13.4 / 12.3 / 10.1 / 9.0 / 0.2% at L1…L5; :func:`unsolved_share_by_level` gives the same numbers here.)

:func:`progressive_hint_sampling` works level by level over the whole set (level 0 = no hint for every item,
then L1 for the items still unsolved, and so on), so one level's rollouts can go to the policy together
and an item stops as soon as one level gets a success. Every item is a mapping (a table row) with:

- ``id``: unique; ``prompt``: the user text, or a multimodal content list (``[{"type": "image", …},
  {"type": "text", "text": …}]``);
- ``hints`` (optional): level → hint text; keys may be ints or the strings "1" / "L1" (JSON and table
  columns turn keys into strings). Levels it lacks are written on demand by ``hint_writer(item, level)``
  (e.g. a teacher model with :func:`hint_writer_prompt`), only for the items and levels actually reached;
  the record returns every hint known afterwards so a flow can store them on the item. The general RL items
  (``keyeflow.longcot.rl_items.longcot_rl_items``) carry all five, derived from their question's reference
  solution (concept, method, tool, first step, every step with the answer);
- whatever ``reward_fn(item, response)`` needs (a reference answer, …).

``rollout_fn(prompt, n)`` is the policy: ``n`` responses to one prompt. Or ``rollout_batch_fn(items,
prompts, n)``: ``n`` responses to each prompt of a list (``prompts[i]`` is ``items[i]``'s at this level),
called once per level with every item still unsolved, so a local policy decodes them together (the same
records either way). ``reward_fn`` returns a float in [0, 1] or a :class:`~keyeflow.quality.rewards.Reward`;
a rollout succeeds when its reward reaches ``success_threshold``.

Where the hint goes (:func:`hinted_prompt`): SPEC says "append a hint after the query". It is appended to
the query text with ``hint_template`` (default a blank line then ``Hint: …``), and **before** a trailing
``/think`` / ``/no_think`` switch, which Keye reads only at the very end of the user text. In a content
list it goes into the last text part (a new text part at the end when there is none). **UNSTATED**: the
template; it is a config field.

The record per item (:class:`HintRecord`): the level used (0 = no hint needed, k = the lowest level with a
success, None = never solved up to ``max_level``), the pass rate of every level tried, the training prompt
(the prompt with the level-k hint; the original prompt at level 0; None when never solved, as there is
nothing to train on), and the rollouts and rewards at that level (the group GSPO trains on).
"""

from __future__ import annotations

import copy
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keyeflow.config import check_int, check_number, invalid
from keyeflow.quality.rewards import Reward

HINT_LEVELS: dict[int, str] = {
    1: "a concept or observation: what to notice or which idea applies, no method and no numbers worked out",
    2: "a strategy or method: how to attack the problem, without the formula or any computation",
    3: "a tool or formula: the theorem, formula or tool to use, without applying it",
    4: "the first concrete step: carry out the opening step only, and stop",
    5: "a complete solution: every step worked out to the final answer",
}
MAX_LEVEL = max(HINT_LEVELS)

Prompt = str | list[dict[str, Any]]
RolloutFn = Callable[[Prompt, int], Sequence[str]]
RolloutBatchFn = Callable[[list[Mapping[str, Any]], list[Prompt], int], Sequence[Sequence[str]]]
RewardFn = Callable[[Mapping[str, Any], str], "float | Reward"]
HintWriter = Callable[[Mapping[str, Any], int], str]

# ============================================================================================= config


@dataclass(frozen=True, kw_only=True)
class HintConfig:
    """How progressive hint sampling runs.

    ``rollouts_per_level``: responses sampled per item at each level tried (Keye measured with 4).
    ``max_level``: the strongest level tried (1–5). ``success_threshold``: a rollout succeeds when its
    reward is at least this (in (0, 1]; 0.5 passes binary rewards at 1 and a continuous reward that is more
    right than wrong). ``hint_template``: how a hint is written into the prompt; must hold ``{hint}`` and
    may hold ``{level}``.
    """

    rollouts_per_level: int = 4
    max_level: int = MAX_LEVEL
    success_threshold: float = 0.5
    hint_template: str = "\n\nHint: {hint}"

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "rollouts_per_level",
            check_int("HintConfig", "rollouts_per_level", self.rollouts_per_level, minimum=1),
        )
        object.__setattr__(
            self,
            "max_level",
            check_int("HintConfig", "max_level", self.max_level, minimum=1, maximum=MAX_LEVEL),
        )
        # Kept as given, not made a float: a GSPO stage's hash holds it.
        check_number("HintConfig", "success_threshold", self.success_threshold)
        if not 0.0 < self.success_threshold <= 1.0:
            raise invalid(
                "HintConfig",
                "success_threshold",
                self.success_threshold,
                "must be in (0, 1]: rewards are in [0, 1] and 0 would pass everything",
            )
        if not isinstance(self.hint_template, str) or "{hint}" not in self.hint_template:
            raise invalid(
                "HintConfig", "hint_template", self.hint_template, "must be a string holding {hint}"
            )
        try:
            self.hint_template.format(hint="", level=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise invalid(
                "HintConfig",
                "hint_template",
                self.hint_template,
                f"only {{hint}} and {{level}} may be used ({exc!r})",
            ) from exc


# ============================================================================================= prompts

_MODE_SWITCH = re.compile(r"\s*/(?:no_)?think\s*$")


def _insert_hint(text: str, addition: str) -> str:
    m = _MODE_SWITCH.search(text)
    at = m.start() if m else len(text)
    return text[:at] + addition + text[at:]


def hinted_prompt(prompt: Prompt, hint: str, level: int, template: str = HintConfig.hint_template) -> Prompt:
    """``prompt`` with ``hint`` appended after the query (before a trailing ``/think`` or ``/no_think``).

    A content list is copied, the hint going into its last text part (or a new text part at the end).
    """
    addition = template.format(hint=hint, level=level)
    if isinstance(prompt, str):
        return _insert_hint(prompt, addition)
    parts = copy.deepcopy(list(prompt))
    for part in reversed(parts):
        if isinstance(part, dict) and part.get("type") == "text":
            part["text"] = _insert_hint(str(part.get("text", "")), addition)
            return parts
    return parts + [{"type": "text", "text": addition.lstrip()}]


def hint_writer_prompt(
    question: str, level: int, reference: str | None = None, solution: str | None = None
) -> str:
    """A request to a teacher model for the level-``level`` hint to ``question`` (for a ``hint_writer``)."""
    if level not in HINT_LEVELS:
        raise ValueError(f"level must be one of {sorted(HINT_LEVELS)}, got {level!r}")
    lines = [
        (
            f"Write a level-{level} hint for the question below. Hint levels go from 1 (weakest) to 5 "
            f"(strongest); level {level} is {HINT_LEVELS[level]}."
        ),
        "Do not state the final answer"
        + (" unless the level is a complete solution." if level == 5 else "."),
        "Reply with the hint only.",
        "",
        f"Question: {question}",
    ]
    if reference is not None:
        lines.append(f"Reference answer (for you, not to be revealed below level 5): {reference}")
    if solution is not None:
        lines.append(f"Reference solution: {solution}")
    return "\n".join(lines)


def _level_key(key: object) -> int:
    """A hint level from a mapping key: 3, "3" or "L3"."""
    if isinstance(key, int) and not isinstance(key, bool):
        level = key
    elif isinstance(key, str) and (m := re.fullmatch(r"\s*[Ll]?([0-9]+)\s*", key)):
        level = int(m.group(1))
    else:
        raise ValueError(f"hint level {key!r} is not a level (1-5, '3' or 'L3')")
    if level not in HINT_LEVELS:
        raise ValueError(f"hint level {key!r} is outside 1-{MAX_LEVEL}")
    return level


def item_hints(item: Mapping[str, Any]) -> dict[int, str]:
    """The hints an item carries, by level (ValueError for a bad level or an empty hint)."""
    raw = item.get("hints") or {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"item {item.get('id')!r}: hints must be a mapping level -> text")
    hints: dict[int, str] = {}
    for key, text in raw.items():
        level = _level_key(key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"item {item.get('id')!r}: the L{level} hint is empty")
        if level in hints:
            raise ValueError(f"item {item.get('id')!r}: two hints for L{level}")
        hints[level] = text
    return hints


# ============================================================================================ sampling


@dataclass(frozen=True)
class HintRecord:
    """What progressive hint sampling found for one item (module docstring)."""

    item_id: str
    level: int | None  # 0: no hint needed; k: lowest hint level with a success; None: never solved
    pass_rates: dict[int, float]  # every level tried → share of its rollouts that succeeded
    training_prompt: Prompt | None  # the prompt with the level-`level` hint; None when never solved
    hint: str | None  # the hint text at `level` (None at level 0 or when never solved)
    responses: tuple[str, ...] = ()  # the rollouts at `level` (empty when never solved)
    rewards: tuple[float, ...] = ()  # their rewards, same order
    hints: dict[int, str] = field(default_factory=dict)  # every hint known after the run (given + written)


def _reward_value(item_id: str, out: object) -> float:
    value = out.value if isinstance(out, Reward) else out
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"item {item_id!r}: reward_fn returned {out!r}, not a number in [0, 1] or a Reward")
    return float(value)


def _checked_responses(responses: Sequence[str], n: int, item_id: str, level: int, name: str) -> list[str]:
    responses = list(responses)
    if len(responses) != n or not all(isinstance(r, str) for r in responses):
        raise ValueError(
            f"item {item_id!r} at L{level}: {name} must return {n} strings, got {len(responses)} values"
        )
    return responses


def _level_rollouts(
    rollout_fn: RolloutFn | None,
    rollout_batch_fn: RolloutBatchFn | None,
    items: list[Mapping[str, Any]],
    prompts: list[Prompt],
    n: int,
    level: int,
) -> list[list[str]]:
    """The responses to every prompt of one level: one `rollout_batch_fn` call, or `rollout_fn` per prompt."""
    item_ids = [item["id"] for item in items]
    if rollout_batch_fn is None:
        return [
            _checked_responses(rollout_fn(prompt, n), n, item_id, level, "rollout_fn")
            for prompt, item_id in zip(prompts, item_ids)
        ]
    batch = list(rollout_batch_fn(items, prompts, n))
    if len(batch) != len(prompts):
        raise ValueError(f"L{level}: rollout_batch_fn must return {len(prompts)} lists, got {len(batch)}")
    return [
        _checked_responses(responses, n, item_id, level, "rollout_batch_fn")
        for responses, item_id in zip(batch, item_ids)
    ]


def progressive_hint_sampling(
    items: Sequence[Mapping[str, Any]],
    rollout_fn: RolloutFn | None,
    reward_fn: RewardFn,
    config: HintConfig | None = None,
    *,
    hint_writer: HintWriter | None = None,
    rollout_batch_fn: RolloutBatchFn | None = None,
) -> list[HintRecord]:
    """One :class:`HintRecord` per item, in order: the lowest hint level (0 = none) at which at least one of
    ``config.rollouts_per_level`` rollouts succeeds, trying levels 0, 1, … ``config.max_level``.

    The policy is ``rollout_fn`` (one prompt a call) or ``rollout_batch_fn`` (every unsolved item's prompt
    of a level in one call); exactly one is given. Without a ``hint_writer``, every item must carry hints for
    levels 1 … ``max_level`` (checked before any rollout, so a missing hint never wastes a run half-way).
    """
    if (rollout_fn is None) == (rollout_batch_fn is None):
        raise ValueError("give exactly one of rollout_fn and rollout_batch_fn")
    config = config or HintConfig()
    ids = [item.get("id") for item in items]
    for item, item_id in zip(items, ids):
        if not isinstance(item_id, str) or not item_id:
            raise ValueError(f"every item needs a non-empty string 'id', got {item_id!r}")
        if not isinstance(item.get("prompt"), (str, list)) or not item["prompt"]:
            raise ValueError(f"item {item_id!r}: 'prompt' must be a non-empty string or content list")
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"item ids must be unique, repeated: {duplicates}")
    hints = {item["id"]: item_hints(item) for item in items}
    if hint_writer is None:
        for item_id, known in hints.items():
            missing = [k for k in range(1, config.max_level + 1) if k not in known]
            if missing:
                raise ValueError(
                    f"item {item_id!r} has no hint for levels {missing} and no hint_writer was given"
                )

    pass_rates: dict[str, dict[int, float]] = {item_id: {} for item_id in ids}
    solved: dict[str, tuple[int, Prompt, list[str], list[float]]] = {}
    n = config.rollouts_per_level
    for level in range(config.max_level + 1):
        # The items still unsolved, each with this level's prompt.
        todo: list[tuple[Mapping[str, Any], Prompt]] = []
        for item in items:
            item_id = item["id"]
            if item_id in solved:
                continue
            if level == 0:
                prompt = item["prompt"]
            else:
                if level not in hints[item_id]:
                    text = hint_writer(
                        item, level
                    )  # not None: without a writer every hint was checked present
                    if not isinstance(text, str) or not text.strip():
                        raise ValueError(
                            f"item {item_id!r}: hint_writer returned no L{level} hint ({text!r})"
                        )
                    hints[item_id][level] = text
                prompt = hinted_prompt(item["prompt"], hints[item_id][level], level, config.hint_template)
            todo.append((item, prompt))
        if not todo:
            break
        level_responses = _level_rollouts(
            rollout_fn, rollout_batch_fn, [i for i, _ in todo], [p for _, p in todo], n, level
        )
        for (item, prompt), responses in zip(todo, level_responses):
            item_id = item["id"]
            rewards = [_reward_value(item_id, reward_fn(item, r)) for r in responses]
            num_success = sum(r >= config.success_threshold for r in rewards)
            pass_rates[item_id][level] = num_success / n
            if num_success:
                solved[item_id] = (level, prompt, responses, rewards)

    records = []
    for item_id in ids:
        known = dict(sorted(hints[item_id].items()))
        if item_id not in solved:
            records.append(HintRecord(item_id, None, pass_rates[item_id], None, None, hints=known))
            continue
        level, prompt, responses, rewards = solved[item_id]
        records.append(
            HintRecord(
                item_id,
                level,
                pass_rates[item_id],
                prompt,
                known[level] if level else None,
                tuple(responses),
                tuple(rewards),
                known,
            )
        )
    return records


def unsolved_share_by_level(records: Sequence[HintRecord], max_level: int = MAX_LEVEL) -> dict[int, float]:
    """Level k → share of items with no success at any level up to k (Keye's "all-wrong share" with hints
    up to k; level 0 is the share that fails without a hint). Non-increasing in k."""
    if not records:
        return {}
    return {
        k: sum(r.level is None or r.level > k for r in records) / len(records) for k in range(max_level + 1)
    }
