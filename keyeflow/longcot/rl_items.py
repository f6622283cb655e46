"""What RL trains on: items with a prompt and what a reward can check.

- General RL (GSPO) items come from `longcot_questions`: each question with its reference answer and the
  checker its domain needs (counting → count, grounding → box IoU, everything else → answer equivalence),
  and hints L1-L5 derived from its reference solution (`solution_hints`) when it has one.
- Alignment RL items are instruction prompts with hard constraints (output mode, JSON keys, word limits,
  keywords, bullets, code that parses): `alignment_prompts()` writes a small deterministic set from templates
  for demos and tests (a real run reads its own prompt set in the same dict form).

An item is a plain dict — `id`, `messages` (a chat, media parts by path), `reference` (or None), `task` (a
`rewards.TASKS` checker), `mode`, `constraints` (`[kind, value]` pairs) and `hints` (`{"L1": text, …,
"L5": text}`, absent when the question has no full reference solution) — so it goes through Prefect and JSON
unchanged; `reward_item` turns it into the rewards' `RewardItem`.

Hints from a reference solution (`solution_hints`; the levels are `keyeflow.training.hints.HINT_LEVELS`):

- L1 concept / observation: the solution's `concept` (what to notice);
- L2 strategy / method: its `method` (how to attack the problem);
- L3 tool / formula: its `tool` (the operation or formula to use);
- L4 first concrete step: its first step, carried out;
- L5 complete solution: every step, then "The answer is <reference>."

Each level holds more of the solution than the one before: L4 adds a worked step to L1-L3's pointers and
L5 is the only level that states the answer. A solution without `concept`, `method` or `tool` gives no
hints (the GSPO step then keeps the item's failed group as sampled, or a hint writer fills them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from keyeflow.datasets import tables
from keyeflow.datasets.tables import TableRef
from keyeflow.longcot.generate import user_content
from keyeflow.quality.rewards import Constraint, RewardItem

DOMAIN_CHECKERS = {"counting": "count", "grounding": "grounding"}  # others: answer equivalence ("math")
THINK = " /think"
NO_THINK = " /no_think"


HINT_FIELDS = ("concept", "method", "tool")  # L1, L2, L3


def solution_hints(solution: Mapping[str, Any] | None, reference: str) -> dict[str, str]:
    """Hints L1-L5 from a reference solution (module docstring); {} when it lacks a field L1-L4 need."""
    if not solution or not solution.get("steps") or any(not solution.get(k) for k in HINT_FIELDS):
        return {}
    steps = [str(s).strip() for s in solution["steps"]]
    hints = {f"L{k}": str(solution[field]).strip() for k, field in enumerate(HINT_FIELDS, start=1)}
    hints["L4"] = f"Start like this: {steps[0]}"
    hints["L5"] = " ".join(steps) + f" The answer is {reference}."
    return hints


def longcot_rl_items(questions: TableRef, domains: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The verifiable RL items of a pinned `longcot_questions` table (questions with a reference answer),
    with hints L1-L5 from their reference solutions."""
    rows = (
        tables.dataset(questions.uri, version=questions.version)
        .to_table(columns=["question_id", "domain", "question", "reference", "solution", "media"])
        .to_pylist()
    )
    items = []
    for row in sorted(rows, key=lambda r: r["question_id"]):
        if not row["reference"] or (domains and row["domain"] not in domains):
            continue
        item = {
            "id": row["question_id"], "domain": row["domain"],
            "messages": [{"role": "user", "content": user_content(row, THINK)}],
            "reference": row["reference"], "task": DOMAIN_CHECKERS.get(row["domain"], "math"),
            "mode": "think", "constraints": [],
        }  # fmt: skip
        hints = solution_hints(json.loads(row["solution"]) if row["solution"] else None, row["reference"])
        if hints:
            item["hints"] = hints
        items.append(item)
    return items


# (instruction, mode suffix, constraints): each checkable by rules alone
_TEMPLATES: list[tuple[str, str, list[list]]] = [
    (
        'Describe {topic} as a JSON object with the keys "summary" and "facts".',
        NO_THINK,
        [["json", ["summary", "facts"]]],
    ),
    ("Explain {topic} in at most 40 words.", NO_THINK, [["max_words", 40]]),
    ("Give exactly three bullet points about {topic}.", NO_THINK, [["num_bullets", 3]]),
    (
        "Write a short note on {topic} that mentions the word 'because' and ends with 'That is all.'",
        THINK,
        [["include_keywords", ["because"]], ["ends_with", "That is all."]],
    ),
    (
        "Write a Python function that returns the number of letters in the word '{topic}'.",
        THINK,
        [["python_code", None]],
    ),
    (
        "Write a markdown answer about {topic} with the headings 'Overview' and 'Details'.",
        NO_THINK,
        [["markdown_headings", ["Overview", "Details"]]],
    ),
    ("Say something about {topic} without using the word 'very'.", "", [["exclude_keywords", ["very"]]]),
]
_TOPICS = ["rivers", "trains", "bees", "glaciers", "lighthouses", "bridges", "tea", "comets"]


def alignment_prompts(num_items: int = 16) -> list[dict[str, Any]]:
    """`num_items` instruction prompts with hard constraints, cycling templates then topics (deterministic).
    A template without a mode suffix leaves the choice to the model (auto_think)."""
    if num_items < 1 or num_items > len(_TEMPLATES) * len(_TOPICS):
        raise ValueError(f"num_items must be in [1, {len(_TEMPLATES) * len(_TOPICS)}], got {num_items}")
    items = []
    for n in range(num_items):
        template, suffix, constraints = _TEMPLATES[n % len(_TEMPLATES)]
        topic = _TOPICS[(n // len(_TEMPLATES) + n) % len(_TOPICS)]
        text = template.format(topic=topic) + suffix
        mode = {THINK: "think", NO_THINK: "no_think"}.get(suffix, "auto_think")
        items.append(
            {
                "id": f"align-{n:03d}",
                "domain": "alignment",
                "messages": [{"role": "user", "content": text}],
                "reference": None,
                "task": "math",
                "mode": mode,
                "constraints": [list(c) for c in constraints],
            }
        )
    return items


def reward_item(item: Mapping[str, Any]) -> RewardItem:
    """The rewards' view of an item."""
    prompt = item["messages"][-1]["content"]
    constraints = tuple(
        Constraint(kind, tuple(value) if isinstance(value, list) else value)
        for kind, value in item.get("constraints", [])
    )
    return RewardItem(
        prompt=prompt,
        reference=item.get("reference"),
        task=item.get("task", "math"),
        mode=item.get("mode"),
        constraints=constraints,
    )


def item_json(item: Mapping[str, Any]) -> str:
    return json.dumps(item, sort_keys=True, ensure_ascii=False)
