"""The LongCoT gates: :func:`paths_gate_frame` / :func:`samples_gate_frame` compute the columns the checks of
``quality/gates.py`` read, and :func:`check_longcot_paths` / :func:`check_longcot_samples` run those checks on
a batch. :class:`GateConfig` says what the output must satisfy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from keyeflow.datasets import tables
from keyeflow.longcot.common import batch_paths, questions_by_id
from keyeflow.longcot.generate import check_answer
from keyeflow.quality import graders
from keyeflow.quality.gates import LONGCOT_PATH_CHECKS, TABLE, GateResult, longcot_sample_checks, run_gate
from keyeflow.quality.longcot_scoring import GRADES


@dataclass(frozen=True)
class GateConfig:
    """The gates: what the output must satisfy. ``grade_share_bounds``: per grade, the [min, max] share of
    the kept samples it may have (UNSTATED in Keye; the defaults ask that most kept samples were sound
    without a person's edit)."""

    min_samples: int = 1  # 0 lets an empty output through (a random tiny model solves nothing)
    grade_share_bounds: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"A": (0.2, 1.0), "B": (0.0, 0.8)}
    )

    def __post_init__(self) -> None:
        if self.min_samples < 0:
            raise ValueError(f"GateConfig.min_samples must be >= 0, got {self.min_samples}")
        bounds = {}
        for key, value in dict(self.grade_share_bounds).items():
            if key not in ("A", "B"):
                raise ValueError(f"GateConfig.grade_share_bounds: kept samples are A or B, got {key!r}")
            lo, hi = (float(v) for v in value)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(
                    f"GateConfig.grade_share_bounds[{key!r}] must be 0 <= min <= max <= 1, got {value}"
                )
            bounds[key] = (lo, hi)
        object.__setattr__(self, "grade_share_bounds", bounds)


def paths_gate_frame(paths: tables.TableRef, question_ids: Sequence[str]) -> pd.DataFrame:
    """One row per path of the batch with the columns the path checks read."""
    rows = batch_paths(paths, question_ids)
    out = []
    for r in rows:
        conf = r["confidence"]
        out.append({
            "path_id": r["path_id"],
            "confidence_in_range": conf is not None and 0.0 <= conf <= 1.0
                                   and all(0.0 <= c <= 1.0 for c in (r["step_confidences"] or [])),
            "status": r["status"],
            "grade_known": r["grade"] in GRADES
                           or (r["grade"] is None and r["stage"] in ("generate", "select")),
            "drop_has_reason": r["status"] != "dropped" or bool((r["reason"] or "").strip()),
            "c_dropped": r["grade"] != "C" or r["status"] == "dropped",
        })  # fmt: skip
    return pd.DataFrame(
        out,
        columns=["path_id", "confidence_in_range", "status", "grade_known", "drop_has_reason", "c_dropped"],
    )


def samples_gate_frame(
    paths: tables.TableRef, questions: tables.TableRef, question_ids: Sequence[str], config: GateConfig
) -> pd.DataFrame:
    """One row per kept path of the batch with the columns the sample checks read."""
    kept = [r for r in batch_paths(paths, question_ids) if r["status"] == "kept"]
    qs = questions_by_id(questions, (r["question_id"] for r in kept))
    counts: dict[str, int] = {}
    for r in kept:
        counts[r["grade"]] = counts.get(r["grade"], 0) + 1
    out = []
    for r in kept:
        q = qs[r["question_id"]]
        response = r["response"] or ""
        share = counts[r["grade"]] / len(kept)
        lo, hi = config.grade_share_bounds.get(r["grade"], (0.0, 1.0))
        out.append({
            "sample_id": r["path_id"], "grade": r["grade"],
            "answer_matches": check_answer(q["domain"], response, q["reference"]).ok,
            "format_ok": graders.format_problem(response, "think") is None,
            "score": r["score"], "repeats": r["repeats"],
            "confidence": r["confidence"],
            "grade_share_ok": lo - 1e-9 <= share <= hi + 1e-9,
            "reviewed": (not r["needs_review"]) or r["review_action"] in ("approve", "edit"),
        })  # fmt: skip
    columns = [
        "sample_id",
        "grade",
        "answer_matches",
        "format_ok",
        "score",
        "repeats",
        "confidence",
        "grade_share_ok",
        "reviewed",
    ]
    frame = pd.DataFrame(out, columns=columns)
    if not out:  # keep the dtypes GX expects even with no rows
        frame = frame.astype({"score": "float64", "repeats": "float64", "confidence": "float64"})
    return frame


def check_longcot_paths(paths: tables.TableRef, question_ids: list[str]) -> GateResult:
    return run_gate("longcot_paths", paths_gate_frame(paths, question_ids), LONGCOT_PATH_CHECKS, "path_id")


def check_longcot_samples(
    paths: tables.TableRef, questions: tables.TableRef, question_ids: list[str], config: GateConfig
) -> GateResult:
    """The kept samples. With ``min_samples=0`` an empty output passes, the one case GX's empty-table rule
    would otherwise fail."""
    frame = samples_gate_frame(paths, questions, question_ids, config)
    checks = longcot_sample_checks(config.min_samples)
    if frame.empty and config.min_samples == 0:
        return GateResult(
            "longcot",
            True,
            0,
            [],
            [
                {
                    "check": "empty output allowed (min_samples=0)",
                    "expectation": "ExpectTableRowCountToBeBetween",
                    "column": "*",
                    "level": TABLE,
                    "success": True,
                    "unexpected_count": 0,
                    "examples": [],
                }
            ],
        )
    return run_gate("longcot", frame, checks, "sample_id")
