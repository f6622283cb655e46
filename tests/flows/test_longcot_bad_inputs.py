"""The LongCoT flow under Prefect's harness with bad input: question lines without a reference answer, and a
teacher server (the synthetic teacher, ``keyeflow.synthetic.synthetic_teacher``, a real process on 127.0.0.1)
that times out, answers malformed output, fails with 503 for a while, or is down. Each fails its own item with
a reason that ``keyeflow sql`` shows, the rest of the batch goes through to the ``longcot`` table, and a rerun
against the server, fixed and back at the same address, asks it only for the questions that failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.datasets import sql, tables
from keyeflow.synthetic import synthetic_teacher as teacher_server

runner = CliRunner()

HALF = "What is 1 divided by 2?"
ROAD = "A road is 1000 m long. How long is it in kilometres?"
ANGLES = "What is the sum of the interior angles of a triangle, in degrees?"
LETTERS = "How many letters are in the word 'reasoning'?"
FLAKY = "Is the Sun a star? Answer yes or no."  # 503 twice, then answered
SLOW = "Solve for x: 3x + 5 = 20."  # answered after the client's timeout
NOT_JSON = "What is 15% of 240?"  # status 200 with an HTML body
REFERENCES = {HALF: "0.5", ROAD: "1 km", ANGLES: "180", LETTERS: "9", FLAKY: "yes", SLOW: "5", NOT_JSON: "36"}
GOOD, BAD = [HALF, ROAD, ANGLES, LETTERS, FLAKY], [SLOW, NOT_JSON]


@pytest.fixture(autouse=True)
def _prefect(prefect_harness):
    yield


def teacher() -> dict:
    """The synthetic teacher with fixed kinds (``SAMPLE_PLANS``): HALF and ROAD answered right, ANGLES with
    a false calculation on one path, LETTERS and FLAKY wrong."""
    return teacher_server.teacher_config(plans=teacher_server.SAMPLE_PLANS)


def misbehaving() -> dict:
    settings = teacher()
    settings["entries"] = [
        {"match": SLOW, "delay_s": 3.0},
        {"match": NOT_JSON, "respond": {"status": 200, "body": "<html>502 Bad Gateway</html>"}},
        {
            "match": FLAKY,
            "times": 2,
            "respond": {"status": 503, "body": {"error": {"message": "overloaded"}}},
        },
    ]
    return settings


def generation(url: str, max_retries: int = 2) -> dict:
    return {
        "backend": "openai",
        "base_url": url,
        "model": teacher_server.MODEL,
        "n": 2,
        "request_timeout_s": 1.0,
        "max_retries": max_retries,
        "max_error_share": 1.0,  # these tests look at each failed question, not at the step's threshold
    }


def write_questions(folder: Path, texts: list[str], extra: list[dict] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"domain": "math", "messages": [{"role": "user", "content": t}], "reference": REFERENCES[t]}
        for t in texts
    ]
    (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return folder / "questions.jsonl"


def sql_json(query: str) -> list[dict]:
    result = runner.invoke(app, ["sql", query, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def question_ids() -> dict[str, str]:
    return {
        r["question"]: r["question_id"] for r in tables.open_table("longcot_questions").to_table().to_pylist()
    }


def test_bad_questions_and_a_misbehaving_teacher_fail_only_their_items_and_a_rerun_finishes_them(
    home, tmp_path
):
    from keyeflow.flows.longcot import longcot

    no_reference = [
        {"domain": "math", "messages": [{"role": "user", "content": "What is 7 times 6?"}]},
        {"domain": "math", "messages": [{"role": "user", "content": "What is 8 plus 1?"}], "reference": ""},
    ]
    source = write_questions(
        tmp_path / "questions", [HALF, SLOW, ROAD, NOT_JSON, ANGLES, FLAKY, LETTERS], no_reference
    )
    port = teacher_server.free_port()
    with teacher_server.start_server(misbehaving(), tmp_path / "faulty", port=port) as (url, log):
        first = longcot([str(source)], str(source.parent), review="auto_approve", generation=generation(url))
        attempts = {t: teacher_server.requests_for(log, t) for t in REFERENCES}

    assert first["collect"]["num_new"] == 7 and first["collect"]["num_quarantined"] == 2
    g = first["generate"]
    assert (g["num_generated"], g["num_failed"], g["num_paths"]) == (5, 2, 10)
    assert attempts == {HALF: 1, ROAD: 1, ANGLES: 1, LETTERS: 1, FLAKY: 3, SLOW: 3, NOT_JSON: 1}
    ids = question_ids()
    # What failed and why, as a data person asks it.
    failed = sql_json("select stage, uri, reason from quarantine order by stage, uri")
    assert [(r["stage"], r["uri"]) for r in failed] == [
        ("longcot_collect", f"{source}#L8"),
        ("longcot_collect", f"{source}#L9"),
        ("longcot_generate", f"{source}#L2"),
        ("longcot_generate", f"{source}#L4"),
    ]
    assert failed[0]["reason"] == "line 8: no reference: give a 'reference' field or an assistant turn"
    assert failed[1]["reason"] == "line 9: empty reference answer"
    assert failed[2]["reason"].startswith(f"question {ids[SLOW]}: generation failed: GenerationServerError: ")
    assert failed[2]["reason"].endswith("failed after 3 attempt(s); last error: ReadTimeout: timed out")
    assert failed[3]["reason"].startswith(f"question {ids[NOT_JSON]}: generation failed: ")
    assert "status 200 but the body is not JSON: '<html>502 Bad Gateway</html>'" in failed[3]["reason"]
    # The rest went through: graded, reviewed by policy, gated and published.
    out = sql.query("select question_id, grade from longcot")
    assert set(out.question_id) == {ids[HALF], ids[ROAD], ids[ANGLES]} and len(out) == 5
    assert sql.query("select bool_and(passed) as ok from gate_results").ok[0]
    run = lineage.client().get_run(first["run_id"])
    assert run.data.metrics["num_failed"] == 2 and run.data.metrics["num_quarantined"] == 2

    # The server is fixed and back at the same address: only the two failed questions are asked.
    with teacher_server.start_server(teacher(), tmp_path / "fixed", port=port) as (url_again, log):
        assert url_again == url
        second = longcot([str(source)], str(source.parent), review="auto_approve", generation=generation(url))
        attempts = {t: teacher_server.requests_for(log, t) for t in REFERENCES}
    assert attempts == {t: int(t in BAD) for t in REFERENCES}
    g = second["generate"]
    assert (g["num_already_done"], g["num_generated"], g["num_failed"], g["num_paths"]) == (5, 2, 0, 4)
    left = sql_json("select stage, count(*) as n from quarantine group by stage")
    assert left == [{"stage": "longcot_collect", "n": 2}]  # the lines without a reference stay bad
    out = sql.query("select question_id from longcot")
    assert {ids[SLOW], ids[NOT_JSON]} <= set(out.question_id) and len(out) == 8
    assert len(sql.query("select * from longcot_paths")) == 14


def test_a_teacher_that_is_down_fails_every_question_with_the_reason_and_a_rerun_completes_them(
    home, tmp_path
):
    from keyeflow.flows.longcot import longcot

    source = write_questions(tmp_path / "questions", [HALF, ROAD, ANGLES])
    port = teacher_server.free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(
        RuntimeError,
        match=r"none of the 3 questions got paths \(3 failed; first, .*questions.jsonl#L1: "
        r"question \w+: generation failed: .*after 2 attempt\(s\); last error: "
        r"ConnectError.*tried again on the next run",
    ):
        longcot(
            [str(source)],
            str(source.parent),
            review="auto_approve",
            generation=generation(url, max_retries=1),
        )
    failed = sql.query("select content_hash, reason from quarantine where stage = 'longcot_generate'")
    assert set(failed.content_hash) == set(question_ids().values())
    assert all("after 2 attempt(s); last error: ConnectError" in r for r in failed.reason)

    with teacher_server.start_server(teacher(), tmp_path / "up", port=port) as (_, log):
        result = longcot(
            [str(source)],
            str(source.parent),
            review="auto_approve",
            generation=generation(url, max_retries=1),
        )
        attempts = {t: teacher_server.requests_for(log, t) for t in (HALF, ROAD, ANGLES)}
    assert attempts == {HALF: 1, ROAD: 1, ANGLES: 1}
    assert (result["generate"]["num_generated"], result["generate"]["num_failed"]) == (3, 0)
    assert sql.query("select count(*) as n from quarantine").n[0] == 0
    assert len(sql.query("select * from longcot")) == 5
