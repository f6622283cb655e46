"""Prefect tasks for the LongCoT cold-start flow; each wraps one step function of ``keyeflow.longcot`` (called
as ``<step module>.<function>``: the task carries the same name).

Also here: :class:`ReviewDecision`, the form a reviewer fills in the Prefect UI (or sends with
``prefect.flow_runs.resume_flow_run(flow_run_id, run_input={...})``), and :func:`decisions_from_review`,
which turns what a review run returned into stored decisions under the configured unattended policy.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput

from keyeflow.datasets import tables
from keyeflow.longcot import assess, collect, generate, publish, review, score
from keyeflow.longcot.assess import JudgeConfig, make_judge
from keyeflow.longcot.collect import CollectConfig
from keyeflow.longcot.gates import GateConfig, check_longcot_paths, check_longcot_samples
from keyeflow.longcot.generate import STAGE_GENERATE, GenerationConfig, make_generator
from keyeflow.longcot.publish import batch_summary, grade_shares
from keyeflow.longcot.review import (
    Decision,
    ReviewConfig,
    ReviewPlan,
    policy_decision,
    review_item,
    review_markdown,
    review_plan,
)
from keyeflow.quality.longcot_scoring import LongCoTConfig
from keyeflow.tasks.common import log_quarantined, progress, publish_gate

_STEP = {"cache_policy": NO_CACHE}


class ReviewDecision(RunInput):
    """A reviewer's decision on one LongCoT path (the form shown when the review run is paused).

    ``approve`` keeps the response, ``edit`` keeps ``edited_text`` instead (a full
    ``<think>…</think><answer>…</answer>`` response, or only the reasoning to keep the original answer),
    ``reject`` drops it. ``item_id`` must be the path id the form was opened for.
    """

    item_id: str
    action: Literal["approve", "edit", "reject"] = "approve"
    edited_text: str = ""
    reviewer: str = ""
    note: str = ""


def artifact_key(path_id: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes only."""
    return "longcot-review-" + hashlib.sha256(path_id.encode()).hexdigest()[:12]


@task(**_STEP)
def collect_questions(
    paths: list[str], source_root: str, config: CollectConfig, generation: GenerationConfig
) -> dict:
    generator = make_generator(generation) if config.rewrite else None
    report = collect.collect_questions(paths, source_root, config, generator, generation)
    log_quarantined(report.quarantined)
    return report.__dict__


@task(**_STEP)
def referenced_media(questions: tables.TableRef, question_ids: list[str]) -> dict[str, list[str]]:
    return collect.referenced_media(questions, question_ids)


@task(**_STEP)
def generate_paths(
    questions: tables.TableRef, question_ids: list[str], generation: GenerationConfig, scoring: LongCoTConfig
) -> dict:
    generator = make_generator(generation)
    with progress(len(question_ids), "longcot-generate-progress", "LongCoT paths") as tracker:
        report = generate.generate_paths(
            questions, question_ids, generator, generation, scoring, on_item=tracker.advance
        )
    log_quarantined(report.quarantined)
    if report.num_failed and not (report.num_generated or report.num_already_done):
        # Reached only with max_error_share 1 (generate_paths raises first otherwise). Nothing to assess:
        # going on would only fail the paths gate with "table has rows", which hides the cause.
        uri, reason = next(iter(report.quarantined.items()))
        raise RuntimeError(
            f"LongCoT generation: none of the {report.num_questions} questions got paths "
            f"({report.num_failed} "
            f"failed; first, {uri}: {reason}). Each is in the quarantine table (stage {STAGE_GENERATE}) "
            "and is tried again on the next run."
        )
    return report.__dict__


@task(**_STEP)
def assess_paths(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: list[str],
    judge: JudgeConfig,
    generation: GenerationConfig,
    scoring: LongCoTConfig,
) -> dict:
    report = assess.assess_paths(
        paths,
        questions,
        question_ids,
        make_judge(judge, generation),
        scoring,
        max_error_share=judge.max_error_share,
    )
    return report.__dict__


@task(**_STEP)
def plan_review(paths: tables.TableRef, question_ids: list[str]) -> ReviewPlan:
    return review_plan(paths, question_ids)


@task(**_STEP)
def record_decision(paths: tables.TableRef, decision: Decision) -> None:
    review.record_decision(paths, decision)


@task(**_STEP)
def render_review_item(paths: tables.TableRef, questions: tables.TableRef, path_id: str) -> str:
    """The item as markdown, published as an artifact the reviewer opens beside the form."""
    markdown = review_markdown(review_item(paths, questions, path_id))
    create_markdown_artifact(markdown, key=artifact_key(path_id), description=f"LongCoT review of {path_id}")
    return markdown


def decisions_from_review(
    path_id: str, outcome: dict | None, review: ReviewConfig, state_note: str = ""
) -> Decision:
    """A stored decision from what one review run gave back.

    ``outcome``: ``{"decision": {...ReviewDecision fields}, "decided_at", "flow_run_id"}`` when a person
    answered, ``{"invalid": why}`` when the answer could not be used (the item is kept out: a person
    meant something the form could not say), None when no decision came back (the ``on_timeout`` policy).
    """
    if outcome is None:
        note = f"no decision within {review.timeout_s} s ({state_note}); on_timeout={review.on_timeout}"
        return policy_decision(path_id, review.on_timeout, review.mode, note)
    if "invalid" in outcome:
        return policy_decision(
            path_id, "keep_out", review.mode, f"unusable review input: {outcome['invalid']}"
        )
    d = outcome["decision"]
    if d["item_id"] != path_id:
        return policy_decision(
            path_id,
            "keep_out",
            review.mode,
            f"unusable review input: decision names {d['item_id']!r}, not this item",
        )
    try:
        return Decision(
            path_id,
            d["action"],
            d["reviewer"] or "anonymous",
            d["edited_text"],
            d["note"],
            "person",
            review.mode,
            datetime.fromisoformat(outcome["decided_at"]),
            outcome.get("flow_run_id", ""),
        )
    except ValueError as error:  # an edit without text
        return policy_decision(path_id, "keep_out", review.mode, f"unusable review input: {error}")


@task(**_STEP)
def policy_decisions(path_ids: list[str], policy: str, mode: str, note: str) -> list[Decision]:
    return [policy_decision(p, policy, mode, note) for p in path_ids]


@task(**_STEP)
def apply_reviews(paths: tables.TableRef, questions: tables.TableRef, decisions: list[Decision]) -> dict:
    report = review.apply_reviews(paths, questions, decisions)
    logger = get_run_logger()
    for d in decisions:
        logger.info(
            "review %s: %s by %s (%s)%s",
            d.item_id,
            d.action,
            d.reviewer,
            d.source,
            f" — {d.note}" if d.note else "",
        )
    return report.__dict__


@task(**_STEP)
def score_samples(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: list[str],
    judge: JudgeConfig,
    generation: GenerationConfig,
    scoring: LongCoTConfig,
) -> dict:
    report = score.score_samples(
        paths,
        questions,
        question_ids,
        make_judge(judge, generation),
        scoring,
        max_error_share=judge.max_error_share,
    )
    return report.__dict__


@task(**_STEP)
def gate_longcot_paths(paths: tables.TableRef, question_ids: list[str], run_id: str) -> None:
    publish_gate(check_longcot_paths(paths, question_ids), paths, run_id)


@task(**_STEP)
def gate_longcot_samples(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: list[str],
    config: GateConfig,
    run_id: str,
) -> None:
    publish_gate(check_longcot_samples(paths, questions, question_ids, config), paths, run_id)


@task(**_STEP)
def publish_longcot(
    paths: tables.TableRef, questions: tables.TableRef, question_ids: list[str], generation: GenerationConfig
) -> tables.TableRef:
    version = publish.publish_longcot(paths, questions, question_ids, generation)
    return tables.TableRef("longcot", tables.table_uri("longcot"), version)


@task(**_STEP)
def summarize(paths: tables.TableRef, question_ids: list[str]) -> dict:
    summary = batch_summary(paths, question_ids) | {
        f"share_{g}": s for g, s in grade_shares(paths, question_ids).items()
    }
    lines = ["## LongCoT batch", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += [
        "",
        (
            "Ask more with `keyeflow sql`, e.g. "
            "`select grade, status, stage, count(*) from longcot_paths group by all`."
        ),
    ]
    create_markdown_artifact("\n".join(lines), key="longcot-summary", description="LongCoT grades and drops")
    return summary
