"""What several LongCoT steps share: the path statuses, the default scoring settings, and reading rows of the
LongCoT tables by key (every step works on one batch of question ids at a time)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import pyarrow.compute as pc

from keyeflow.datasets import tables
from keyeflow.quality.longcot_scoring import LongCoTConfig

STATUSES = ("selected", "review", "kept", "dropped")
DEFAULT_SCORING = LongCoTConfig()  # frozen: one shared default for the step functions' signatures


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def read_rows(
    name: str, version: int | None, column: str, keys: Sequence[str], root: str | None
) -> list[dict]:
    """Rows of a table (at a version) whose ``column`` is one of ``keys``."""
    if not keys or not tables.exists(name, root):
        return []
    ds = tables.open_table(name, version=version, root=root)
    return ds.to_table(filter=pc.field(column).isin(list(keys))).to_pylist()


def read_ref_rows(ref: tables.TableRef, column: str, keys: Sequence[str]) -> list[dict]:
    if not keys:
        return []
    ds = tables.dataset(ref.uri, version=ref.version)
    return ds.to_table(filter=pc.field(column).isin(list(keys))).to_pylist()


def json_text(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def batch_paths(paths: tables.TableRef, question_ids: Sequence[str]) -> list[dict]:
    """The ``longcot_paths`` rows of the batch's questions, in path id order."""
    return sorted(read_ref_rows(paths, "question_id", question_ids), key=lambda r: r["path_id"])


def questions_by_id(questions: tables.TableRef, ids: Iterable[str]) -> dict[str, dict]:
    return {r["question_id"]: r for r in read_ref_rows(questions, "question_id", sorted(set(ids)))}
