"""The synthetic teacher: its paths carry the documented error kinds in the seeded proportions, every wrong
path gives a wrong answer or a flawed step that LongCoT's graders catch, its log-probs are lowest where it
changed the reference solution, and the real HTTP server (127.0.0.1) serves exactly those paths, finds
task questions by their media, logs what it served and keeps its bearer token."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import httpx
import pytest

from keyeflow.longcot.generate import check_answer
from keyeflow.quality.graders import extract_answer
from keyeflow.quality.judges import JudgeInput, RuleJudge
from keyeflow.quality.longcot_scoring import path_confidence, split_steps
from keyeflow.synthetic import synthetic_teacher as teacher
from keyeflow.synthetic.longcot_questions import SOLUTIONS, TEXT_QUESTIONS, VISUAL_QUESTIONS
from keyeflow.synthetic.verifiable_tasks import task_items, write_task_questions

DOMAINS = {q: d for d, q, _ in TEXT_QUESTIONS} | {v[3]: v[2] for v in VISUAL_QUESTIONS}


def graded(question: str, domain: str, reference: str, text: str) -> tuple[bool, bool, float]:
    """(answer right, process flawed, redundancy) as LongCoT's answer check and rule judge see the path."""
    think = text.split("</think>")[0]
    steps = tuple(think[a:b] for a, b in split_steps(think))
    verdict = RuleJudge().assess_one(JudgeInput(question, reference, steps, extract_answer(text)))
    flawed = min(verdict.process_scores().values()) < 0.7
    return check_answer(domain, text, reference).ok, flawed, verdict.redundancy


def bare(step: str) -> str:
    return re.sub(r"^Step \d+: ", "", step)


def cases():
    for question, solution in SOLUTIONS.items():
        yield question, DOMAINS[question], solution
    for item in task_items(8, seed=1):
        yield item.question, item.domain, {"answer": item.answer, **item.solution}


def test_every_kind_is_what_the_graders_see():  # three paths each: every style
    seen = Counter()
    for question, domain, solution in cases():
        for kind in teacher.ERROR_KINDS:
            if kind == "wrong_arithmetic" and not teacher._kind_applies(kind, solution):
                continue
            for path in teacher.solve({"question": question, "solution": solution}, 3, 0, {}, [kind]):
                right, flawed, redundancy = graded(question, domain, solution["answer"], path["text"])
                assert path["kind"] == kind
                if kind == "wrong_step":
                    assert not right and path["answer"] in solution["wrong_answers"], (question, path["text"])
                else:
                    assert right, (kind, question, path["text"])
                    assert flawed == (kind in ("wrong_arithmetic", "irrelevant_step")), (kind, path["text"])
                    assert (redundancy > 0) == (kind == "repeated_step"), (kind, path["text"])
                seen[kind] += 1
    assert set(seen) == set(teacher.ERROR_KINDS)


def test_kinds_follow_the_seeded_proportions_and_repeat_exactly():
    counts = Counter()
    items = task_items(150, seed=2, families=("count_shapes",))  # every kind applies to a shape count
    for item in items:
        question = {
            "question": item.question,
            "media": [item.id],
            "solution": {"answer": item.answer, **item.solution},
        }
        paths = teacher.solve(question, 4, 0, teacher.DEFAULT_PROPORTIONS, None)
        assert paths == teacher.solve(question, 4, 0, teacher.DEFAULT_PROPORTIONS, None)
        counts.update(p["kind"] for p in paths)
    total = sum(counts.values())
    for kind, share in teacher.DEFAULT_PROPORTIONS.items():
        assert abs(counts[kind] / total - share) < 0.05, (kind, counts)
    # A kind that cannot apply is drawn again among the others: shot order has no arithmetic to get wrong.
    clip = task_items(1, families=("shot_order",))[0]
    solution = {"answer": clip.answer, **clip.solution}
    kinds = {
        p["kind"]
        for p in teacher.solve(
            {"question": "q", "solution": solution}, 60, 0, teacher.DEFAULT_PROPORTIONS, None
        )
    }
    assert kinds == set(teacher.ERROR_KINDS) - {"wrong_arithmetic"}


def test_log_probs_are_lowest_on_what_it_changed():
    solution = SOLUTIONS["Solve for x: 3x + 5 = 20."]
    question = {"question": "Solve for x: 3x + 5 = 20.", "solution": solution}
    reference = [bare(step) for step in solution["steps"]]
    confidences = {}
    for kind in teacher.ERROR_KINDS:
        [path] = teacher.solve(question, 1, 0, {}, [kind])
        assert "".join(path["tokens"]) == path["text"] and len(path["tokens"]) == len(path["logprobs"])
        offsets, at = [], 0
        for token in path["tokens"]:
            offsets.append((at, at + len(token)))
            at += len(token)
        conf = path_confidence(path["text"], path["logprobs"], offsets)
        confidences[kind] = conf.response
        steps = [path["text"][a:b] for a, b in conf.step_spans]
        if kind == "correct":
            assert all(lp > math.log(1 - teacher.TOP_CHOICE_MISS[1]) for lp in path["logprobs"])
            continue
        k = conf.step_confidences.index(min(conf.step_confidences))
        if kind == "repeated_step":  # the second copy is the one it wrote instead of moving on
            assert bare(steps[k]) in [bare(x) for x in steps[:k]], (kind, steps[k])
        elif kind == "wrong_step":  # the wrong answer it carried, or the step that reached it
            assert steps[k] == path["answer"] or bare(steps[k]) not in reference, (kind, steps[k])
        else:
            assert bare(steps[k]) not in reference, (kind, steps[k])
    assert confidences["correct"] == max(confidences.values())
    assert len(set(confidences.values())) == len(confidences)  # confidences vary with what was done


def test_the_server_serves_those_paths_finds_questions_by_media_and_logs_them(tmp_path):
    files = write_task_questions(tmp_path / "q", tmp_path / "media", num_per_family=3, seed=4)
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    config = teacher.teacher_config([files["train"]], plans={"What is 15% of 240?": ["wrong_arithmetic"]})
    with teacher.start_server(config, tmp_path / "srv", api_key="s3cret") as (url, log):
        headers = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/chat/completions", json={"messages": []}).status_code == 401

        def ask(content, n: int) -> list[dict]:
            body = {
                "model": teacher.MODEL,
                "n": n,
                "logprobs": True,
                "messages": [{"role": "user", "content": content}],
            }
            reply = httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=10)
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"]

        [choice] = ask("What is 15% of 240? /think", 1)
        [expected] = teacher.solve(
            {"question": "What is 15% of 240?", "media": [], "solution": SOLUTIONS["What is 15% of 240?"]},
            1, 0, teacher.DEFAULT_PROPORTIONS, ["wrong_arithmetic"],
        )  # fmt: skip
        assert choice["message"]["content"] == expected["text"]
        assert [t["logprob"] for t in choice["logprobs"]["content"]] == pytest.approx(expected["logprobs"])
        # A task question: the same text on other media is another question; its media are sent as a data URL.
        from keyeflow.longcot.generate import _server_part

        for row in rows:
            part = row["messages"][0]["content"][0]
            path = (files["train"].parent / part[part["type"]]).resolve()
            text = row["messages"][0]["content"][1]["text"]
            choices = ask(
                [
                    _server_part({"type": part["type"], part["type"]: str(path)}),
                    {"type": "text", "text": text},
                ],
                3,
            )
            for c in choices:
                answer = extract_answer(c["message"]["content"])
                assert answer in row["solution"]["answer_forms"] + row["solution"]["wrong_answers"]
        [unknown] = ask("What is the capital of Peru?", 1)
        assert extract_answer(unknown["message"]["content"]) == "unknown"
    served = [json.loads(line) for line in log.with_name("paths.jsonl").read_text().splitlines()]
    assert served[0] == {
        "question": "What is 15% of 240?",
        "path_index": 0,
        "kind": "wrong_arithmetic",
        "answer": "36",
    }
    assert len(served) == 1 + 3 * len(rows) and len(log.read_text().splitlines()) == 2 + len(
        rows
    )  # the 401 is not logged
