"""`keyeflow run`'s own parts, without its chain of minutes (tests/flows/test_keyeflow_run.py runs it end to
end, when asked): the synthetic LongCoT teacher it starts, a real process on 127.0.0.1 that answers the sample
and task questions from their reference solutions and is gone afterwards; the option check that fails
before anything runs; and the summary, which names every stage run whole and fits a 100-column terminal."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from keyeflow import cli
from keyeflow.synthetic.longcot_questions import SOLUTIONS, TEXT_QUESTIONS
from keyeflow.synthetic.synthetic_teacher import MODEL
from keyeflow.synthetic.verifiable_tasks import write_task_questions


def test_the_synthetic_teacher_answers_the_sample_and_task_questions_then_stops(tmp_path, capsys):
    question = TEXT_QUESTIONS[0][1]  # "What is 1 divided by 2?"
    tasks = write_task_questions(tmp_path / "tasks", tmp_path / "media", num_per_family=2)
    task = json.loads(tasks["train"].read_text().splitlines()[0])
    with cli._longcot_teacher(None, None, tmp_path / "teacher", [tasks["train"]]) as generation:
        assert generation["backend"] == "openai" and generation["model"] == MODEL
        url = generation["base_url"]

        def answers(content) -> list[str]:
            body = {"model": generation["model"], "n": 8, "messages": [{"role": "user", "content": content}]}
            reply = httpx.post(f"{url}/chat/completions", timeout=10, json=body)
            assert reply.status_code == 200
            return [c["message"]["content"].rsplit("<answer>", 1)[1] for c in reply.json()["choices"]]

        # Seeded paths from the reference solution: right answers in its forms, wrong ones from its list.
        solution = SOLUTIONS[question]
        got = answers(question)
        assert set(got) <= {f"{a}</answer>" for a in solution["answer_forms"] + solution["wrong_answers"]}
        assert got == answers(question) and len(set(got)) > 1
        part = task["messages"][0]["content"][0]
        image = (tasks["train"].parent / part[part["type"]]).resolve()
        data = base64.b64encode(image.read_bytes()).decode()
        text = task["messages"][0]["content"][1]["text"]
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            {"type": "text", "text": text},
        ]
        forms = task["solution"]["answer_forms"] + task["solution"]["wrong_answers"]
        assert set(answers(content)) <= {f"{a}</answer>" for a in forms}
    out = " ".join(capsys.readouterr().out.split())
    said = "LongCoT teacher: the synthetic teacher (no teacher model runs on a CPU)"
    assert said in out
    assert "LongCoT teacher stopped" in out
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url.removesuffix('/v1')}/health", timeout=2)


def test_a_given_teacher_is_used_as_it_is():
    with cli._longcot_teacher("http://vllm.internal:8000/v1", "keye-teacher", None) as generation:
        assert generation == {
            "backend": "openai",
            "base_url": "http://vllm.internal:8000/v1",
            "model": "keye-teacher",
        }


def test_teacher_url_without_a_model_stops_before_anything_runs(home):
    result = CliRunner().invoke(cli.app, ["run", "--teacher-url", "http://127.0.0.1:8000/v1"])
    assert result.exit_code == 2
    assert "--teacher-url and --teacher-model go together" in " ".join(result.output.split())
    assert not home.exists()


def _stage(home, name: str, key: str, run: str, trained: bool = True, step: str = "step-00000004/") -> dict:
    return {
        "name": name,
        "checkpoint": f"{home}/checkpoints/{name}-{key}/{step}model",
        "run_id": run * 32,
        "key": key,
        "trained": trained,
    }


def test_the_summary_names_every_run_and_fits_a_terminal(home, monkeypatch):
    key = "0123456789abcdef"
    pre_stages = {
        "init": _stage(home, "pretrain-0-init", key, "a", step=""),
        "video-rich": _stage(home, "pretrain-3-annealing-video-rich", key, "b"),
        "fusion": _stage(home, "pretrain-4-fusion", key, "c", step=""),
    }
    post_stages = {
        "start": {**pre_stages["fusion"], "trained": False},
        "gspo_round_2": _stage(home, "posttrain-5-gspo-round-2", key, "d", trained=False),
    }
    final = post_stages["gspo_round_2"]["checkpoint"]
    shares = {"video": 0.24, "image": 0.5, "text": 0.26}
    data = {"run_id": "e" * 32, "mixtures": {3: {"mixture_id": key, "shares": shares}}}
    pre = {"run_id": "f" * 32, "checkpoint": pre_stages["fusion"]["checkpoint"], "stages": pre_stages}
    cot = {
        "run_id": "1" * 32,
        "question_ids": ["q"] * 33,
        "review": {"actions": {"reject": 3}},
        "summary": {"num_paths": 132, "num_A": 11, "num_B": 2, "num_C": 101, "num_kept": 10},
    }
    post = {"run_id": "2" * 32, "checkpoint": final, "stages": post_stages}
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buffer, width=100))

    seconds = {"data-pipeline": 30, "pretrain": 120, "longcot": 2, "posttrain": 30}
    cli._run_summary(data, pre, cot, post, seconds, 182.0)
    out = buffer.getvalue()
    lines = out.splitlines()
    copyable = ("final checkpoint", "  keyeflow lineage", "  mlflow ui")  # soft-wrapped: they copy whole
    assert all(len(line) <= 100 for line in lines if not line.startswith(copyable)), out
    for run_id in ("a", "b", "c", "d", "e", "f", "1", "2"):
        assert run_id * 32 in out  # whole on one line: what `keyeflow lineage` and the MLflow UI take
    assert f"  keyeflow lineage {final}" in lines
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "trained" in rows["3-annealing-video-rich"] and "b" * 32 in rows["3-annealing-video-rich"]
    assert "skipped" in rows["5-gspo-round-2"] and "…-0123456789abcdef/step-0000" in rows["5-gspo-round-2"]
    assert "c" * 32 in rows["from"]  # post-training starts from the fusion step's run
    assert "stage 3 mixture 0123456789ab: video 24.0%, image 50.0%, text 26.0%" in out
    assert any(line.startswith(f"  mlflow ui --backend-store-uri sqlite:///{home}") for line in lines)
    assert "  prefect server start" in out
