"""The LongCoT cold-start flow (SPEC §4.3.1): collect → generate → assess → review → score → gates → table.
Wiring only; table references and question ids flow between tasks.

Human review (step 4) in ``review="prefect"`` mode: every item that needs a person (each B and borderline A)
gets its own subflow run, ``longcot-review-item``, which publishes the item as a markdown artifact and calls
``prefect.flow_runs.pause_flow_run(wait_for_input=ReviewDecision, timeout=review_timeout_s)``. The run waits
in the Prefect UI as Paused with the item shown above the form (item id pre-filled); a reviewer submits
approve / edit / reject, or a script calls ``resume_flow_run(flow_run_id, run_input={...})``. One pause per
item, not per batch: the form stays one flat record a person can fill in, each decision is stored with its
own time, and a pause that times out fails only its own small run (Prefect refuses to resume a run whose
pause expired), so the parent flow goes on. Items are asked one after another; when one gets no decision
in time, nobody is assumed to be watching and the rest of the queue gets the ``on_timeout`` policy at once
instead of waiting ``review_timeout_s`` each. A person's decision is stored in ``longcot_reviews`` the
moment the run resumes (outcome ``pending`` until applied), so a crash loses none and a rerun never asks
again; an answer the form cannot use (the wrong item id, an edit without text) keeps the item out, with
the reason. ``review="auto_approve"`` / ``"keep_out"`` decide by policy without pausing (what
``keyeflow run`` uses unattended); every decision, person or policy, is stored with who, what, the edit,
when and the outcome.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, runtime
from prefect.flow_runs import pause_flow_run
from pydantic import ValidationError

from keyeflow.datasets.tables import TableRef
from keyeflow.flows.data import ingest_images
from keyeflow.flows.video import video_pipeline
from keyeflow.longcot.assess import JudgeConfig
from keyeflow.longcot.collect import CollectConfig
from keyeflow.longcot.gates import GateConfig
from keyeflow.longcot.generate import GenerationConfig
from keyeflow.longcot.review import Decision, ReviewConfig
from keyeflow.quality.longcot_scoring import LongCoTConfig
from keyeflow.tasks import longcot as t
from keyeflow.tasks.common import current_ref, lineage_run, record_outputs


@flow(name="longcot-review-item")
def review_longcot_item(paths: TableRef, questions: TableRef, path_id: str, review: ReviewConfig) -> Decision:
    """Pause until a person decides on one path; the decision is stored at once and returned."""
    markdown = t.render_review_item(paths, questions, path_id)
    form = t.ReviewDecision.with_initial_data(description=markdown, item_id=path_id, action="approve")
    try:
        answer = pause_flow_run(
            wait_for_input=form,
            timeout=review.timeout_s,
            poll_interval=review.poll_interval_s,
            key=t.artifact_key(path_id),
        )
    except ValidationError as error:
        outcome = {"invalid": str(error).replace("\n", " ")}
    else:
        outcome = {
            "decision": answer.model_dump(include={"item_id", "action", "edited_text", "reviewer", "note"}),
            "decided_at": datetime.now(UTC).isoformat(),
            "flow_run_id": str(runtime.flow_run.id),
        }
    decision = t.decisions_from_review(path_id, outcome, review)
    t.record_decision(paths, decision)
    return decision


def _review(paths, questions, question_ids: list[str], review: ReviewConfig) -> list[Decision]:
    plan = t.plan_review(paths, question_ids)
    decisions = list(plan.pending)  # made by people in a run that stopped before applying them
    if review.mode != "prefect":
        note = {
            "auto_approve": "review mode auto_approve: approved without a person",
            "keep_out": "review mode keep_out: not reviewed, kept out",
        }[review.mode]
        return decisions + t.policy_decisions(plan.ask, review.mode, review.mode, note)
    for k, path_id in enumerate(plan.ask):
        state = review_longcot_item(paths, questions, path_id, review, return_state=True)
        if state.is_completed():
            decisions.append(state.result())
            continue
        decisions.append(
            t.decisions_from_review(path_id, None, review, f"review run {state.name}: {state.message}")
        )
        rest = plan.ask[k + 1 :]
        if rest:
            decisions += t.policy_decisions(
                rest,
                review.on_timeout,
                review.mode,
                f"not asked: an earlier item got no decision; on_timeout={review.on_timeout}",
            )
        break
    return decisions


@flow(name="longcot")
def longcot(
    questions: list[str],
    source_root: str | None = None,
    review: str = "keep_out",
    review_timeout_s: int = 3600,
    on_timeout: str = "keep_out",
    review_poll_interval_s: int = 10,
    generation: dict | None = None,
    judge: dict | None = None,
    collect: dict | None = None,
    scoring: dict | None = None,
    gates: dict | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """LongCoT cold-start data from question files (JSONL, conversation format) into the ``longcot`` table.

    ``source_root``: media must stay inside it (default: the common folder of the question paths).
    ``generation``/``judge``/``collect``/``scoring``/``gates``: fields of ``GenerationConfig``,
    ``JudgeConfig``, ``CollectConfig``, ``LongCoTConfig`` and ``GateConfig``.
    """
    import os

    gen = GenerationConfig(**(generation or {}))
    judge_config = JudgeConfig(**(judge or {}))
    collect_config = CollectConfig(**(collect or {}))
    scoring_config = LongCoTConfig(**(scoring or {}))
    gate_config = GateConfig(**(gates or {}))
    review_config = ReviewConfig(review, review_timeout_s, on_timeout, review_poll_interval_s)
    root = source_root or os.path.commonpath(
        [os.path.abspath(os.path.dirname(p) if os.path.isfile(p) else p) for p in questions]
    )
    params = {
        "questions": questions,
        "source_root": root,
        "generation": gen.__dict__,
        "generation_hash": gen.config_hash(),
        "judge": judge_config.kind,
        "collect": collect_config.__dict__,
        "scoring": scoring_config.__dict__,
        "gates": gate_config.__dict__,
        "review": review_config.__dict__,
    }
    with lineage_run("longcot", params, parent_run_id) as run_id:
        collected = t.collect_questions(questions, root, collect_config, gen)
        ids = collected["question_ids"]
        questions_ref = current_ref("longcot_questions")
        if gen.backend == "local":  # our model reads media pre-tokenised: ingest what the questions show
            media = t.referenced_media(questions_ref, ids)
            if media["image"]:
                ingest_images(media["image"], max_tokens=gen.max_image_tokens, parent_run_id=run_id)
            if media["video"]:
                video_pipeline(
                    media["video"],
                    preset=gen.video_preset,
                    overrides={"total_token_budget": gen.max_video_tokens},
                    parent_run_id=run_id,
                )
        generated = t.generate_paths(questions_ref, ids, gen, scoring_config)
        assessed = t.assess_paths(
            current_ref("longcot_paths"), questions_ref, ids, judge_config, gen, scoring_config
        )
        decisions = _review(current_ref("longcot_paths"), questions_ref, ids, review_config)
        reviewed = t.apply_reviews(current_ref("longcot_paths"), questions_ref, decisions)
        scored = t.score_samples(
            current_ref("longcot_paths"), questions_ref, ids, judge_config, gen, scoring_config
        )
        paths = current_ref("longcot_paths")
        summary = t.summarize(paths, ids)
        t.gate_longcot_paths(paths, ids, run_id)
        t.gate_longcot_samples(paths, questions_ref, ids, gate_config, run_id)
        output = t.publish_longcot(paths, questions_ref, ids, gen)
        reviews, quarantine = current_ref("longcot_reviews"), current_ref("quarantine")
        metrics = {
            k: v
            for k, v in {**collected, **generated, **summary}.items()
            if k.startswith(("num_", "share_")) and isinstance(v, (int, float))
        }
        metrics |= {f"review_{k}": v for k, v in reviewed["actions"].items()}
        metrics |= {f"score_{k}": v for k, v in scored["scores"].items()} | {
            "total_repeats": scored["total_repeats"]
        }
        record_outputs(run_id, [questions_ref, paths, reviews, output, quarantine], metrics=metrics)
        return {
            "run_id": run_id,
            "questions": questions_ref,
            "paths": paths,
            "reviews": reviews,
            "longcot": output,
            "question_ids": ids,
            "collect": collected,
            "generate": generated,
            "assess": assessed,
            "review": reviewed,
            "score": scored,
            "summary": summary,
        }
