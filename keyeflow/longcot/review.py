"""LongCoT step 4 (SPEC §4.3.1): human in the loop.

People decide on every B and every borderline A (:class:`ReviewConfig` says who: a person through Prefect, or
an unattended policy). :func:`apply_reviews` stores every decision in ``longcot_reviews`` (who, what, the
edit, when, and whether it was a person or a policy) and applies it: approve keeps the path, edit keeps the
edited text if it is still in the think/answer format and still reaches the reference, reject drops it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from keyeflow.datasets import tables
from keyeflow.faults import kill_point
from keyeflow.longcot.assess import as_think_answer
from keyeflow.longcot.common import batch_paths, questions_by_id, read_ref_rows, read_rows
from keyeflow.longcot.generate import check_answer
from keyeflow.quality import graders

REVIEW_MODES = ("keep_out", "auto_approve", "prefect")
TIMEOUT_POLICIES = ("keep_out", "auto_approve")
ACTIONS = ("approve", "edit", "reject")


@dataclass(frozen=True)
class ReviewConfig:
    """Step 4: who decides on every B and borderline A.

    ``mode``: ``keep_out`` (unattended: nothing that needs a person goes in), ``auto_approve`` (unattended:
    everything goes in as graded), ``prefect`` (the flow pauses for a person's decision on each item; see
    ``keyeflow/flows/longcot.py``). ``on_timeout``: what an item gets when no decision comes back within
    ``timeout_s`` seconds; once that happens, nobody is assumed to be watching and the rest of the queue
    gets the same policy without waiting.
    """

    mode: str = "keep_out"
    timeout_s: int = 3600
    on_timeout: str = "keep_out"
    poll_interval_s: int = 10

    def __post_init__(self) -> None:
        if self.mode not in REVIEW_MODES:
            raise ValueError(f"ReviewConfig.mode must be one of {REVIEW_MODES}, got {self.mode!r}")
        if self.on_timeout not in TIMEOUT_POLICIES:
            raise ValueError(
                f"ReviewConfig.on_timeout must be one of {TIMEOUT_POLICIES}, got {self.on_timeout!r}"
            )
        if self.timeout_s < 1 or self.poll_interval_s < 1:
            raise ValueError("ReviewConfig: timeout_s and poll_interval_s must be >= 1 second")


@dataclass(frozen=True)
class Decision:
    """One review decision on one path (``item_id`` is the path id)."""

    item_id: str
    action: str  # approve | edit | reject
    reviewer: str
    edited_text: str = ""
    note: str = ""
    source: str = "person"  # "person" (a reviewer in Prefect) or "policy" (a mode or a timeout)
    mode: str = "prefect"
    decided_at: datetime | None = None
    flow_run_id: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"review action must be one of {ACTIONS}, got {self.action!r}")
        if self.action == "edit" and not self.edited_text.strip():
            raise ValueError("an edit needs the edited text")
        if self.source not in ("person", "policy"):
            raise ValueError(f"decision source must be 'person' or 'policy', got {self.source!r}")

    @property
    def review_id(self) -> str:
        if self.source == "policy":  # the same policy on a rerun is the same decision
            return f"{self.item_id}@policy:{self.reviewer}:{self.action}"
        stamp = self.decided_at.isoformat() if self.decided_at else ""
        return f"{self.item_id}@{stamp}"


def policy_decision(path_id: str, policy: str, mode: str, note: str) -> Decision:
    """What an unattended policy decides: ``auto_approve`` approves, ``keep_out`` rejects."""
    if policy not in TIMEOUT_POLICIES:
        raise ValueError(f"policy must be one of {TIMEOUT_POLICIES}, got {policy!r}")
    action = "approve" if policy == "auto_approve" else "reject"
    return Decision(
        path_id, action, f"policy:{policy}", note=note, source="policy", mode=mode, decided_at=tables.now()
    )


def _decision(r: dict) -> Decision:
    return Decision(
        r["path_id"],
        r["action"],
        r["reviewer"],
        r["edited_text"] or "",
        r["note"] or "",
        r["source"],
        r["mode"],
        r["decided_at"],
        r["flow_run_id"] or "",
    )


def person_decisions(path_ids: Sequence[str], root: str | None = None) -> dict[str, Decision]:
    """The latest decision a person made on each of these paths (what a rerun reuses)."""
    rows = [
        r for r in read_rows("longcot_reviews", None, "path_id", path_ids, root) if r["source"] == "person"
    ]
    return {r["path_id"]: _decision(r) for r in sorted(rows, key=lambda r: r["decided_at"])}


def _review_row(d: Decision, path: dict, outcome: str, outcome_reason: str) -> dict:
    return {
        "review_id": d.review_id, "path_id": d.item_id, "question_id": path["question_id"],
        "grade": path["grade"], "review_reason": path["grade_reasons"] or "", "action": d.action,
        "edited_text": d.edited_text, "reviewer": d.reviewer or "anonymous", "note": d.note,
        "source": d.source, "mode": d.mode, "outcome": outcome, "outcome_reason": outcome_reason,
        "flow_run_id": d.flow_run_id, "decided_at": d.decided_at or tables.now(),
    }  # fmt: skip


def record_decision(paths: tables.TableRef, decision: Decision, root: str | None = None) -> None:
    """Store a decision the moment it is made (outcome ``pending``), so a crash before it is applied does
    not ask the person again: :func:`review_plan` hands it back to be applied."""
    path = read_ref_rows(paths, "path_id", [decision.item_id])[0]
    tables.upsert("longcot_reviews", [_review_row(decision, path, "pending", "")], root)
    kill_point("longcot_review.decision_recorded")  # a person's decision stored (pending), not yet applied


@dataclass
class ReviewPlan:
    ask: list[str]  # path ids that need a decision now
    pending: list[Decision]  # decisions people made that were not applied yet (a crash in between)


def review_plan(paths: tables.TableRef, question_ids: Sequence[str], root: str | None = None) -> ReviewPlan:
    """What step 4 has to do for the batch: ask about every path graded for review that no person has
    decided on (items a policy handled on an earlier run are asked again: a person may be there now), and
    apply the people's decisions still pending."""
    candidates = [
        r["path_id"]
        for r in batch_paths(paths, question_ids)
        if r["needs_review"] and r["grade"] in ("A", "B") and r["stage"] in ("assess", "review", "score")
    ]
    rows = [
        r for r in read_rows("longcot_reviews", None, "path_id", candidates, root) if r["source"] == "person"
    ]
    decided = {r["path_id"] for r in rows}
    pending = [_decision(r) for r in sorted(rows, key=lambda r: r["decided_at"]) if r["outcome"] == "pending"]
    return ReviewPlan([p for p in candidates if p not in decided], pending)


def review_queue(paths: tables.TableRef, question_ids: Sequence[str], root: str | None = None) -> list[str]:
    """Path ids that need a decision now (:func:`review_plan`)."""
    return review_plan(paths, question_ids, root).ask


def review_item(paths: tables.TableRef, questions: tables.TableRef, path_id: str) -> dict:
    """What a reviewer needs to see of one path."""
    row = read_ref_rows(paths, "path_id", [path_id])[0]
    question = questions_by_id(questions, [row["question_id"]])[row["question_id"]]
    return {"path": row, "question": question}


def review_markdown(item: dict) -> str:
    """The item as a reviewer reads it in the Prefect UI (artifact and resume form)."""
    row, q = item["path"], item["question"]
    media = ", ".join(f"{m['type']} `{Path(m['path']).name}`" for m in json.loads(q["media"])) or "none"
    steps = json.loads(row["step_scores"] or "[]")
    table = ["| step | logic | facts | relevance | redundant | notes |", "|---|---|---|---|---|---|"]
    for k, s in enumerate(steps, start=1):
        table.append(
            f"| {k} | {s['logical_consistency']:.2f} | {s['factual_accuracy']:.2f} | {s['relevance']:.2f} "
            f"| {'yes' if s['redundant'] else ''} | {'; '.join(s['notes'])} |"
        )
    return "\n".join([
        f"## LongCoT review: `{row['path_id']}`",
        f"**Grade {row['grade']}** — {row['grade_reasons']}  ",
        (f"Domain: {q['domain']} · media: {media} · confidence {row['confidence']:.3f} · "
         f"redundancy {row['redundancy']:.2f} · judge: {row['judge']}"),
        "", f"**Question:** {q['question']}", "",
        f"**Reference:** `{q['reference']}` · **answer given:** `{row['answer']}`",
        "", "**Response:**", "", "```", row["text"], "```", "", *table, "",
        ("Decide: `approve` keeps the response as it is, `edit` keeps your `edited_text` (a full "
         "`<think>…</think><answer>…</answer>` response, or just the reasoning to keep the answer), `reject` "
         "drops it. Set `reviewer` to your name; `note` is kept with the decision."),
    ])  # fmt: skip


def edited_response(edited: str, original: str) -> str:
    """An edit as a full response: tagged text is taken as it is; plain text is the new reasoning and the
    original's final answer is kept."""
    text = edited.strip()
    if re.search(r"</?(?:think|answer)>", text):
        return text
    return f"<think>\n{text}\n</think>\n<answer>{graders.extract_answer(original)}</answer>"


@dataclass
class ReviewReport:
    num_decisions: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    num_kept: int = 0
    num_dropped: int = 0


def apply_reviews(
    paths: tables.TableRef,
    questions: tables.TableRef,
    decisions: Sequence[Decision],
    root: str | None = None,
) -> ReviewReport:
    """Store every decision in ``longcot_reviews`` and apply it to its path (module docstring)."""
    by_id = {r["path_id"]: r for r in read_ref_rows(paths, "path_id", [d.item_id for d in decisions])}
    qs = questions_by_id(questions, (r["question_id"] for r in by_id.values()))
    report = ReviewReport()
    reviews, updated = [], []
    for d in decisions:
        row = by_id.get(d.item_id)
        if row is None:
            raise ValueError(f"review decision for unknown path {d.item_id!r}")
        q = qs[row["question_id"]]
        who = d.reviewer or "anonymous"
        row = dict(
            row,
            reviewer=who,
            review_action=d.action,
            stage="review",
            updated_at=tables.now(),
            score=None,
            score_reason=None,
            repeats=None,
        )
        label = f"{row['grade']} ({row['grade_reasons'] or ''})"
        if d.action == "reject":
            outcome = f"{label} rejected by {who}" + (f": {d.note}" if d.note else "")
            row.update(status="dropped", reason=outcome, response=None)
        else:
            response = (
                as_think_answer(row["text"])
                if d.action == "approve"
                else edited_response(d.edited_text, row["text"])
            )
            problem = graders.format_problem(response, "think")
            check = check_answer(q["domain"], response, q["reference"])
            verb = "approved" if d.action == "approve" else "edited"
            if problem:
                outcome = f"{label} {verb} by {who} but unusable: {problem}"
                row.update(status="dropped", reason=outcome, response=None)
            elif not check.ok:
                outcome = (
                    f"{label} {verb} by {who} but the answer no longer matches the reference ({check.reason})"
                )
                row.update(status="dropped", reason=outcome, response=None)
            else:
                outcome = f"{label} {verb} by {who}" + (f": {d.note}" if d.note else "")
                row.update(status="kept", reason=outcome, response=response)
        updated.append(row)
        reviews.append(_review_row(d, row, row["status"], outcome))
        report.actions[d.action] = report.actions.get(d.action, 0) + 1
        report.sources[d.source] = report.sources.get(d.source, 0) + 1
        report.num_kept += row["status"] == "kept"
        report.num_dropped += row["status"] == "dropped"
    # A decision stored when it was made (or by an earlier run) keeps its time; its outcome is filled in.
    first = {
        r["review_id"]: r["decided_at"]
        for r in read_rows("longcot_reviews", None, "review_id", [r["review_id"] for r in reviews], root)
    }
    for r in reviews:
        r["decided_at"] = first.get(r["review_id"], r["decided_at"])
    kill_point("longcot_review.before_commit")  # the decisions' outcomes worked out; none written
    tables.update_rows("longcot_reviews", reviews, root)
    kill_point("longcot_review.reviews_committed")  # the reviews' outcomes written, the paths not updated
    tables.update_rows("longcot_paths", updated, root)
    report.num_decisions = len(decisions)
    return report
