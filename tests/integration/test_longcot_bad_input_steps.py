"""Bad input to the LongCoT steps, without Prefect: questions without a reference answer, and a teacher
server that times out, answers malformed output, fails for a while or is down. Each fails only its own item,
with a reason naming the question and the problem (transient failures retried a bounded number of times,
counted on the server side), the rest completes, and a rerun against a working server asks it only for what
failed. The server is the synthetic teacher (``keyeflow.synthetic.synthetic_teacher``), a real process on
127.0.0.1; nothing is mocked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from keyeflow.datasets import sql, tables
from keyeflow.longcot.collect import collect_questions
from keyeflow.longcot.generate import GenerationConfig, generate_paths, make_generator
from keyeflow.model.generation import BatchGenerationError, GenerationServerError, OpenAICompatibleGenerator
from keyeflow.quality.judges import JudgeFailure, JudgeInput, ModelJudge
from keyeflow.synthetic import synthetic_teacher as teacher_server

HALF = "What is 1 divided by 2?"
ROAD = "A road is 1000 m long. How long is it in kilometres?"
ANGLES = "What is the sum of the interior angles of a triangle, in degrees?"
LETTERS = "How many letters are in the word 'reasoning'?"
SLOW = "Solve for x: 3x + 5 = 20."  # the server answers after the client's timeout
NOT_JSON = "What is 15% of 240?"  # status 200, an HTML body
NO_CHOICES = "How many hydrogen atoms are in one molecule of water?"  # JSON without choices
NO_LOGPROBS = "A train travels 120 km in 1.5 hours. What is its average speed?"  # choices without logprobs
FLAKY = "Is the Sun a star? Answer yes or no."  # 503 twice, then answered

REFERENCES = {
    HALF: "0.5",
    ROAD: "1 km",
    ANGLES: "180",
    LETTERS: "9",
    SLOW: "5",
    NOT_JSON: "36",
    NO_CHOICES: "2",
    NO_LOGPROBS: "80 km/h",
    FLAKY: "yes",
}
TIMEOUT_S, MAX_RETRIES = 1.0, 2  # a failing request is tried 3 times, 0.5 s and 1 s apart


def teacher() -> dict:
    """The synthetic teacher with fixed kinds on the sample questions (``SAMPLE_PLANS``)."""
    return teacher_server.teacher_config(plans=teacher_server.SAMPLE_PLANS)


def misbehaving(n: int = 2) -> dict:
    """The teacher, with some questions turned bad (entries placed first, so they are matched first)."""
    no_logprobs = {
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "<answer>80 km/h</answer>"},
                "finish_reason": "stop",
                "logprobs": None,
            }
            for i in range(n)
        ]
    }
    rec = teacher()
    rec["entries"] = [
        {"match": SLOW, "delay_s": 3 * TIMEOUT_S},
        {
            "match": NOT_JSON,
            "respond": {"status": 200, "body": "<html>502 Bad Gateway (upstream reset)</html>"},
        },
        {
            "match": NO_CHOICES,
            "respond": {"status": 200, "body": {"object": "chat.completion", "model": "x"}},
        },
        {"match": NO_LOGPROBS, "respond": {"status": 200, "body": no_logprobs}},
        {
            "match": FLAKY,
            "times": 2,
            "respond": {"status": 503, "body": {"error": {"message": "overloaded"}}},
        },
    ]
    return rec


def write_questions(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "questions.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"domain": "math", "messages": [{"role": "user", "content": t}], "reference": REFERENCES[t]}
            )
            + "\n"
            for t in texts
        )
    )
    return path


def config(url: str, n: int = 2) -> GenerationConfig:
    return GenerationConfig(
        backend="openai",
        base_url=url,
        model=teacher_server.MODEL,
        n=n,
        request_timeout_s=TIMEOUT_S,
        max_retries=MAX_RETRIES,
        max_error_share=1.0,  # these tests look at each failed question, not at the step's threshold
    )


def question_ids() -> dict[str, str]:
    return {
        r["question"]: r["question_id"] for r in tables.open_table("longcot_questions").to_table().to_pylist()
    }


def generate_failures() -> dict[str, str]:
    rows = sql.query("select content_hash, reason from quarantine where stage = 'longcot_generate'")
    return dict(zip(rows.content_hash, rows.reason))


def test_questions_without_a_reference_fail_at_collection_and_the_rest_is_collected(home, tmp_path):
    good = [
        {"domain": "math", "messages": [{"role": "user", "content": HALF}], "reference": "0.5"},
        {
            "domain": "stem",
            "messages": [
                {"role": "user", "content": ROAD},
                {"role": "assistant", "content": "<think>1000 m is 1 km.</think><answer>1 km</answer>"},
            ],
        },
    ]
    bad = [
        {"domain": "math", "messages": [{"role": "user", "content": "What is 7 times 6?"}]},
        {
            "domain": "math",
            "messages": [{"role": "user", "content": "What is 9 minus 4?"}],
            "reference": None,
        },
        {"domain": "math", "messages": [{"role": "user", "content": "What is 8 plus 1?"}], "reference": "  "},
        {
            "domain": "math",
            "messages": [
                {"role": "user", "content": "What is 2 cubed?"},
                {"role": "assistant", "content": "<think>2 × 2 × 2.</think><answer></answer>"},
            ],
        },
    ]
    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [good[0], *bad, good[1]]))
    report = collect_questions([str(source)], str(tmp_path))

    assert report.num_lines == 6 and report.num_new == 2 and report.num_quarantined == 4
    reasons = dict(sql.query("select uri, reason from quarantine where stage = 'longcot_collect'").values)
    assert reasons == {
        f"{source}#L2": "line 2: no reference: give a 'reference' field or an assistant turn",
        f"{source}#L3": "line 3: no reference: give a 'reference' field or an assistant turn",
        f"{source}#L4": "line 4: empty reference answer",
        f"{source}#L5": "line 5: empty reference answer",
    }
    collected = {
        r["question"]: r["reference"] for r in tables.open_table("longcot_questions").to_table().to_pylist()
    }
    assert collected == {HALF: "0.5", ROAD: "1 km"}
    assert set(report.question_ids) == {question_ids()[HALF], question_ids()[ROAD]}


def test_a_misbehaving_teacher_fails_only_its_items_and_a_rerun_asks_only_for_those(home, tmp_path):
    good, bad = [HALF, ROAD, ANGLES, LETTERS, FLAKY], [SLOW, NOT_JSON, NO_CHOICES, NO_LOGPROBS]
    source = write_questions(
        tmp_path / "questions", [HALF, SLOW, ROAD, NOT_JSON, ANGLES, NO_CHOICES, FLAKY, NO_LOGPROBS, LETTERS]
    )
    collect_questions([str(source)], str(source.parent))
    ids = question_ids()
    all_ids = [ids[t] for t in REFERENCES]
    port = teacher_server.free_port()
    with teacher_server.start_server(misbehaving(), tmp_path / "faulty", port=port) as (url, log):
        started = time.monotonic()
        report = generate_paths(
            tables.ref("longcot_questions"), all_ids, make_generator(config(url)), config(url)
        )
        elapsed = time.monotonic() - started
        attempts = {t: teacher_server.requests_for(log, t) for t in REFERENCES}

    assert (report.num_generated, report.num_failed, report.num_paths) == (5, 4, 10)
    # Timeouts and 503s are retried (3 attempts, counted by the server); malformed output is not; every
    # other question is asked once, even those in a batch where something failed.
    assert attempts == {
        HALF: 1,
        ROAD: 1,
        ANGLES: 1,
        LETTERS: 1,
        FLAKY: 3,
        SLOW: 3,
        NOT_JSON: 1,
        NO_CHOICES: 1,
        NO_LOGPROBS: 1,
    }
    assert elapsed < 15, f"bounded retries, the batch's requests in parallel; took {elapsed:.1f} s"
    failures = generate_failures()
    assert set(failures) == {ids[t] for t in bad}
    for text in bad:
        assert failures[ids[text]].startswith(
            f"question {ids[text]}: generation failed: GenerationServerError: "
        )
    assert "failed after 3 attempt(s); last error: ReadTimeout" in failures[ids[SLOW]]
    assert "status 200 but the body is not JSON: '<html>502 Bad Gateway" in failures[ids[NOT_JSON]]
    assert "malformed response: no 'choices' list" in failures[ids[NO_CHOICES]]
    assert "logprobs were requested but choice 0 has no logprobs.content" in failures[ids[NO_LOGPROBS]]
    paths = sql.query("select question_id, path_id, text, created_at from longcot_paths order by path_id")
    assert set(paths.question_id) == {ids[t] for t in good}
    first = paths.set_index("path_id")

    # The server is fixed and back at the same address: only the four failed questions are asked, once each.
    with teacher_server.start_server(teacher(), tmp_path / "fixed", port=port) as (url_again, log):
        assert url_again == url
        again = generate_paths(
            tables.ref("longcot_questions"), all_ids, make_generator(config(url)), config(url)
        )
        attempts = {t: teacher_server.requests_for(log, t) for t in REFERENCES}
    assert (again.num_already_done, again.num_generated, again.num_failed, again.num_paths) == (5, 4, 0, 8)
    assert attempts == {t: int(t in bad) for t in REFERENCES}
    assert generate_failures() == {}  # nothing is failing now; the table's earlier versions keep the rows
    after = sql.query("select question_id, path_id, text, created_at from longcot_paths").set_index("path_id")
    assert set(after.question_id) == set(all_ids) and len(after) == 18
    assert after.loc[first.index].equals(first)  # the paths done before are untouched
    # The same settings once more: everything is done, the server is not needed at all.
    nothing = generate_paths(
        tables.ref("longcot_questions"), all_ids, make_generator(config(url)), config(url)
    )
    assert (nothing.num_already_done, nothing.num_generated, nothing.num_failed) == (9, 0, 0)


def test_a_server_that_is_down_fails_every_item_after_bounded_retries(home, tmp_path):
    source = write_questions(tmp_path / "questions", [HALF, ROAD, LETTERS])
    collect_questions([str(source)], str(source.parent))
    ids = question_ids()
    url = f"http://127.0.0.1:{teacher_server.free_port()}/v1"  # nothing listens there

    started = time.monotonic()
    report = generate_paths(
        tables.ref("longcot_questions"), list(ids.values()), make_generator(config(url)), config(url)
    )
    elapsed = time.monotonic() - started
    assert (report.num_generated, report.num_failed, report.num_paths) == (0, 3, 0)
    assert 1.4 < elapsed < 10, f"two backoffs (0.5 s + 1 s), requests in parallel; took {elapsed:.1f} s"
    failures = generate_failures()
    assert set(failures) == set(ids.values())
    for qid, reason in failures.items():
        assert reason.startswith(
            f"question {qid}: generation failed: GenerationServerError: POST {url}/chat/completions "
            "failed after 3 attempt(s); last error: ConnectError"
        )
    # The same question failing again keeps one quarantine row, with the latest reason.
    generate_paths(tables.ref("longcot_questions"), [ids[HALF]], make_generator(config(url)), config(url))
    assert len(sql.query("select * from quarantine where stage = 'longcot_generate'")) == 3

    # The generator itself: a batch with some failures keeps the good results beside the errors.
    with teacher_server.start_server(misbehaving(n=1), tmp_path / "faulty") as (live, _):
        generator = OpenAICompatibleGenerator(live, teacher_server.MODEL, timeout=TIMEOUT_S, max_retries=0)
        batch = [[{"role": "user", "content": t}] for t in (HALF, NOT_JSON, ROAD)]
        with pytest.raises(
            BatchGenerationError, match="1 of 3 conversations failed; conversation 1"
        ) as error:
            generator.generate(batch, n=1, max_new_tokens=8, temperature=0, seed=0, logprobs=True)
        results = error.value.results
        assert results[2][0].text.endswith("<answer>1000 m</answer>") and list(error.value.failures) == [1]
        assert isinstance(results[1], GenerationServerError) and "not JSON" in str(results[1])
        with pytest.raises(GenerationServerError, match="not JSON"):  # a batch of one raises its own error
            generator.generate(batch[1:2], n=1, max_new_tokens=8, temperature=0, seed=0, logprobs=True)


def test_a_model_judge_fails_only_the_items_whose_request_failed(home, tmp_path):
    judge_prompt = "You grade the reasoning of a response to a question, step by step.\n\nQuestion: "
    verdict = (
        '{"steps": [{"logic": 1, "factual": 1, "relevance": 1}, {"logic": 1, "factual": 1, "relevance": 1}], '
        '"redundancy": 0}'
    )
    recordings = {
        "model": "judge",
        "entries": [
            {"match": judge_prompt + HALF, "completions": [{"text": verdict}]},
            {
                "match": judge_prompt + ROAD,
                "respond": {"status": 500, "body": {"error": {"message": "CUDA out of memory"}}},
            },
        ],
    }
    items = [
        JudgeInput(HALF, "0.5", ("1 / 2 = 0.5.", "So the answer is 0.5."), "0.5"),
        JudgeInput(ROAD, "1 km", ("1000 m is 1 km.", "So the road is 1 km."), "1 km"),
    ]
    with teacher_server.start_server(recordings, tmp_path / "judge") as (url, log):
        judge = ModelJudge(OpenAICompatibleGenerator(url, "judge", max_retries=1, backoff_s=0.05))
        verdicts = judge.assess(items)
        attempts = (teacher_server.requests_for(log, HALF), teacher_server.requests_for(log, ROAD))
    assert verdicts[0].judge == "model" and verdicts[0].process_scores()["relevance"] == 1.0
    assert isinstance(verdicts[1], JudgeFailure)
    assert verdicts[1].reason.startswith("model judge request failed (GenerationServerError: POST ")
    assert "failed after 2 attempt(s); last error: HTTP 500: CUDA out of memory" in verdicts[1].reason
    assert attempts == (1, 2)  # the good item is asked once; the failing one is retried once, then fails
