"""The shipped alignment prompts: deterministic, each mode present, every constraint checkable by the
rules; the general RL items from LongCoT questions carry hints L1-L5 from their reference solutions."""

from __future__ import annotations

import json

import pytest

from keyeflow.datasets import tables
from keyeflow.longcot.collect import CollectConfig, collect_questions
from keyeflow.longcot.rl_items import alignment_prompts, longcot_rl_items, reward_item, solution_hints
from keyeflow.quality.rewards import rule_reward
from keyeflow.synthetic.longcot_questions import generate_longcot_questions
from keyeflow.synthetic.verifiable_tasks import write_task_questions
from keyeflow.training.hints import item_hints


def test_alignment_prompts_are_deterministic_and_checkable():
    items = alignment_prompts(16)
    assert items == alignment_prompts(16) and len({i["id"] for i in items}) == 16
    assert {i["mode"] for i in items} == {"think", "no_think", "auto_think"}
    assert json.loads(json.dumps(items)) == items  # plain data: goes through Prefect and JSON unchanged
    for item in items:
        reward = rule_reward(reward_item(item), "Something unrelated.")
        assert reward is not None and 0.0 <= reward.value <= 1.0
    with pytest.raises(ValueError, match="num_items"):
        alignment_prompts(0)


def test_a_response_that_meets_the_constraints_scores_full_marks():
    item = next(i for i in alignment_prompts(16) if i["constraints"][0][0] == "json")
    good = '{"summary": "Rivers run to the sea.", "facts": ["they carry water"]}'
    assert rule_reward(reward_item(item), good).value == 1.0
    assert rule_reward(reward_item(item), "not json").value < 0.5
    words = next(i for i in alignment_prompts(16) if i["constraints"][0][0] == "max_words")
    assert rule_reward(reward_item(words), "Trains run on rails.").value == 1.0
    assert rule_reward(reward_item(words), " ".join(["word"] * 60)).value < 1.0


def test_every_rl_item_has_hints_l1_to_l5_derived_from_its_reference_solution(home, media_dir, sample_images):
    """Sample questions (text and pictures), task family questions and merged questions: every RL item
    carries L1-L5 from the solution stored with its question; each level shows more, and only L5 gives the
    answer. A row with a malformed solution is quarantined at collection."""
    base = media_dir / f"rl-items-{home.parent.name}"
    questions = generate_longcot_questions(base / "longcot", media_dir / "images")
    tasks = write_task_questions(base / "tasks", base / "task-media", num_per_family=6)
    bad = base / "bad" / "bad.jsonl"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text(
        json.dumps({"domain": "math", "messages": [{"role": "user", "content": "2 + 2?"}], "reference": "4",
                    "solution": {"steps": []}}) + "\n"
    )  # fmt: skip
    report = collect_questions(
        [str(questions["dir"]), str(tasks["train"].parent), str(bad)],
        str(media_dir),
        CollectConfig(merge=True),
    )
    assert report.num_merged > 0 and report.quarantined[f"{bad}#L1"] == "line 1: 'solution.steps' is empty"
    solutions = {
        r["question_id"]: json.loads(r["solution"])
        for r in tables.open_table("longcot_questions").to_table().to_pylist()
    }
    items = longcot_rl_items(tables.ref("longcot_questions"))
    heldout = len(tasks["heldout"].read_text().splitlines())
    assert len(items) == report.num_new and heldout > 0  # held-out task items were never collected
    assert {i["domain"] for i in items} >= {"counting", "stem", "math", "ocr", "grounding"}
    for item in items:
        hints, solution = item["hints"], solutions[item["id"]]
        assert sorted(hints) == ["L1", "L2", "L3", "L4", "L5"] and sorted(item_hints(item)) == [1, 2, 3, 4, 5]
        assert [hints["L1"], hints["L2"], hints["L3"]] == [solution[k] for k in ("concept", "method", "tool")]
        assert solution["steps"][0] in hints["L4"] and all(step in hints["L5"] for step in solution["steps"])
        assert hints["L5"].endswith(f"The answer is {item['reference']}.")
        assert all("The answer is" not in hints[f"L{k}"] for k in range(1, 5))
        assert len(hints["L5"]) > max(len(hints[f"L{k}"]) for k in range(1, 5))
        assert json.loads(json.dumps(item)) == item
    assert solution_hints({"steps": ["a"]}, "x") == {}  # no concept, method or tool: no hints
