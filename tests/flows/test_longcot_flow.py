"""The LongCoT flow under Prefect's harness: end to end against the synthetic teacher (a real
OpenAI-compatible process on 127.0.0.1, fixed error kinds per sample question), a real pause for human review
resumed with ``resume_flow_run(..., run_input=...)``, the timeout policies, our tiny model in process (images
and a video ingested first), and our model behind the real ``keyeflow.model.serving`` server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.datasets import sql, tables
from keyeflow.longcot.generate import GenerationConfig, default_model_path, ensure_tiny_model, make_generator
from keyeflow.quality.judges import JudgeFailure, JudgeInput, ModelJudge
from keyeflow.synthetic import synthetic_teacher as teacher_server
from keyeflow.synthetic.longcot_questions import generate_longcot_questions

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _prefect(prefect_harness):
    yield


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    settings = teacher_server.teacher_config(plans=teacher_server.SAMPLE_PLANS)
    with teacher_server.start_server(settings, tmp_path_factory.mktemp("teacher")) as (url, log):
        yield url, log


@pytest.fixture()
def questions(tmp_path, sample_images, media_dir) -> dict:
    files = generate_longcot_questions(media_dir / f"longcot-{tmp_path.name}", media_dir / "images")
    return {**files, "root": str(media_dir)}


def teacher_generation(url: str) -> dict:
    return {"backend": "openai", "base_url": url, "model": teacher_server.MODEL, "n": 4}


def test_longcot_flow_with_a_teacher_server_end_to_end(home, questions, teacher):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from keyeflow.flows.longcot import longcot

    url, log = teacher
    result = longcot(
        [str(questions["dir"])], questions["root"], review="auto_approve", generation=teacher_generation(url)
    )
    s = result["summary"]
    # SAMPLE_PLANS: 7 questions with correct paths (18 A after 3 near-duplicates), 2 B, the other paths wrong.
    assert (s["num_paths"], s["num_A"], s["num_B"], s["num_C"], s["num_kept"]) == (124, 18, 2, 101, 20)
    assert result["review"]["sources"] == {"policy": 3} and result["collect"]["num_duplicates"] == 1

    # Every verdict is queryable, as `keyeflow sql` users ask it.
    query = "select grade, count(*) as n from longcot_paths group by grade order by grade"
    by_grade = json.loads(runner.invoke(app, ["sql", query, "--format", "json"]).output)
    assert by_grade == [
        {"grade": "A", "n": 18},
        {"grade": "B", "n": 2},
        {"grade": "C", "n": 101},
        {"grade": None, "n": 3},
    ]
    drops = sql.query(
        "select stage, count(*) as n from longcot_paths where status = 'dropped' group by stage"
    )
    assert dict(zip(drops.stage, drops.n)) == {"generate": 101, "select": 3}
    out = sql.query("select * from longcot order by sample_id")
    assert len(out) == 20 and set(out.grade) == {"A", "B"}
    assert set(out.reviewer_action) == {"none", "approve"} and set(out.score) <= {1, 2, 3, 4, 5}
    assert all(r.startswith("<think>") and r.endswith("</answer>") for r in out.response)
    visual = out[out.domain.isin(["business", "grounding"])]
    assert set(visual.score) == {5} and set(visual.repeats) == {3}  # visual reasoning, repeated in training
    messages = json.loads(visual.messages.iloc[0])
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"][0]["type"] == "image" and Path(messages[0]["content"][0]["image"]).is_file()
    assert messages[0]["content"][1]["text"].endswith(" /think")
    reviews = sql.query("select reviewer, action, source, note from longcot_reviews")
    assert set(reviews.reviewer) == {"policy:auto_approve"} and set(reviews.action) == {"approve"}
    gates_run = sql.query("select gate, passed, num_rows from gate_results order by gate")
    assert gates_run.values.tolist() == [["longcot", True, 20], ["longcot_paths", True, 124]]

    run = lineage.client().get_run(result["run_id"])
    assert run.data.tags["keyeflow.gate.longcot"] == "passed" and run.data.metrics["num_C"] == 101
    assert run.data.tags["keyeflow.output.longcot"].endswith(f"@v{result['longcot'].version}")
    with get_client(sync_client=True) as client:
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(
                        any_=["longcot-summary", "gate-longcot", "longcot-generate-progress"]
                    )
                )
            )
        }
    assert keys == {"longcot-summary", "gate-longcot", "longcot-generate-progress"}
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(
        p.get("type") == "image_url"
        for b in sent
        for m in b["messages"]
        if isinstance(m["content"], list)
        for p in m["content"]
    )

    # The CLI again over the same files: nothing is generated or asked again, the output table is unchanged.
    requests_before = len(log.read_text().splitlines())
    again = runner.invoke(
        app,
        [
            "longcot",
            str(questions["dir"]),
            "--source-root",
            questions["root"],
            "--review",
            "auto_approve",
            "--backend",
            "openai",
            "--base-url",
            url,
            "--model",
            teacher_server.MODEL,
        ],
    )
    assert again.exit_code == 0, again.output
    assert "paths: 124 (A 18, B 2, C 101); kept 20" in " ".join(again.output.split())
    assert len(log.read_text().splitlines()) == requests_before
    assert tables.ref("longcot").version == result["longcot"].version
    assert len(sql.query("select * from longcot_reviews")) == 3


def _paused_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            )
        )


def _in_thread(fn, **kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(**kwargs)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_review_pauses_the_flow_and_a_person_resumes_it(home, questions, teacher):
    from prefect.flow_runs import resume_flow_run

    from keyeflow.flows.longcot import longcot
    from keyeflow.tasks.longcot import artifact_key

    url, _ = teacher
    thread, box = _in_thread(
        longcot,
        questions=[str(questions["dir"])],
        source_root=questions["root"],
        review="prefect",
        review_timeout_s=120,
        review_poll_interval_s=1,
        generation=teacher_generation(url),
    )
    decided: dict[str, tuple[str, str]] = {}  # path id -> (action, paused run id)
    deadline = time.monotonic() + 120
    while len(decided) < 3:
        assert time.monotonic() < deadline, f"only {len(decided)} reviews came up; flow: {box}"
        assert thread.is_alive() or len(decided) == 3, f"flow ended early: {box}"
        for run in _paused_runs():
            path_id = run.parameters["path_id"]
            if path_id in decided:
                continue
            row = (
                tables.open_table("longcot_paths")
                .to_table(filter=pc.field("path_id") == path_id)
                .to_pylist()[0]
            )
            assert row["status"] == "review"
            if not decided:  # an answer the form does not allow is refused, the run stays paused
                with pytest.raises(RuntimeError):
                    resume_flow_run(run.id, run_input={"item_id": path_id, "action": "maybe"})
            if row["grade"] == "A":
                decision = {
                    "item_id": path_id,
                    "action": "approve",
                    "reviewer": "bob",
                    "note": "repetition is fine",
                }
            elif row["answer"] == "5":
                decision = {
                    "item_id": path_id,
                    "action": "edit",
                    "reviewer": "alice",
                    "note": "dropped the digression",
                    "edited_text": "Step 1: 3x = 20 - 5 = 15.\n\nStep 2: x = 15 / 3 = 5.",
                }
            else:
                decision = {
                    "item_id": path_id,
                    "action": "reject",
                    "reviewer": "carol",
                    "note": "wrong arithmetic",
                }
            resume_flow_run(run.id, run_input=decision)
            decided[path_id] = (decision["action"], str(run.id))
        time.sleep(0.3)
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in box, box
    result = box["result"]
    assert result["review"]["actions"] == {"approve": 1, "edit": 1, "reject": 1}

    reviews = sql.query(
        "select path_id, reviewer, action, edited_text, note, source, outcome, flow_run_id, decided_at "
        "from longcot_reviews order by reviewer"
    )
    assert reviews.reviewer.tolist() == ["alice", "bob", "carol"] and set(reviews.source) == {"person"}
    assert reviews.outcome.tolist() == ["kept", "kept", "dropped"] and reviews.decided_at.notna().all()
    for row in reviews.itertuples():
        assert decided[row.path_id] == (row.action, row.flow_run_id)
    out = sql.query("select sample_id, grade, reviewer_action, reviewer, response, reason from longcot")
    edited = out[out.reviewer_action == "edit"].iloc[0]
    assert edited.reviewer == "alice" and "Step 2: x = 15 / 3 = 5." in edited.response
    assert edited.reason.startswith(
        "B (process flawed; relevance 0 < 0.7) edited by alice: dropped the digression"
    )
    rejected = reviews[reviews.reviewer == "carol"].path_id.iloc[0]
    assert rejected not in set(out.sample_id) and len(out) == 19
    assert sql.query("select bool_and(passed) as ok from gate_results").ok[0]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(p) for p in decided]))
        )
    assert len({a.key for a in artifacts}) == 3 and "**Reference:**" in artifacts[0].data


@pytest.mark.parametrize("policy", ["auto_approve", "keep_out"])
def test_review_timeout_applies_the_configured_policy(home, questions, teacher, policy):
    from keyeflow.flows.longcot import longcot

    url, _ = teacher
    started = time.monotonic()
    result = longcot(
        [str(questions["dir"])],
        questions["root"],
        review="prefect",
        review_timeout_s=2,
        on_timeout=policy,
        review_poll_interval_s=1,
        generation=teacher_generation(url),
        gates={"grade_share_bounds": {"A": (0.0, 1.0), "B": (0.0, 1.0)}},
    )
    assert time.monotonic() - started < 60  # one wait of 2 s, not one per item
    reviews = sql.query("select reviewer, action, source, note, outcome from longcot_reviews order by note")
    assert len(reviews) == 3 and set(reviews.source) == {"policy"}
    assert set(reviews.reviewer) == {f"policy:{policy}"}
    assert set(reviews.action) == {"approve" if policy == "auto_approve" else "reject"}
    assert reviews.note.str.startswith("no decision within 2 s (review run Failed").sum() == 1
    assert reviews.note.str.startswith("not asked: an earlier item got no decision").sum() == 2
    assert set(reviews.outcome) == {"kept" if policy == "auto_approve" else "dropped"}
    assert result["summary"]["num_kept"] == (20 if policy == "auto_approve" else 17)


def test_longcot_flow_on_the_tiny_local_model(home, tmp_path, sample_images, sample_videos, media_dir):
    """Our randomly initialised model in process: images and a clip are ingested and shown to it, it
    answers nothing right, every path is graded C with its reason, and the flow still completes."""
    from keyeflow.flows.longcot import longcot

    files = generate_longcot_questions(
        media_dir / f"longcot-{tmp_path.name}", media_dir / "images", sample_videos[0].parent
    )
    result = longcot(
        [str(files["dir"])],
        str(media_dir),
        review="keep_out",
        generation={"n": 2, "max_new_tokens": 24, "max_image_tokens": 64, "max_video_tokens": 512},
        collect={"rewrite": True, "merge": True, "rewrite_max_new_tokens": 16},
        gates={"min_samples": 0},
    )
    assert (default_model_path() / "config.json").is_file()
    c, g = result["collect"], result["generate"]
    assert c["num_merged"] >= 2 and c["num_rewrites_discarded"] == c["num_new"] - c["num_merged"]
    assert g["num_failed"] == 0 and g["num_generated"] == len(result["question_ids"])
    assert sql.query("select count(*) as n from image_samples").n[0] == 8
    assert sql.query("select count(*) as n from video_samples").n[0] == 1
    paths = sql.query("select grade, status, stage, reason, confidence, answer_reason from longcot_paths")
    assert len(paths) == 2 * len(result["question_ids"])
    assert set(paths.grade) == {"C"} and set(paths.status) == {"dropped"} and set(paths.stage) == {"generate"}
    assert all(r.startswith("C: answer wrong (") for r in paths.reason)
    assert all(0.0 <= x <= 1.0 for x in paths.confidence)
    notes = sql.query("select rewrite_note from longcot_questions where rewrite = 'none'").rewrite_note
    assert all(n.startswith("rewrite discarded: ") for n in notes)
    gate = sql.query(
        "select gate, passed, num_rows from gate_results where gate like 'longcot%' order by gate"
    )
    assert gate.values.tolist() == [["longcot", True, 0], ["longcot_paths", True, len(paths)]]
    assert tables.open_table("longcot").count_rows() == 0


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """Our tiny model behind the real OpenAI-compatible server (`python -m keyeflow.model.serving`)."""
    model_dir = ensure_tiny_model(tmp_path_factory.mktemp("served") / "tiny")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("serving-log") / "server.log"
    env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keyeflow.model.serving",
                "--model",
                str(model_dir),
                "--port",
                str(port),
                "--served-model-name",
                "keye-tiny",
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_longcot_flow_through_the_model_server(home, tmp_path, questions, model_server):
    """The HTTP path with a real model: text questions get paths (all C), image questions are refused by
    this text-only server and quarantined with its message; the model judge is asked and falls back."""
    from keyeflow.flows.longcot import longcot

    few = tmp_path / "few"
    few.mkdir()
    (few / "text.jsonl").write_text("\n".join(Path(questions["text"]).read_text().splitlines()[:3]) + "\n")
    chart = next(
        json.loads(line) for line in Path(questions["visual"]).read_text().splitlines() if "bar_chart" in line
    )
    part = chart["messages"][0]["content"][0]
    part["image"] = str(
        (Path(questions["dir"]) / part["image"]).resolve()
    )  # absolute, inside the source root
    (few / "visual.jsonl").write_text(json.dumps(chart) + "\n")
    result = longcot(
        [str(few)],
        questions["root"],
        review="keep_out",
        judge={"kind": "model"},
        generation={
            "backend": "openai",
            "base_url": model_server,
            "model": "keye-tiny",
            "n": 2,
            "max_new_tokens": 16,
            "max_error_share": 0.5,  # the image question fails on purpose: 1 of 4
        },
        gates={"min_samples": 0},
    )
    g = result["generate"]
    assert (g["num_generated"], g["num_failed"], g["num_paths"]) == (3, 1, 6)
    reason = sql.query("select reason from quarantine where stage = 'longcot_generate'").reason[0]
    assert "HTTP 400" in reason and "'image_url' is not supported" in reason
    assert set(sql.query("select grade from longcot_paths").grade) == {"C"}
    judge = ModelJudge(
        make_generator(GenerationConfig(backend="openai", base_url=model_server, model="keye-tiny")),
        max_new_tokens=16,
    )
    verdict = judge.assess([JudgeInput("What is 1 divided by 2?", "0.5", ("1 / 2 = 0.5.",), "0.5")])[0]
    assert isinstance(verdict, JudgeFailure) and verdict.reason.startswith("model judge reply unusable")
