"""Verifiable task families: the ground truth written with each question is what the drawing shows, counted
independently from the pixels of the written file (connected colour patches; bar heights; decoded frames),
items are deterministic from their seed, and the train/held-out split depends on the id alone."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from keyeflow.longcot.generate import check_answer
from keyeflow.synthetic.images import BAR_UNIT, TASK_COLOURS
from keyeflow.synthetic.verifiable_tasks import (
    HELDOUT_MODULUS,
    make_item,
    split_of,
    task_items,
    write_task_questions,
)
from keyeflow.synthetic.videos import TASK_SHOT_COLOURS

NUM = 12


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, Path], list[dict]]:
    root = tmp_path_factory.mktemp("tasks")
    files = write_task_questions(root / "questions", root / "media", num_per_family=NUM, seed=3)
    rows = [json.loads(line) for f in files.values() for line in f.read_text().splitlines()]
    return root, files, rows


def _media(row: dict, files: dict[str, Path]) -> Path:
    part = row["messages"][0]["content"][0]
    return (files[row["task"]["split"]].parent / part[part["type"]]).resolve()


def _hex_rgb(value: str) -> np.ndarray:
    return np.array([int(value[2:4], 16), int(value[4:6], 16), int(value[6:8], 16)], dtype=float)


def test_count_shapes_answer_is_the_number_of_patches_of_that_colour_in_the_png(written):
    _, files, rows = written
    counted = [r for r in rows if r["task"]["family"] == "count_shapes"]
    assert len(counted) == NUM
    for row in counted:
        pixels = np.asarray(Image.open(_media(row, files)).convert("RGB"))
        colour = row["messages"][0]["content"][1]["text"].split()[2]  # "How many <colour> shapes ..."
        mask = np.all(pixels == TASK_COLOURS[colour], axis=-1)
        _, patches = ndimage.label(mask)
        assert str(patches) == row["reference"], row["task"]["id"]
        _, all_shapes = ndimage.label(np.any(pixels != 255, axis=-1))
        steps = row["solution"]["steps"]
        assert steps[0].startswith(f"Step 1: The picture shows {all_shapes} shapes")
        assert steps[-1].endswith(f"there are {row['reference']} {colour} shapes.")
        assert row["messages"][1]["content"].endswith(f"<answer>{row['reference']}</answer>")
        # every written form of the answer is right, every wrong answer is wrong, for the domain's checker
        assert all(
            check_answer("counting", f"<answer>{a}</answer>", row["reference"]).ok
            for a in row["solution"]["answer_forms"]
        )
        assert not any(
            check_answer("counting", f"<answer>{a}</answer>", row["reference"]).ok
            for a in row["solution"]["wrong_answers"]
        )


def test_bar_sum_answer_is_the_sum_of_the_bar_heights_measured_in_the_png(written):
    _, files, rows = written
    charts = [r for r in rows if r["task"]["family"] == "bar_sum"]
    assert len(charts) == NUM
    for row in charts:
        pixels = np.asarray(Image.open(_media(row, files)).convert("RGB"))
        text = row["messages"][0]["content"][1][
            "text"
        ]  # "... tall are the <a> bar and the <b> bar together?"
        a, b = text.split(" tall are the ")[1].removesuffix(" bar together?").split(" bar and the ")
        heights = {}
        for colour in (a, b):
            mask = np.all(pixels == TASK_COLOURS[colour], axis=-1)
            columns = np.flatnonzero(mask.any(axis=0))
            assert len(columns) == 12  # one bar, 12 pixels wide
            rows_covered = int(mask[:, columns[len(columns) // 2]].sum())
            assert rows_covered % BAR_UNIT == 0
            heights[colour] = rows_covered // BAR_UNIT
        assert row["reference"] == str(heights[a] + heights[b]), row["task"]["id"]
        assert f"{heights[a]} + {heights[b]} = {row['reference']}" in row["solution"]["steps"][-1]
        assert not any(
            check_answer("business", f"<answer>{w}</answer>", row["reference"]).ok
            for w in row["solution"]["wrong_answers"]
        )


def test_shape_colour_answer_is_the_only_colour_in_the_png_and_no_two_pictures_are_alike(written):
    _, files, rows = written
    coloured = [r for r in rows if r["task"]["family"] == "shape_colour"]
    assert len(coloured) == NUM
    pictures = set()
    for row in coloured:
        path = _media(row, files)
        pictures.add(path.read_bytes())
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        shown = {name for name, rgb in TASK_COLOURS.items() if np.all(pixels == rgb, axis=-1).any()}
        assert shown == {row["reference"]}, row["task"]["id"]
        # Big enough to move the picture's 4 vision tokens (the family's comment says what smaller did).
        assert np.all(pixels == TASK_COLOURS[row["reference"]], axis=-1).mean() > 0.25, row["task"]["id"]
        kind = row["messages"][0]["content"][1]["text"].split()[4]  # "What colour is the <kind> in ..."
        assert kind in ("square", "circle") and kind in row["solution"]["steps"][0]
        assert not any(
            check_answer("stem", f"<answer>{w}</answer>", row["reference"]).ok
            for w in row["solution"]["wrong_answers"]
        )
    assert len(pictures) == NUM  # a held-out item is never a training item's twin


def test_shot_order_answer_is_the_colour_decoded_first_from_the_clip(written):
    _, files, rows = written
    names = {name: _hex_rgb(value) for name, value in TASK_SHOT_COLOURS.items()}
    ordered = [r for r in rows if r["task"]["family"] == "shot_order"]
    assert len(ordered) == NUM
    for row in ordered:
        shots: list[str] = []
        with av.open(str(_media(row, files))) as clip:
            for frame in clip.decode(video=0):
                mean = frame.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)
                name = min(names, key=lambda n: float(np.abs(names[n] - mean).sum()))
                if not shots or shots[-1] != name:
                    shots.append(name)
        assert len(shots) == 3
        text = row["messages"][0]["content"][1]["text"]
        a, b = text.removeprefix("Which colour is shown first in the clip, ").removesuffix("?").split(" or ")
        assert row["reference"] == min((a, b), key=shots.index), row["task"]["id"]
        assert row["solution"]["steps"][0].endswith(f"{shots[0]}, then {shots[1]}, then {shots[2]}.")
        assert not check_answer(
            "stem", f"<answer>{row['solution']['wrong_answers'][0]}</answer>", row["reference"]
        ).ok


def test_items_are_deterministic_and_rewriting_keeps_the_bytes(written, tmp_path):
    root, files, _ = written
    assert make_item("count_shapes", 3, 5) == make_item("count_shapes", 3, 5)
    assert make_item("count_shapes", 3, 5) != make_item("count_shapes", 4, 5)
    again = write_task_questions(tmp_path / "questions", tmp_path / "media", num_per_family=NUM, seed=3)
    for split in files:
        mine = [json.loads(line) for line in files[split].read_text().splitlines()]
        theirs = [json.loads(line) for line in again[split].read_text().splitlines()]
        assert [r["task"] for r in mine] == [r["task"] for r in theirs]
        assert [r["solution"] for r in mine] == [r["solution"] for r in theirs]
    for path in sorted((root / "media").iterdir()):
        assert (tmp_path / "media" / path.name).read_bytes() == path.read_bytes(), path.name


def test_split_is_by_id_only_and_stable(written):
    _, files, rows = written
    assert {r["task"]["split"] for r in rows} == {"train", "heldout"}
    for split, path in files.items():
        assert all(json.loads(line)["task"]["split"] == split for line in path.read_text().splitlines())
    # more items never move an item between splits; the rule's values are pinned
    few, many = task_items(10, seed=3), task_items(40, seed=3)
    by_id = {i.id: i.split for i in many}
    assert all(by_id[i.id] == i.split for i in few)
    assert [split_of(f"count_shapes-0-{k:04d}") for k in range(8)] == [
        *("train", "train", "heldout", "train", "train", "train", "train", "heldout")
    ]
    share = sum(split_of(f"x-{k}") == "heldout" for k in range(2000)) / 2000
    assert abs(share - 1 / HELDOUT_MODULUS) < 0.03
