"""LongCoT step 5 (SPEC §4.3.1): dynamic quality scoring.

:func:`score_samples` has the judge score every kept sample 1–5 (1: answerable without the image … 5:
strongly multimodal reasoning) and turns the score into a training repeat count
(``longcot_scoring.training_repeats``: high scores repeated, low scores used sparingly). A path the judge
gives no score for keeps no score (the next run scores it again) and is quarantined (stage ``longcot_score``)
until it succeeds; more failures than ``max_error_share`` stop the step (:mod:`keyeflow.quality.errors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from keyeflow.datasets import tables
from keyeflow.longcot.assess import judge_input, record_judge_failures
from keyeflow.longcot.common import DEFAULT_SCORING, batch_paths, chunks, questions_by_id
from keyeflow.longcot.generate import clear_quarantine
from keyeflow.quality.errors import DEFAULT_MAX_ERROR_SHARE, check_error_share
from keyeflow.quality.judges import Judge, JudgeFailure
from keyeflow.quality.longcot_scoring import LongCoTConfig, training_repeats


@dataclass
class ScoreReport:
    num_scored: int = 0
    scores: dict[int, int] = field(default_factory=dict)
    total_repeats: int = 0
    num_unused: int = 0  # kept, but the keep draw for a low score gave 0 repeats
    num_failed: int = 0  # paths the judge gave no score for (quarantined, scored again next run)
    failed: dict[str, str] = field(default_factory=dict)  # path id → why


STAGE_SCORE = "longcot_score"


def score_samples(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: Sequence[str],
    judge: Judge,
    scoring: LongCoTConfig = DEFAULT_SCORING,
    batch_size: int = 16,
    root: str | None = None,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
) -> ScoreReport:
    """The 1–5 quality score and training repeats of every kept, not yet scored path of the batch."""
    todo = [r for r in batch_paths(paths, question_ids) if r["status"] == "kept" and r["score"] is None]
    qs = questions_by_id(questions, (r["question_id"] for r in todo))
    report = ScoreReport()
    for batch in chunks(todo, batch_size):
        scores = judge.score([judge_input(qs[r["question_id"]], r["response"]) for r in batch])
        updated, failures = [], []
        for row, quality in zip(batch, scores):
            if isinstance(quality, JudgeFailure):
                failures.append((row, quality))
                continue
            repeats = training_repeats(row["path_id"], quality.score, scoring)
            reason = row["reason"]
            if repeats == 0:
                reason += f"; score {quality.score}: left out of this epoch by the keep draw"
            updated.append(
                dict(
                    row,
                    score=quality.score,
                    score_reason=f"{quality.judge}: {quality.reason}",
                    repeats=repeats,
                    stage="score",
                    reason=reason,
                    updated_at=tables.now(),
                )
            )
            report.scores[quality.score] = report.scores.get(quality.score, 0) + 1
            report.total_repeats += repeats
            report.num_unused += repeats == 0
        failed = record_judge_failures(failures, STAGE_SCORE, "quality scoring", root)
        report.failed.update(failed)
        report.num_failed += len(failed)
        tables.update_rows("longcot_paths", updated, root)
        clear_quarantine(STAGE_SCORE, [row["path_id"] for row in updated], root)
        report.num_scored += len(updated)
    check_error_share("LongCoT quality scoring", list(report.failed.items()), len(todo), max_error_share)
    return report
