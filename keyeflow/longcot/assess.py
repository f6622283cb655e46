"""LongCoT step 3 (SPEC §4.3.1): two-level quality assessment.

The answer level was checked when the paths were generated (``generate.check_answer``; wrong answers are C
there). :func:`assess_paths` adds the process level (logical consistency, factual accuracy and relevance of
every step) by a :class:`~keyeflow.quality.judges.Judge` and the grade (``longcot_scoring.grade``): A, or B /
borderline A flagged for review. :class:`JudgeConfig` and :func:`make_judge` name the judge, which scores the
samples in step 5 too.

A judge that gives no verdict for a path (its request failed, its reply does not parse) never grades it: the
path keeps its status (``selected``), so the next run assesses it again, and it is quarantined (stage
``longcot_assess``, the reason naming the path and the cause) until it succeeds. After the batch is committed
the step raises when more than ``JudgeConfig.max_error_share`` of its paths failed
(:mod:`keyeflow.quality.errors`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from keyeflow.datasets import tables
from keyeflow.longcot.common import DEFAULT_SCORING, batch_paths, chunks, json_text, questions_by_id
from keyeflow.longcot.generate import GenerationConfig, clear_quarantine, make_generator
from keyeflow.quality import graders
from keyeflow.quality.errors import DEFAULT_MAX_ERROR_SHARE, check_error_share, check_max_error_share
from keyeflow.quality.judges import Judge, JudgeFailure, JudgeInput, ModelJudge, RuleJudge
from keyeflow.quality.longcot_scoring import LongCoTConfig, grade, split_steps

JUDGES = ("rule", "model")
STAGE_ASSESS = "longcot_assess"


@dataclass(frozen=True)
class JudgeConfig:
    """Steps 3 and 5: which judge grades processes and scores samples."""

    kind: str = "rule"  # "rule" or "model"
    generation: GenerationConfig | None = None  # the judge model; None: the path generator's settings
    max_new_tokens: int = 256
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE  # more failed judgements than this stops steps 3 and 5

    def __post_init__(self) -> None:
        if self.kind not in JUDGES:
            raise ValueError(f"JudgeConfig.kind must be one of {JUDGES}, got {self.kind!r}")
        check_max_error_share("JudgeConfig", self.max_error_share)
        if isinstance(self.generation, dict):
            object.__setattr__(self, "generation", GenerationConfig(**self.generation))


def make_judge(config: JudgeConfig, generation: GenerationConfig, root: str | None = None) -> Judge:
    if config.kind == "rule":
        return RuleJudge()
    judge_generation = config.generation or generation
    return ModelJudge(
        make_generator(judge_generation, root),
        max_new_tokens=config.max_new_tokens,
        seed=judge_generation.seed,
    )


# ===================================================================================== reasoning text


_TAGS = re.compile(r"</?think>")
_ANSWER_BLOCK = re.compile(r"<answer>.*?(?:</answer>|$)", re.DOTALL)


def reasoning_text(response: str) -> str:
    """The reasoning of a response: the ``<think>`` block, else the text without its answer block."""
    if "</think>" in response:
        return response.split("</think>", 1)[0].replace("<think>", "").strip()
    return _TAGS.sub("", _ANSWER_BLOCK.sub("", response)).strip()


def reasoning_steps(response: str) -> list[str]:
    text = reasoning_text(response)
    return [text[a:b] for a, b in split_steps(text)]


def as_think_answer(response: str) -> str:
    """The response in ``<think>…</think><answer>…</answer>`` form (unchanged when it already is)."""
    if graders.format_problem(response, "think") is None:
        return response.strip()
    return (
        f"<think>\n{reasoning_text(response)}\n</think>\n<answer>{graders.extract_answer(response)}</answer>"
    )


def judge_input(question: dict, response: str) -> JudgeInput:
    media = json.loads(question["media"])
    return JudgeInput(
        question["question"],
        question["reference"],
        tuple(reasoning_steps(response)),
        graders.extract_answer(response),
        tuple(m["type"] for m in media),
    )


# ======================================================================================== assess


@dataclass
class AssessReport:
    num_assessed: int = 0
    grades: dict[str, int] = field(default_factory=dict)
    num_needs_review: int = 0
    judges: dict[str, int] = field(default_factory=dict)
    num_failed: int = 0  # paths the judge gave no verdict for (quarantined, assessed again next run)
    failed: dict[str, str] = field(default_factory=dict)  # path id → why


def record_judge_failures(
    failures: Sequence[tuple[dict, JudgeFailure]], stage: str, what: str, root: str | None
) -> dict[str, str]:
    """Quarantine each (path row, failure) with its reason; path id → reason."""
    reasons = {row["path_id"]: f"path {row['path_id']}: {what} failed: {f.reason}" for row, f in failures}
    if reasons:
        # update_rows, not upsert: a path that fails again keeps one row, with the latest reason.
        tables.update_rows(
            "quarantine", [tables.quarantine_row(p, r, stage, p) for p, r in reasons.items()], root
        )
    return reasons


def assess_paths(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: Sequence[str],
    judge: Judge,
    scoring: LongCoTConfig = DEFAULT_SCORING,
    batch_size: int = 16,
    root: str | None = None,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
) -> AssessReport:
    """Process-level assessment and grade of every selected path of the batch (module docstring)."""
    todo = [r for r in batch_paths(paths, question_ids) if r["status"] == "selected"]
    qs = questions_by_id(questions, (r["question_id"] for r in todo))
    report = AssessReport()
    for batch in chunks(todo, batch_size):
        verdicts = judge.assess([judge_input(qs[r["question_id"]], r["text"]) for r in batch])
        updated, failures = [], []
        for row, verdict in zip(batch, verdicts):
            if isinstance(verdict, JudgeFailure):
                failures.append((row, verdict))
                continue
            scores = verdict.process_scores()
            result = grade(True, scores, verdict.redundancy, scoring)
            row = dict(row)
            row.update(scores)
            row.update({
                "judge": verdict.judge, "judge_notes": "; ".join(verdict.all_notes()),
                "redundancy": verdict.redundancy,
                "step_scores": json_text([s.to_dict() for s in verdict.steps]),
                "grade": result.grade, "needs_review": result.needs_review,
                "grade_reasons": "; ".join(result.reasons), "stage": "assess", "updated_at": tables.now(),
            })  # fmt: skip
            if result.needs_review:
                row.update(
                    status="review", reason=f"{result.grade} needs review: {'; '.join(result.reasons)}"
                )
            else:
                row.update(
                    status="kept",
                    reason="A: answer right, process sound",
                    response=as_think_answer(row["text"]),
                )
            updated.append(row)
            report.grades[result.grade] = report.grades.get(result.grade, 0) + 1
            report.num_needs_review += result.needs_review
            report.judges[verdict.judge] = report.judges.get(verdict.judge, 0) + 1
        failed = record_judge_failures(failures, STAGE_ASSESS, "process assessment", root)
        report.failed.update(failed)
        report.num_failed += len(failed)
        tables.update_rows("longcot_paths", updated, root)
        clear_quarantine(STAGE_ASSESS, [row["path_id"] for row in updated], root)
        report.num_assessed += len(updated)
    check_error_share("LongCoT process assessment", list(report.failed.items()), len(todo), max_error_share)
    return report
