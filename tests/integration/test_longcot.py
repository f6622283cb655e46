"""LongCoT cold-start steps on real tables, without Prefect: collection (dedupe, domains, media, bad lines,
rewrites, merges), multi-path generation through an OpenAI-compatible HTTP server, the synthetic teacher
(``keyeflow.synthetic.synthetic_teacher``, a real process on 127.0.0.1, with fixed error kinds per
question) and through our tiny model in process, answers written differently from the reference (½ / 1/2 /
0.5, 1000 m / 1 km, \\frac{1}{2} / 50%) ending up as A, the rule and model judges, review decisions and the
gates' frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyeflow.datasets import sql, tables
from keyeflow.datasets.video import content_hash
from keyeflow.longcot.assess import assess_paths
from keyeflow.longcot.collect import DOMAINS, CollectConfig, CollectReport, collect_questions
from keyeflow.longcot.gates import GateConfig, check_longcot_paths, check_longcot_samples
from keyeflow.longcot.generate import (
    GenerationConfig,
    check_answer,
    default_model_path,
    ensure_tiny_model,
    generate_paths,
    make_generator,
    media_configs,
)
from keyeflow.longcot.review import Decision, apply_reviews, record_decision, review_plan, review_queue
from keyeflow.longcot.score import score_samples
from keyeflow.model.generation import LocalGenerator, OpenAICompatibleGenerator
from keyeflow.quality.errors import ErrorShareExceeded
from keyeflow.quality.judges import (
    JudgeFailure,
    JudgeInput,
    ModelJudge,
    RuleJudge,
    arithmetic_errors,
    parse_assessment,
    parse_score,
)
from keyeflow.quality.longcot_scoring import path_confidence
from keyeflow.synthetic import synthetic_teacher as teacher_server
from keyeflow.synthetic.longcot_questions import SOLUTIONS, generate_longcot_questions

JUDGE = "You grade the reasoning of a response to a question, step by step.\n\nQuestion: "
REWRITE = "Reply with the new question only.\n\nQuestion: "


def teacher_settings() -> dict:
    """The synthetic teacher with fixed kinds on the sample questions (``SAMPLE_PLANS``), plus fixed replies
    standing in for a judge model and a rewriter on a few prompts (checked first)."""
    extra = [
        {
            "match": JUDGE + "What is 1 divided by 2?",
            "completions": [
                {
                    "text": (
                        "Here is my verdict:\n```json\n"
                        '{"steps": [{"step": 1, "logic": 1, "factual": "1.0", "relevance": 0.9}, '
                        '{"step": 2, "logical_consistency": 1, "factual_accuracy": 1, "relevance": 0.4}], '
                        '"redundancy": 0.1}\n```'
                    )
                }
            ],
        },
        {"match": JUDGE + "A road is 1000 m long.", "completions": [{"text": "Looks fine to me."}]},
        {
            "match": "Rate how much answering this question needs its image",
            "completions": [{"text": '{"score": 4}'}],
        },
        {
            "match": REWRITE + "A road is 1000 m long.",
            "completions": [
                {
                    "text": (
                        "A straight road runs for 1000 m from one end to the other. "
                        "How long is the road when it is measured in kilometres?"
                    )
                }
            ],
        },
        {
            "match": REWRITE + "What is 1 divided by 2?",
            "completions": [{"text": "What is 1 divided by 2, which equals 0.5? Explain why."}],
        },
    ]
    return teacher_server.teacher_config(plans=teacher_server.SAMPLE_PLANS, entries=extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    with teacher_server.start_server(teacher_settings(), tmp_path_factory.mktemp("teacher")) as (url, log):
        yield url, log


@pytest.fixture()
def questions(tmp_path, sample_images, media_dir) -> dict:
    files = generate_longcot_questions(media_dir / f"longcot-{tmp_path.name}", media_dir / "images")
    return {**files, "root": str(media_dir)}


def server(url: str) -> OpenAICompatibleGenerator:
    return OpenAICompatibleGenerator(url, teacher_server.MODEL, max_retries=0)


def teacher_config(url: str, n: int = 4) -> GenerationConfig:
    return GenerationConfig(backend="openai", base_url=url, model=teacher_server.MODEL, n=n)


def _ids(report: CollectReport, *texts: str) -> list[str]:
    rows = {
        r["question"]: r["question_id"] for r in tables.open_table("longcot_questions").to_table().to_pylist()
    }
    return [rows[t] for t in texts]


# ========================================================================================== collection


def test_collect_dedupes_checks_domains_and_media_and_quarantines_bad_lines(home, questions, tmp_path):
    bad = Path(questions["dir"]) / "bad.jsonl"
    image = "../images/shapes_800x600.png"
    lines = [
        json.dumps(
            {"domain": "chemistry", "messages": [{"role": "user", "content": "Why?"}], "reference": "x"}
        ),
        json.dumps(
            {
                "domain": "ocr",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "../images/nope.png"},
                            {"type": "text", "text": "Read it."},
                        ],
                    }
                ],
                "reference": "a",
            }
        ),
        json.dumps(
            {
                "domain": "ocr",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "/etc/hostname"},
                            {"type": "text", "text": "Read it."},
                        ],
                    }
                ],
                "reference": "a",
            }
        ),
        json.dumps({"domain": "math", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}),
        '{"domain": "math", "messages": [',
        json.dumps(
            {
                "domain": "counting",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": image},
                            {"type": "text", "text": "What is 1 divided by 2? /think"},
                        ],
                    }
                ],
                "reference": "0.5",
            }
        ),
    ]
    bad.write_text("\n".join(lines) + "\n")
    report = collect_questions([questions["dir"]], questions["root"])

    assert report.num_duplicates == 1 and report.num_new == len(report.question_ids)
    reasons = dict(sql.query("select uri, reason from quarantine where stage = 'longcot_collect'").values)
    assert (
        reasons[f"{bad}#L1"]
        == "line 1: domain must be one of ['math', 'stem', 'ocr', 'grounding', 'counting', "
        "'gui', 'business'], got 'chemistry'"
    )
    assert "does not exist" in reasons[f"{bad}#L2"] and "outside the source root" in reasons[f"{bad}#L3"]
    assert "no reference" in reasons[f"{bad}#L4"] and "invalid JSON" in reasons[f"{bad}#L5"]
    dup = next(r for u, r in reasons.items() if u.endswith("visual_questions.jsonl#L15"))
    assert dup.startswith("duplicate of question") and "text_questions.jsonl#L1" in dup
    # The same text on an image is another question (media hashes are part of the key).
    rows = tables.open_table("longcot_questions").to_table().to_pylist()
    on_image = [r for r in rows if r["question"] == "What is 1 divided by 2?" and r["num_media"] == 1]
    assert len(on_image) == 1 and on_image[0]["domain"] == "counting"
    media = json.loads(on_image[0]["media"])[0]
    assert media["hash"] == content_hash(media["path"])[0] and Path(media["path"]).is_absolute()
    by_question = {r["question"]: r for r in rows}
    assert (
        by_question["What is the title of the document?"]["reference"] == "Keye-VL sample report"
    )  # <answer> turn
    assert by_question["Which sidebar item comes right after 'Gates'?"]["domain"] == "gui"
    assert {r["domain"] for r in rows} == set(DOMAINS)

    version = tables.ref("longcot_questions").version
    again = collect_questions([questions["dir"]], questions["root"])
    assert again.num_new == 0 and again.num_already_present == len(report.question_ids)
    assert again.question_ids == report.question_ids and tables.ref("longcot_questions").version == version


def test_rewrites_kept_only_when_sane_and_merges_keep_the_reference(home, questions, teacher, tmp_path):
    url, _ = teacher
    source = tmp_path / "few.jsonl"
    text = Path(questions["text"]).read_text().splitlines()
    source.write_text(
        "\n".join(
            line for line in text if "1000 m" in line or "divided by 2" in line or "Solve for x" in line
        )
        + "\n"
    )
    report = collect_questions(
        [str(source)], str(tmp_path), CollectConfig(rewrite=True), server(url), teacher_config(url)
    )
    rows = {r["original_question"]: r for r in tables.open_table("longcot_questions").to_table().to_pylist()}
    road = rows["A road is 1000 m long. How long is it in kilometres?"]
    assert road["rewrite"] == "harder" and road["rewrite_note"] == "rewrite accepted"
    assert road["question"].startswith("A straight road runs for 1000 m")
    half = rows["What is 1 divided by 2?"]
    assert half["rewrite"] == "none" and half["rewrite_note"] == "rewrite discarded: gives the answer away"
    assert half["question"] == half["original_question"]
    assert rows["Solve for x: 3x + 5 = 20."]["rewrite_note"].startswith("rewrite discarded: ")
    assert report.num_rewritten == 1 and report.num_rewrites_discarded == 2

    # The tiny random model writes junk: every rewrite is discarded, with the reason.
    home_two = tmp_path / "home2"
    local = LocalGenerator(ensure_tiny_model(home_two / "tiny"))
    collect_questions(
        [questions["dir"]],
        questions["root"],
        CollectConfig(rewrite=True, merge=True),
        local,
        GenerationConfig(max_new_tokens=48),
        root=str(home_two / "tables"),
    )
    rows = tables.open_table("longcot_questions", root=str(home_two / "tables")).to_table().to_pylist()
    plain = [r for r in rows if r["rewrite"] != "merged"]
    assert plain and all(r["rewrite_note"].startswith("rewrite discarded: ") for r in plain)
    assert all(r["question"] == r["original_question"] for r in plain)
    merged = {r["reference"]: r for r in rows if r["rewrite"] == "merged"}
    assert "(Lineage, 4)" in merged and "(50%, 50%)" in merged
    assert "(1) Which sidebar item comes right after 'Gates'?" in merged["(Lineage, 4)"]["question"]
    assert check_answer("gui", "<think>x</think><answer>(Lineage, four)</answer>", "(Lineage, 4)").ok


# ===================================================================================== generation


def test_equivalent_answers_written_differently_end_up_as_A(home, questions, teacher):
    url, log = teacher
    report = collect_questions([questions["dir"]], questions["root"])
    ids = _ids(
        report,
        "What is 1 divided by 2?",
        "A road is 1000 m long. How long is it in kilometres?",
        "A pizza is cut into 8 equal slices and 4 of them are eaten. What fraction of the pizza is eaten?",
        "Simplify (x + 1)^2 - (x - 1)^2.",
    )
    config = teacher_config(url)
    generated = generate_paths(tables.ref("longcot_questions"), ids, server(url), config)
    assert generated.num_paths == 16 and generated.num_failed == 0
    assessed = assess_paths(tables.ref("longcot_paths"), tables.ref("longcot_questions"), ids, RuleJudge())
    assert assessed.grades == {"A": 10}

    rows = sql.query(
        "select answer, answer_ok, answer_method, grade, status, stage, reason, confidence, "
        "step_confidences, question_id, path_index from longcot_paths"
    )
    graded_a = rows[rows.grade == "A"]
    # Correct paths cycle through the answer forms (and three wordings): every form ends up A.
    forms = ["½", "1/2", "0.5", "1000 m", "1 km", "1 km", "\\frac{1}{2}", "\\frac{1}{2}", "50%", "50%"]
    assert sorted(graded_a.answer) == sorted(forms)
    assert set(graded_a.status) == {"kept"} and all(graded_a.reason == "A: answer right, process sound")
    wrong = rows[rows.grade == "C"]
    assert sorted(wrong.answer) == ["2", "2x", "2x", "2x", "2x"] and set(wrong.stage) == {"generate"}
    assert all(r.startswith("C: answer wrong (") for r in wrong.reason)
    dupes = rows[rows.grade.isna()]  # path 4 is worded like path 1 (three styles): a near-duplicate
    assert len(dupes) == 1 and all(r.startswith("near-duplicate of a kept path") for r in dupes.reason)
    # Confidence: the minimum over steps of exp(mean token logprob) of what the teacher sent for that path.
    half = rows[(rows.answer == "½")].iloc[0]
    plan = teacher_server.SAMPLE_PLANS["What is 1 divided by 2?"]
    question = {"question": "What is 1 divided by 2?", "solution": SOLUTIONS["What is 1 divided by 2?"]}
    sent = teacher_server.solve(question, 4, 0, {}, plan)
    offsets = [
        (len("".join(sent[0]["tokens"][:k])), len("".join(sent[0]["tokens"][: k + 1])))
        for k in range(len(sent[0]["tokens"]))
    ]
    expected = path_confidence(sent[0]["text"], sent[0]["logprobs"], offsets)
    assert (
        half.confidence == pytest.approx(expected.response, abs=1e-6) and len(half.step_confidences) == 3
    )  # + the answer
    # The path the teacher got wrong (it wrote "2" instead of its top choice) is the least confident of four.
    halves = rows[rows.question_id == ids[0]]
    assert halves.sort_values("confidence").answer.iloc[0] == "2"
    assert all(0.0 <= c <= 1.0 for c in rows.confidence)
    # A rerun with the same settings generates nothing and asks the server nothing.
    before = len(log.read_text().splitlines())
    again = generate_paths(tables.ref("longcot_questions"), ids, server(url), config)
    assert (
        again.num_already_done == 4 and again.num_paths == 0 and len(log.read_text().splitlines()) == before
    )


def test_media_sent_to_a_server_and_grounding_by_iou(home, questions, teacher):
    url, log = teacher
    report = collect_questions([questions["dir"]], questions["root"])
    ids = _ids(
        report,
        "What share of the tokens does the image bar show?",
        "Give the bounding box of the red rectangle as [[x1, y1, x2, y2]] in [0, 1000) coordinates.",
    )
    generate_paths(tables.ref("longcot_questions"), ids, server(url), teacher_config(url, n=1))
    rows = sql.query(
        "select domain, answer, answer_ok, answer_method, answer_reason from longcot_paths order by domain"
    )
    assert rows.answer_method.tolist() == ["text", "iou"] and all(rows.answer_ok)
    assert rows.answer_reason.iloc[1].startswith("IoU 0.9")
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    parts = [
        p for body in sent for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]
    ]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert any(u.startswith("data:image/webp;base64,") for u in images)
    assert any(u.startswith("data:image/png;base64,") for u in images)
    assert not check_answer(
        "grounding", "<answer>[[500, 500, 900, 900]]</answer>", "[[75, 100, 375, 433]]"
    ).ok


def test_local_model_media_prompts_and_failures(home, questions, sample_images):
    from keyeflow.datasets.images import ingest_images_shard

    report = collect_questions([questions["dir"]], questions["root"])
    ids = _ids(
        report,
        "How many filled shapes are in the image, not counting the black line?",
        "What word is written on the logo?",
        "Is the Sun a star? Answer yes or no.",
    )
    # the logo question fails on purpose (1 of 3): these asserts look at it, not at the step's threshold
    config = GenerationConfig(n=2, max_new_tokens=24, max_image_tokens=64, max_error_share=0.5)
    image_config, _ = media_configs(config)
    shapes = next(p for p in sample_images if p.name.startswith("shapes"))
    ingest_images_shard([str(shapes)], image_config)  # the logo is not ingested
    generated = generate_paths(tables.ref("longcot_questions"), ids, make_generator(config), config)
    assert generated.num_generated == 2 and generated.num_failed == 1
    reason = sql.query("select reason from quarantine where stage = 'longcot_generate'").reason.tolist()
    assert len(reason) == 1 and "logo_rgba_512x512.png has no pre-tokenised sample" in reason[0]
    assert (default_model_path() / "config.json").is_file()
    rows = sql.query("select grade, status, num_tokens, confidence from longcot_paths")
    assert len(rows) == 4 and set(rows.grade) == {"C"} and set(rows.status) == {"dropped"}
    assert all(0.0 <= c <= 1.0 for c in rows.confidence) and all(rows.num_tokens > 0)


# =========================================================================================== judges


def test_rule_judge_heuristics():
    judge = RuleJudge()
    q = "A road is 1000 m long. How long is it in kilometres?"
    sound = judge.assess_one(
        JudgeInput(
            q, "1 km", ("A kilometre is 1000 m.", "So 1000 / 1000 = 1 and the road is 1 km."), "1000 m"
        )
    )
    assert sound.process_scores() == {"logical_consistency": 1.0, "factual_accuracy": 1.0, "relevance": 1.0}
    assert sound.redundancy == 0.0 and sound.judge == "rule"

    flawed = judge.assess_one(
        JudgeInput(
            "What is 5 times 3?",
            "15",
            (
                "5 × 3 = 12.",
                "The weather in Paris is lovely today.",
                "Let me think.",
                "Therefore the product is 16.",
            ),
            "15",
        )
    )
    notes = flawed.all_notes()
    assert "step 1: 5 × 3 = 12 is false: 15" in notes
    assert "step 2: shares no word or number with the question, the answer or earlier results" in notes
    assert "step 4: concludes '16' but the final answer is '15'" in notes
    assert [s.relevance for s in flawed.steps] == [1.0, 0.0, 1.0, 0.0]  # "Let me think." is neutral
    stated = judge.assess_one(
        JudgeInput(
            "Which item follows Gates?",
            "Lineage",
            ("The answer is Settings.", "The answer is in the sidebar."),
            "Lineage",
        )
    )
    assert [s.logical_consistency for s in stated.steps] == [0.0, 1.0]
    repeated = judge.assess_one(
        JudgeInput(
            "What is 15% of 240?",
            "36",
            (
                "Step 1: 15% of 240 means 0.15 times 240.",
                "Step 2: 15% of 240 means 0.15 times 240.",
                "Step 3: 0.15 × 240 = 36.",
            ),
            "36",
        )
    )
    assert repeated.redundancy == pytest.approx(1 / 3, abs=1e-5) and [
        s.redundant for s in repeated.steps
    ] == [False, True, False]
    assert judge.assess_one(JudgeInput("q", "1", (), "1")).process_scores()["relevance"] == 0.0
    assert arithmetic_errors("1/2 = 0.5, 10 / 3 = 3.33, 2 x 3 = 6, 1,000 + 1 = 1,001") == []

    visual = (
        "The chart in the image has three bars.",
        "The image bar is the tallest, labelled 50%.",
        "The axis on the left shows 50 at its top.",
    )
    scores = [
        judge.score_one(JudgeInput("What share does the image bar show?", "50%", steps, "50%", media)).score
        for steps, media in [
            (visual, ()),
            (visual[:0], ("image",)),
            (visual[:1], ("image",)),
            (visual[:2], ("image",)),
            (visual, ("image",)),
        ]
    ]
    assert scores == [1, 2, 3, 4, 5]
    leak = judge.score_one(JudgeInput("Is the bar at 50%?", "50%", visual, "50%", ("image",)))
    assert leak.score == 1 and "written in the question" in leak.reason


def test_model_judge_parses_replies_and_falls_back(home, teacher, tmp_path):
    url, _ = teacher
    parsed = parse_assessment(
        'Sure!\n```json\n{"steps": [{"logic": "0.9", "factual": 1, "relevance": 1}], '
        '"redundancy": 0.2}\n```\nHope this helps.',
        1,
    )
    assert parsed.process_scores()["logical_consistency"] == 0.9 and parsed.redundancy == 0.2
    for reply, why in [
        ('{"steps": [], "redundancy": 0}', "0 step verdicts for 1 steps"),
        ('{"steps": [{"logic": 2, "factual": 1, "relevance": 1}], "redundancy": 0}', "outside [0, 1]"),
        ('{"steps": [{"logic": 1, "factual": 1, "relevance": 1}]}', "no redundancy"),
        ("no json here", "no JSON object"),
    ]:
        with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
            parse_assessment(reply, 1)
    assert parse_score('score: {"score": "5"}') == 5
    with pytest.raises(ValueError, match="not an integer from 1 to 5"):
        parse_score('{"score": 7}')

    steps = (
        "Step 1: Dividing 1 by 2 splits one whole into 2 equal parts.",
        "Step 2: Each of the 2 parts is one half of 1, and 1 / 2 = 0.5.",
    )
    items = [
        JudgeInput("What is 1 divided by 2?", "0.5", steps, "½"),
        JudgeInput(
            "A road is 1000 m long. How long is it in kilometres?", "1 km", ("1000 m is 1 km.",), "1 km"
        ),
    ]
    verdicts = ModelJudge(server(url)).assess(items)
    assert verdicts[0].judge == "model" and verdicts[0].process_scores()["relevance"] == 0.4
    # An unusable reply is a failure with its reason, never a stand-in verdict.
    assert (
        isinstance(verdicts[1], JudgeFailure)
        and "model judge reply unusable (no JSON object with 'steps'" in verdicts[1].reason
    )
    scored = ModelJudge(server(url)).score(
        [
            JudgeInput(
                "What share of the tokens does the image bar show?",
                "50%",
                ("The bar reads 50%.",),
                "50%",
                ("image",),
            ),
            JudgeInput("What is 1 divided by 2?", "0.5", steps, "½"),
        ]
    )
    assert [(s.score, s.judge) for s in scored] == [(4, "model"), (1, "rule")]

    # Our tiny random model as the judge: nothing usable comes back, every item fails with its reason.
    tiny = LocalGenerator(ensure_tiny_model(tmp_path / "tiny"))
    fallen = ModelJudge(tiny, max_new_tokens=24).assess(items)
    assert all(isinstance(v, JudgeFailure) for v in fallen) and len(fallen) == 2
    assert all(v.reason.startswith("model judge reply unusable") for v in fallen)
    down = ModelJudge(OpenAICompatibleGenerator("http://127.0.0.1:9/v1", "x", max_retries=0)).assess(
        items[:1]
    )
    assert isinstance(down[0], JudgeFailure) and "model judge request failed" in down[0].reason


# =========================================================================================== review


def test_a_judge_that_fails_quarantines_its_paths_and_stops_past_the_threshold(
    home, questions, teacher, tmp_path
):
    url, _ = teacher
    report = collect_questions([questions["dir"]], questions["root"])
    ids = _ids(report, "Solve for x: 3x + 5 = 20.", "What is 1 divided by 2?")
    qref = tables.ref("longcot_questions")
    generate_paths(qref, ids, server(url), teacher_config(url))
    selected = sorted(sql.query("select path_id from longcot_paths where status = 'selected'").path_id)
    # Our tiny random model as the judge answers nonsense: no path is graded, none gets a stand-in verdict.
    broken = ModelJudge(LocalGenerator(ensure_tiny_model(tmp_path / "tiny")), max_new_tokens=8)
    with pytest.raises(
        ErrorShareExceeded,
        match=rf"^LongCoT process assessment: {len(selected)} of {len(selected)} items failed \(100.0% > "
        rf"max_error_share 5.0%\); first: {selected[0]}: path {selected[0]}: process assessment failed: "
        "model judge reply unusable",
    ):
        assess_paths(tables.ref("longcot_paths"), qref, ids, broken)
    failed = sql.query("select content_hash, reason from quarantine where stage = 'longcot_assess'")
    assert sorted(failed.content_hash) == selected
    rows = sql.query("select status, grade, judge from longcot_paths where status = 'selected'")
    assert len(rows) == len(selected) and set(rows.grade) == {None} and set(rows.judge) == {None}
    # Below the threshold the step goes on and reports the failures; a later good judge clears them.
    kept_going = assess_paths(tables.ref("longcot_paths"), qref, ids, broken, max_error_share=1.0)
    assert (kept_going.num_assessed, kept_going.num_failed) == (0, len(selected))
    assessed = assess_paths(tables.ref("longcot_paths"), qref, ids, RuleJudge())
    assert assessed.num_assessed == len(selected) and assessed.num_failed == 0
    assert len(sql.query("select * from quarantine where stage = 'longcot_assess'")) == 0


def test_review_decisions_are_stored_and_applied(home, questions, teacher):
    url, _ = teacher
    report = collect_questions([questions["dir"]], questions["root"])
    ids = _ids(
        report,
        "Solve for x: 3x + 5 = 20.",
        "What is 15% of 240?",
        "What is the sum of the interior angles of a triangle, in degrees?",
        "What is 1 divided by 2?",
    )
    qref = tables.ref("longcot_questions")
    generate_paths(qref, ids, server(url), teacher_config(url))
    assessed = assess_paths(tables.ref("longcot_paths"), qref, ids, RuleJudge())
    assert assessed.grades == {"A": 5, "B": 2} and assessed.num_needs_review == 3
    queue = review_queue(tables.ref("longcot_paths"), ids)
    rows = {r["path_id"]: r for r in tables.open_table("longcot_paths").to_table().to_pylist()}
    by_kind = {("borderline" if rows[p]["grade"] == "A" else rows[p]["answer"]): p for p in queue}
    assert set(by_kind) == {"borderline", "5", "180"}
    assert rows[by_kind["5"]]["grade_reasons"] == "process flawed; relevance 0 < 0.7"
    assert rows[by_kind["180"]]["grade_reasons"] == "process flawed; factual_accuracy 0 < 0.7"

    now = tables.now()
    decisions = [
        Decision(
            by_kind["5"],
            "edit",
            "alice",
            "Step 1: 3x = 20 - 5 = 15.\n\nStep 2: x = 15 / 3 = 5.",
            "removed the digression",
            decided_at=now,
        ),
        Decision(
            by_kind["180"],
            "edit",
            "bob",
            "<think>60 + 60 + 60 = 180</think><answer>190</answer>",
            decided_at=now,
        ),
        Decision(by_kind["borderline"], "reject", "carol", note="too repetitive", decided_at=now),
    ]
    # Alice's decision is stored the moment she makes it; a crash before it is applied loses nothing.
    record_decision(tables.ref("longcot_paths"), decisions[0])
    plan = review_plan(tables.ref("longcot_paths"), ids)
    assert plan.pending == [decisions[0]] and sorted(plan.ask) == sorted(
        [by_kind["180"], by_kind["borderline"]]
    )
    assert sql.query("select outcome from longcot_reviews").outcome.tolist() == ["pending"]
    result = apply_reviews(tables.ref("longcot_paths"), qref, decisions)
    assert result.actions == {"edit": 2, "reject": 1} and result.num_kept == 1 and result.num_dropped == 2
    after = {r["path_id"]: r for r in tables.open_table("longcot_paths").to_table().to_pylist()}
    edited = after[by_kind["5"]]
    assert edited["status"] == "kept" and edited["review_action"] == "edit" and edited["reviewer"] == "alice"
    assert (
        edited["response"]
        == "<think>\nStep 1: 3x = 20 - 5 = 15.\n\nStep 2: x = 15 / 3 = 5.\n</think>\n<answer>5</answer>"
    )
    assert edited["reason"] == "B (process flawed; relevance 0 < 0.7) edited by alice: removed the digression"
    assert after[by_kind["180"]]["status"] == "dropped"
    assert "the answer no longer matches the reference" in after[by_kind["180"]]["reason"]
    assert after[by_kind["borderline"]]["reason"].endswith("rejected by carol: too repetitive")
    stored = sql.query(
        "select reviewer, action, source, outcome, edited_text, decided_at from longcot_reviews "
        "order by reviewer"
    )
    assert stored.reviewer.tolist() == ["alice", "bob", "carol"] and set(stored.source) == {"person"}
    assert stored.outcome.tolist() == ["kept", "dropped", "dropped"] and stored.edited_text[0].startswith(
        "Step 1"
    )
    assert len(stored) == 3 and stored.decided_at.tolist() == [now] * 3
    assert review_queue(tables.ref("longcot_paths"), ids) == []  # people decided: never asked again

    scored = score_samples(tables.ref("longcot_paths"), qref, ids, RuleJudge())
    assert scored.num_scored == 5 and scored.scores == {1: 5}  # text questions: answerable without media
    gate = check_longcot_samples(tables.ref("longcot_paths"), qref, ids, GateConfig())
    assert gate.passed, gate.failures
    strict = check_longcot_samples(
        tables.ref("longcot_paths"), qref, ids, GateConfig(grade_share_bounds={"B": (0.0, 0.1)})
    )
    assert not strict.passed and [f["check"] for f in strict.failures] == ["grade shares within bounds"]
    assert check_longcot_paths(tables.ref("longcot_paths"), ids).passed
