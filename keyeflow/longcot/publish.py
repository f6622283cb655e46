"""The LongCoT output: :func:`publish_longcot` writes ``longcot``, one row per kept sample with its messages
ready for SFT, and :func:`batch_summary` / :func:`grade_shares` count what a batch came to.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from keyeflow.datasets import tables
from keyeflow.longcot.common import STATUSES, batch_paths, json_text, questions_by_id, read_rows
from keyeflow.longcot.generate import GenerationConfig, user_content
from keyeflow.quality import graders
from keyeflow.quality.longcot_scoring import GRADES


def sft_messages(question: dict, response: str, config: GenerationConfig) -> list[dict]:
    """The training conversation: the question (media parts, text + the think switch), the response. The
    generation system prompt is left out: in training, ``/think`` asks for the format."""
    return [
        {"role": "user", "content": user_content(question, config.think_suffix)},
        {"role": "assistant", "content": response},
    ]


def publish_longcot(
    paths: tables.TableRef,
    questions: tables.TableRef,
    question_ids: Sequence[str],
    config: GenerationConfig,
    root: str | None = None,
) -> int:
    """Write the batch's kept samples to ``longcot`` (replacing the rows these questions had); returns the
    table version. Unchanged rows leave the table alone."""
    kept = [r for r in batch_paths(paths, question_ids) if r["status"] == "kept"]
    qs = questions_by_id(questions, (r["question_id"] for r in kept))
    now = tables.now()
    rows = []
    for r in kept:
        q = qs[r["question_id"]]
        rows.append({
            "sample_id": r["path_id"], "question_id": r["question_id"], "domain": r["domain"],
            "source": q["source"], "question": q["question"], "reference": q["reference"],
            "media": q["media"], "response": r["response"], "answer": graders.extract_answer(r["response"]),
            "grade": r["grade"], "redundancy": r["redundancy"], "confidence": r["confidence"],
            "score": r["score"], "repeats": r["repeats"], "reviewer_action": r["review_action"] or "none",
            "reviewer": r["reviewer"] or "", "reason": r["reason"],
            "judge": r["judge"], "messages": json_text(sft_messages(q, r["response"], config)),
            "gen_config_hash": r["gen_config_hash"], "created_at": now,
        })  # fmt: skip
    ds = tables.ensure("longcot", root)
    ids = sorted(set(question_ids))
    existing = read_rows("longcot", None, "question_id", ids, root)

    def key(row: dict) -> tuple:
        return tuple(
            row[c]
            for c in ("sample_id", "response", "grade", "score", "repeats", "reviewer_action", "reason")
        )

    if sorted(map(key, existing)) == sorted(map(key, rows)):
        return ds.version
    return tables.replace_where(
        "longcot",
        pc.field("question_id").isin(ids),
        pa.Table.from_pylist(rows, schema=tables.SCHEMAS["longcot"]),
        root,
    )


# ====================================================================================== summaries


def batch_summary(paths: tables.TableRef, question_ids: Sequence[str]) -> dict:
    """Counts of this batch's paths by grade and status, for metrics and the CLI."""
    rows = batch_paths(paths, question_ids)
    out: dict = {"num_paths": len(rows)}
    for g in GRADES:
        out[f"num_{g}"] = sum(r["grade"] == g for r in rows)
    for s in STATUSES:
        out[f"num_{s}"] = sum(r["status"] == s for r in rows)
    return out


def grade_shares(paths: tables.TableRef, question_ids: Sequence[str]) -> dict[str, float]:
    kept = [r["grade"] for r in batch_paths(paths, question_ids) if r["status"] == "kept"]
    return {g: kept.count(g) / len(kept) for g in sorted(set(kept))} if kept else {}
