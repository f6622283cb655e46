"""What RL trains on: items with a prompt and what a reward can check.

- General RL (GSPO) items come from `longcot_questions`: each question with its reference answer and the
  checker its domain needs (counting → count, grounding → box IoU, everything else → answer equivalence),
  and hints L1-L5 derived from its reference solution (`solution_hints`) when it has one.
- Alignment RL items are instruction prompts with hard constraints (output mode, JSON keys, word limits,
  keywords, bullets, code that parses): `alignment_prompts()` writes a small deterministic set from templates
  for demos and tests (a real run reads its own prompt set in the same dict form).

An item is a plain dict — `id`, `messages` (a chat, media parts by path), `reference` (or None), `task` (a
`rewards.TASKS` checker), `mode` (the thinking mode it is asked in: the prompt ends with ``/think`` or
``/no_think``), `constraints` (`[kind, value]` pairs), `hints` (`{"L1": text, …, "L5": text}`, absent when the
question has no full reference solution) and, when the question has a reference solution, its
`solution_steps` and `wrong_answers` (what reference responses and held-out answer pairs are written from) —
so it goes through Prefect and JSON unchanged; `reward_item` turns it into the rewards' `RewardItem`.
`question_file_items` makes the same items from question files without collecting them into a table: a
held-out set no stage may train on.

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
from collections.abc import Mapping, Sequence
from typing import Any

from keyeflow.datasets import tables
from keyeflow.datasets.tables import TableRef
from keyeflow.longcot.collect import CollectConfig, read_question_files
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


MODE_SUFFIXES = {"think": THINK, "no_think": NO_THINK}


def rl_item(row: Mapping[str, Any], mode: str = "think") -> dict[str, Any]:
    """The RL item of a question (a ``longcot_questions`` row, or a `collect.Question` as a dict) asked in
    `mode` ("think" or "no_think"): with hints L1-L5 from its reference solution when it has one, and the
    solution's steps and wrong answers (what held-out pairs and reference responses are written from)."""
    if mode not in MODE_SUFFIXES:
        raise ValueError(f"mode must be one of {sorted(MODE_SUFFIXES)}, got {mode!r}")
    solution = json.loads(row["solution"]) if isinstance(row.get("solution"), str) else row.get("solution")
    item = {
        "id": row["question_id"], "domain": row["domain"],
        "messages": [{"role": "user", "content": user_content(row, MODE_SUFFIXES[mode])}],
        "reference": row["reference"], "task": DOMAIN_CHECKERS.get(row["domain"], "math"),
        "mode": mode, "constraints": [],
    }  # fmt: skip
    hints = solution_hints(solution, row["reference"])
    if hints:
        item["hints"] = hints
    if solution:
        item["solution_steps"] = [str(s) for s in solution.get("steps", [])]
        item["wrong_answers"] = [str(w) for w in solution.get("wrong_answers", [])]
    return item


def longcot_rl_items(
    questions: TableRef, domains: tuple[str, ...] | None = None, mode: str = "think"
) -> list[dict[str, Any]]:
    """The verifiable RL items of a pinned `longcot_questions` table (questions with a reference answer),
    asked in `mode`, with hints L1-L5 from their reference solutions."""
    rows = (
        tables.dataset(questions.uri, version=questions.version)
        .to_table(columns=["question_id", "domain", "question", "reference", "solution", "media"])
        .to_pylist()
    )
    return [
        rl_item(row, mode)
        for row in sorted(rows, key=lambda r: r["question_id"])
        if row["reference"] and not (domains and row["domain"] not in domains)
    ]


def question_file_items(
    paths: Sequence[str], source_root: str, mode: str = "think"
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """RL items of question files in the LongCoT conversation format (JSONL files or folders, media inside
    `source_root`), e.g. a held-out set no stage trains on, and the lines that could not be read (uri, why).
    A question repeated across the files is one item."""
    bad: list[tuple[str, str]] = []
    _, read = read_question_files(paths, source_root, CollectConfig(), bad)
    items: dict[str, dict[str, Any]] = {}
    for questions in read:
        for q in questions:
            row = {"question_id": q.question_id, "domain": q.domain, "question": q.text,
                   "reference": q.reference, "solution": q.solution, "media": q.media}  # fmt: skip
            items.setdefault(q.question_id, rl_item(row, mode))
    return list(items.values()), bad


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
