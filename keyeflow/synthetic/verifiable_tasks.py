"""Verifiable task families on media we draw: the ground truth is the drawing's own parameters, never a model.

Each family turns a seed and an index into drawing parameters, draws the picture or clip with the drawing
code (``images.shape_count_picture``, ``images.bar_chart_picture``, ``videos.colour_shots_clip``), and writes
the question, the reference answer and a reference solution (the reasoning steps that derive the answer) from
the same parameters:

=============  ======  ========  ==============================================================  ==========
family         media   domain    question                                                        answer
=============  ======  ========  ==============================================================  ==========
count_shapes   image   counting  "How many red shapes are in the picture?" on a 60x60 PNG of      an integer
                                 3-7 squares and circles in a 3x3 grid, four colours             1-7
shape_colour   image   stem      "What colour is the square in the picture?" on a 60x60 PNG of   a colour
                                 one square or circle 36-54 px wide anywhere, four colours       word
bar_sum        image   business  "How many grid squares tall are the red bar and the blue bar   an integer
                                 together?" on a 60x60 PNG bar chart of three bars 1-6 squares   2-12
                                 tall over grid lines 8 px apart
shot_order     video   stem      "Which colour is shown first in the clip, red or blue?" on a    a colour
                                 48x48 MP4 of three 0.5 s flat colour shots, five colours       word
=============  ======  ========  ==============================================================  ==========

Determinism: an item's parameters come from ``random.Random("<family>:<seed>:<index>")`` (a string seed,
hashed with SHA-512 by Python, the same on every run and machine); its id is ``<family>-<seed>-<index:04d>``.

Split (stable, by id only): an item is held out when the first 8 hex digits of ``sha256(id)`` as an integer
are divisible by 5 (``HELDOUT_MODULUS``), about 20% of items; the rest are training items. Changing the number
of items or the other families never moves an item between splits.

The reference solution (``solution`` on each row) is what the synthetic teacher
(``keyeflow.synthetic.synthetic_teacher``) writes its reasoning paths from and what an RL item's hints
L1-L5 are derived from: ``steps`` (the reasoning, the last step stating the answer), ``concept`` (what to
notice), ``method`` (how to attack it), ``tool`` (the operation to use), ``answer_forms`` (ways to write the
right answer) and ``wrong_answers`` (plausible wrong answers a flawed path may reach).

``write_task_questions(dest, media_dir)`` writes the media and two JSONL files in the LongCoT conversation
format (``keyeflow.longcot.collect`` reads them; the assistant turn is the reference solution as
``<think>…</think><answer>…</answer>``): ``dest/train/task_questions.jsonl`` and
``dest/heldout/task_questions.jsonl``, one folder per split so a flow can read the training questions alone.
About 0.1 s per clip and a few ms per picture: a few hundred items take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from keyeflow.synthetic.images import (
    BAR_UNIT,
    TASK_COLOURS,
    PlacedShape,
    bar_chart_picture,
    save_png,
    shape_count_picture,
    single_shape_picture,
)
from keyeflow.synthetic.videos import TASK_SHOT_COLOURS, colour_shots_clip

__all__ = [
    "FAMILIES",
    "HELDOUT_MODULUS",
    "TaskItem",
    "make_item",
    "split_of",
    "task_items",
    "write_task_questions",
]

HELDOUT_MODULUS = 5  # 1 in 5 ids held out
FAMILIES = ("count_shapes", "shape_colour", "bar_sum", "shot_order")
SOURCE = "verifiable-tasks"


def split_of(item_id: str) -> str:
    """ "heldout" or "train", from the id alone (module docstring)."""
    return (
        "heldout"
        if int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0
        else "train"
    )


@dataclass(frozen=True)
class TaskItem:
    """One question of a family, with everything its ground truth came from."""

    id: str
    family: str
    domain: str
    media_kind: str  # "image" or "video"
    media_name: str  # file name under the family's media folder
    question: str
    answer: str
    solution: dict
    params: dict = field(default_factory=dict)  # the drawing parameters (JSON-able)

    @property
    def split(self) -> str:
        return split_of(self.id)


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _count_shapes(item_id: str, rng: random.Random) -> TaskItem:
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(3, 7))
    colours = list(TASK_COLOURS)
    shapes = [PlacedShape(rng.choice(("square", "circle")), rng.choice(colours), r, c) for r, c in cells]
    target = rng.choice(sorted({s.colour for s in shapes}))
    squares = sum(s.colour == target and s.kind == "square" for s in shapes)
    circles = sum(s.colour == target and s.kind == "circle" for s in shapes)
    answer = squares + circles
    others = sorted({s.colour for s in shapes} - {target})
    steps = [
        f"Step 1: The picture shows {len(shapes)} shapes in a 3 by 3 grid.",
        f"Step 2: Of the {target} shapes, {squares} are squares and {circles} are circles.",
        f"Step 3: {squares} + {circles} = {answer}, so there are {answer} {target} shapes.",
    ]
    wrong = sorted({max(answer - 1, 0), answer + 1, len(shapes)} - {answer})
    return TaskItem(
        id=item_id,
        family="count_shapes",
        domain="counting",
        media_kind="image",
        media_name=f"{item_id}.png",
        question=f"How many {target} shapes are in the picture?",
        answer=str(answer),
        solution={
            "steps": steps,
            "concept": f"Only the colour counts: a {target} square and a {target} circle are both {target} "
            f"shapes" + (f", and the {', '.join(others)} ones do not count." if others else "."),
            "method": f"Look at every cell of the grid and tally the {target} squares and the {target} "
            "circles separately.",
            "tool": "Add the two tallies: squares + circles.",
            "answer_forms": [str(answer), _NUMBER_WORDS[answer]],
            "wrong_answers": [str(w) for w in wrong],
        },
        params={"shapes": [list(s) for s in shapes], "target": target},
    )


def _shape_colour(item_id: str, rng: random.Random) -> TaskItem:
    # Meant as the easiest family to see: the answer is the colour of one shape's pixels. The shape covers
    # most of the picture because a 60x60 picture is 4 vision tokens: a 10-24 px shape moved them so little
    # (cosine 0.98-0.999 between pictures of different colours, tiny model) that 150 SFT steps left the tiny
    # model at chance, while 36-54 px shapes were named right on 60 of 60 held-out pictures after 40 steps.
    kind, colour = rng.choice(("square", "circle")), rng.choice(list(TASK_COLOURS))
    # Size and place vary freely, so two items almost never draw the same picture (a held-out item must not
    # be a training item's twin).
    size = rng.randint(36, 54)
    left, top = rng.randint(2, 58 - size), rng.randint(2, 58 - size)
    steps = [
        f"Step 1: The picture shows one {kind} on a white background.",
        f"Step 2: The {kind} is painted {colour}, so the answer is {colour}.",
    ]
    return TaskItem(
        id=item_id,
        family="shape_colour",
        domain="stem",
        media_kind="image",
        media_name=f"{item_id}.png",
        question=f"What colour is the {kind} in the picture?",
        answer=colour,
        solution={
            "steps": steps,
            "concept": f"The white background is not a colour of the {kind}; only its own pixels count.",
            "method": f"Find the one {kind} in the grid and look at the colour it is filled with.",
            "tool": f"Name the fill colour with one of the colour words: {', '.join(TASK_COLOURS)}.",
            "answer_forms": [colour],
            "wrong_answers": [c for c in TASK_COLOURS if c != colour],
        },
        params={"shape": [kind, colour, left, top, size]},
    )


def _shot_order(item_id: str, rng: random.Random) -> TaskItem:
    colours = rng.sample(list(TASK_SHOT_COLOURS), 3)
    i, j = sorted(rng.sample(range(3), 2))
    first, later = colours[i], colours[j]
    asked = [first, later] if rng.random() < 0.5 else [later, first]
    steps = [
        f"Step 1: The clip shows three shots: {colours[0]}, then {colours[1]}, then {colours[2]}.",
        f"Step 2: {first.capitalize()} is shot {i + 1} and {later} is shot {j + 1}.",
        f"Step 3: Shot {i + 1} comes before shot {j + 1}, so {first} is shown first.",
    ]
    return TaskItem(
        id=item_id,
        family="shot_order",
        domain="stem",
        media_kind="video",
        media_name=f"{item_id}.mp4",
        question=f"Which colour is shown first in the clip, {asked[0]} or {asked[1]}?",
        answer=first,
        solution={
            "steps": steps,
            "concept": "The clip is a sequence of flat colour shots; the question is about their order "
            "in time.",
            "method": "Name the shots from the start of the clip to its end, then find where each of the "
            "two colours is.",
            "tool": "Compare the shot numbers of the two colours: the smaller number comes first.",
            "answer_forms": [first],
            "wrong_answers": [later],
        },
        params={"colours": colours},
    )


def _bar_sum(item_id: str, rng: random.Random) -> TaskItem:
    colours = rng.sample(list(TASK_COLOURS), 3)
    heights = [rng.randint(1, 6) for _ in colours]
    i, j = sorted(rng.sample(range(3), 2))
    a, b = colours[i], colours[j]
    answer = heights[i] + heights[j]
    steps = [
        f"Step 1: The chart has three bars on a grid: {colours[0]}, {colours[1]} and {colours[2]}.",
        f"Step 2: The {a} bar is {heights[i]} squares tall and the {b} bar is {heights[j]} squares tall.",
        f"Step 3: {heights[i]} + {heights[j]} = {answer}, so together they are {answer} squares tall.",
    ]
    wrong = sorted({answer - 1, answer + 1, sum(heights)} - {answer})
    return TaskItem(
        id=item_id,
        family="bar_sum",
        domain="business",
        media_kind="image",
        media_name=f"{item_id}.png",
        question=f"How many grid squares tall are the {a} bar and the {b} bar together?",
        answer=str(answer),
        solution={
            "steps": steps,
            "concept": "A bar's height is read off the grid lines behind it, in whole squares.",
            "method": f"Count the grid squares the {a} bar covers, then those the {b} bar covers.",
            "tool": "Add the two heights.",
            "answer_forms": [str(answer)],
            "wrong_answers": [str(w) for w in wrong],
        },
        params={"bars": [[c, h] for c, h in zip(colours, heights)], "unit": BAR_UNIT},
    )


_MAKERS = {
    "count_shapes": _count_shapes,
    "shape_colour": _shape_colour,
    "bar_sum": _bar_sum,
    "shot_order": _shot_order,
}


def make_item(family: str, seed: int, index: int) -> TaskItem:
    """Item ``index`` of ``family`` for ``seed`` (deterministic; module docstring)."""
    if family not in _MAKERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    item_id = f"{family}-{seed}-{index:04d}"
    return _MAKERS[family](item_id, random.Random(f"{family}:{seed}:{index}"))


def task_items(
    num_per_family: int = 60, seed: int = 0, families: tuple[str, ...] = FAMILIES
) -> list[TaskItem]:
    """``num_per_family`` items of every family, family by family, index order."""
    return [make_item(f, seed, k) for f in families for k in range(num_per_family)]


def _draw(item: TaskItem, path: Path) -> None:
    if item.family == "shape_colour":
        save_png(single_shape_picture(*item.params["shape"]), path)
    elif item.family == "count_shapes":
        save_png(shape_count_picture([PlacedShape(*s) for s in item.params["shapes"]]), path)
    elif item.family == "bar_sum":
        save_png(bar_chart_picture([(c, h) for c, h in item.params["bars"]], item.params["unit"]), path)
    else:
        # Half-second shots: at the 2 frames per second the clip is read at, one frame per shot, so the clip
        # costs a model half the vision tokens of one-second shots and still shows every shot.
        colour_shots_clip(item.params["colours"], path, shot_s=0.5)


def reference_turn(steps: list[str], answer: str) -> str:
    return "<think>" + "\n\n".join(steps) + "</think><answer>" + answer + "</answer>"


def question_row(item: TaskItem, media_path: Path, questions_file: Path) -> dict:
    """The item as a LongCoT conversation row (media path relative to the questions file)."""
    relative = os.path.relpath(media_path, questions_file.parent)
    content = [{"type": item.media_kind, item.media_kind: relative}, {"type": "text", "text": item.question}]
    return {
        "domain": item.domain,
        "source": f"{SOURCE}-{item.family}",
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": reference_turn(item.solution["steps"], item.answer)},
        ],
        "reference": item.answer,
        "solution": item.solution,
        "task": {"id": item.id, "family": item.family, "split": item.split},
    }


def write_task_questions(
    dest: Path, media_dir: Path, num_per_family: int = 60, seed: int = 0
) -> dict[str, Path]:
    """Draw every item's media into ``media_dir`` (kept when already there) and write the questions per split;
    returns ``{"train": file, "heldout": file}``."""
    dest, media_dir = Path(dest), Path(media_dir)
    media_dir.mkdir(parents=True, exist_ok=True)
    files = {split: dest / split / "task_questions.jsonl" for split in ("train", "heldout")}
    rows: dict[str, list[dict]] = {split: [] for split in files}
    for item in task_items(num_per_family, seed):
        path = media_dir / item.media_name
        if not path.exists():
            _draw(item, path)
        rows[item.split].append(question_row(item, path, files[item.split]))
    for split, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]), encoding="utf-8"
        )
        os.replace(partial, path)
    return files
