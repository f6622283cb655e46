"""Post-training data on real tables: platform-made conversations become train_samples rows, fixed mixtures
carry the given repeats, the difficulty filter drops exactly the items every sampled answer solves (answers
come from the synthetic teacher's OpenAI-compatible server with fixed replies, a real process: our tiny
model answers nothing right), and LongCoT samples reach a mixture with their repeats."""

from __future__ import annotations

import hashlib
import json

import pytest

from keyeflow.datasets import tables
from keyeflow.datasets.conversations import add_conversations
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.mixture import fixed_mixture
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.datasets.video import content_hash
from keyeflow.model.generation import OpenAICompatibleGenerator
from keyeflow.synthetic import synthetic_teacher as chat_server
from keyeflow.training.posttrain_data import (
    DifficultyConfig,
    conversation_samples,
    difficulty_filter,
    longcot_mixture,
    sft_mixture,
)

PAPER = resolve_config("paper")


def chat(question: str, answer: str, task: str, uri: str) -> dict:
    return {
        "uri": uri,
        "source": "qa",
        "task": task,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }


def test_conversations_become_samples_and_fixed_mixtures_keep_their_repeats(home, sample_images):
    from keyeflow.datasets.images import ingest_images_shard

    image = str(sample_images[0])
    ingest_images_shard([image], ImageConfig(max_tokens=64))  # media go through ingestion first
    items = [
        chat("What is 2 + 2?", "4", "vqa", "made#1"),
        chat("Name a colour.", "Blue.", "conversation", "made#2"),
        {
            "uri": "made#3",
            "source": "qa",
            "task": "caption",
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": image}]},
                {"role": "assistant", "content": "A picture."},
            ],
        },
        {"uri": "made#4", "task": "vqa", "messages": [{"role": "user", "content": "no answer"}]},
        chat("x", "y", "vqa", "made#5") | {"messages": [{"role": "robot", "content": "?"}]},
        {
            "uri": "made#6",
            "task": "caption",
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": str(sample_images[1])}]},
                {"role": "assistant", "content": "Never ingested."},
            ],
        },
    ]
    ids, bad = add_conversations(items, "/", PAPER, ImageConfig(max_tokens=64))
    assert set(ids) == {"made#1", "made#2", "made#3"}
    assert "no assistant turn" in bad["made#4"] and "role must be one of" in bad["made#5"]
    assert "not ingested" in bad["made#6"]
    quarantined = {r["uri"]: r["reason"] for r in tables.open_table("quarantine").to_table().to_pylist()}
    assert set(bad) <= set(quarantined)
    rows = {r["sample_id"]: r for r in tables.open_table("train_samples").to_table().to_pylist()}
    assert rows[ids["made#3"]]["modality"] == "image" and rows[ids["made#3"]]["media_ids"]
    version = tables.ref("train_samples").version
    assert add_conversations(items[:3], "/", PAPER, ImageConfig(max_tokens=64))[0] == ids
    assert tables.ref("train_samples").version == version  # nothing new to write

    samples = tables.ref("train_samples")
    repeats = {ids["made#1"]: 3, ids["made#2"]: 1, ids["made#3"]: 2}
    result = fixed_mixture(samples, repeats, name="longcot", stage=5)
    written = {
        r["sample_id"]: r
        for r in tables.open_table("mixtures")
        .to_table(filter=f"mixture_id = '{result.mixture_id}'")
        .to_pylist()
    }
    assert {s: r["repeats"] for s, r in written.items()} == repeats
    assert sorted(r["order"] for r in written.values()) == [0, 1, 2]
    assert {r["train_samples_version"] for r in written.values()} == {samples.version}
    again = fixed_mixture(samples, repeats, name="longcot", stage=5)
    assert again.mixture_id == result.mixture_id and again.mixture.version == result.mixture.version
    assert fixed_mixture(samples, repeats, name="expert", stage=5).mixture_id != result.mixture_id
    with pytest.raises(ValueError, match="repeats must be integers >= 1"):
        fixed_mixture(samples, {ids["made#1"]: 0}, name="x", stage=5)
    with pytest.raises(KeyError, match="has no rows"):
        fixed_mixture(samples, {"nope": 1}, name="x", stage=5)


def test_difficulty_filter_drops_only_what_every_path_solves(home, tmp_path):
    items = [
        chat("What is 6 times 7?", "42", "vqa", "qa#easy"),
        chat("What is 12 divided by 5?", "2.4", "vqa", "qa#hard"),
        chat("Describe a sunset.", "Orange light over the sea.", "conversation", "qa#open"),
    ]
    add_conversations(items, "/", PAPER)
    rows = conversation_samples(tables.ref("train_samples"), ("vqa", "conversation"), max_tokens=512)
    assert len(rows) == 3
    recordings = {
        "model": "replay",
        "entries": [
            # every path gets 6×7 right (in another form: 42.0); 12/5 only sometimes (2.4 = 12/5, not 2)
            {
                "match": "6 times 7",
                "completions": [{"text": "<answer>42.0</answer>"}, {"text": "The answer is 42."}],
            },
            {"match": "12 divided by 5", "completions": [{"text": "<answer>12/5</answer>"}, {"text": "2"}]},
        ],
    }
    with chat_server.start_server(recordings, tmp_path / "server") as (url, log):
        generator = OpenAICompatibleGenerator(url, "replay", max_retries=0)
        report = difficulty_filter(generator, rows, DifficultyConfig(num_paths=4))
    by_uri = {r["sample_id"]: json.loads(json.dumps(r["messages"]))[0]["content"] for r in rows}
    dropped = {by_uri[s] for s in report.dropped}
    assert dropped == {"What is 6 times 7?"}
    assert "all 4 sampled answers match" in next(iter(report.dropped.values()))
    assert {by_uri[s] for s in report.kept} == {"What is 12 divided by 5?", "Describe a sunset."}
    assert {by_uri[s] for s in report.unchecked} == {"Describe a sunset."}  # no checker: kept, not sampled
    assert chat_server.requests_for(log, "sunset") == 0
    assert sorted(report.num_right.values()) == [2, 4]
    mixture = sft_mixture(tables.ref("train_samples"), report.kept, name="sft")
    assert tables.open_table("mixtures").count_rows(f"mixture_id = '{mixture.mixture_id}'") == 2


def test_longcot_samples_reach_a_mixture_with_their_repeats(home):
    now = tables.now()
    rows = []
    for n, (domain, repeats) in enumerate([("math", 3), ("math", 1), ("ocr", 2), ("math", 0)]):
        question = f"What is {n} + {n}? /think"
        response = f"<think>{n} plus {n}.</think><answer>{2 * n}</answer>"
        rows.append(
            {
                "sample_id": f"q{n}/g/0",
                "question_id": f"q{n}",
                "domain": domain,
                "source": "text",
                "question": question,
                "reference": str(2 * n),
                "media": "[]",
                "response": response,
                "answer": str(2 * n),
                "grade": "A",
                "redundancy": 0.1,
                "confidence": 0.9,
                "score": 4,
                "repeats": repeats,
                "reviewer_action": "none",
                "reviewer": "",
                "reason": "",
                "judge": "rule",
                "messages": json.dumps(
                    [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
                ),
                "gen_config_hash": "g",
                "created_at": now,
            }
        )
    tables.upsert("longcot", rows)
    result, bad = longcot_mixture(
        tables.ref("longcot"), name="longcot", slowfast=PAPER, image_config=ImageConfig()
    )
    assert not bad
    used = tables.open_table("mixtures").to_table(filter=f"mixture_id = '{result.mixture_id}'").to_pylist()
    assert sorted(r["repeats"] for r in used) == [1, 2, 3]  # repeats 0: scored out of training
    expert, _ = longcot_mixture(
        tables.ref("longcot"), name="expert-math", domain="math", slowfast=PAPER, image_config=ImageConfig()
    )
    used = tables.open_table("mixtures").to_table(filter=f"mixture_id = '{expert.mixture_id}'").to_pylist()
    assert sorted(r["repeats"] for r in used) == [1, 3]
    everything, _ = longcot_mixture(
        tables.ref("longcot"),
        name="expert-math-all",
        domain="math",
        slowfast=PAPER,
        image_config=ImageConfig(),
        min_repeats=1,
    )
    used = (
        tables.open_table("mixtures").to_table(filter=f"mixture_id = '{everything.mixture_id}'").to_pylist()
    )
    assert sorted(r["repeats"] for r in used) == [1, 1, 3]  # the scored-out sample too, once
    with pytest.raises(ValueError, match="of domain 'gui'"):
        longcot_mixture(
            tables.ref("longcot"), name="x", domain="gui", slowfast=PAPER, image_config=ImageConfig()
        )


def test_conversations_naming_media_by_absolute_path_get_the_same_ids_wherever_the_media_live(
    home, sample_images, tmp_path
):
    """What post-training writes to train_samples (RL items' answers, reward-model judgements, LongCoT rows)
    names its media by absolute path; a sample's id is its content, so the same conversation over the same
    pictures gets the same id in any folder (absolute paths in the hashed messages gave every home other ids,
    and the mixtures ordered by id another order). Another picture is another sample; a relative path keeps
    the id it had."""
    import shutil

    from keyeflow.datasets.images import ingest_images_shard
    from keyeflow.steps.posttrain import rl_answer_conversations

    def answers(pictures):
        items = [
            {
                "id": f"item-{k}",
                "mode": "no_think",
                "reference": str(k + 3),
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": str(picture)},
                            {"type": "text", "text": "How many shapes? /no_think"},
                        ],
                    }
                ],
            }
            for k, picture in enumerate(pictures)
        ]
        return rl_answer_conversations(items)

    ids_by_home = []
    for name in ("home-a", "home-b"):
        media = tmp_path / name / "samples" / "tasks" / "media"
        media.mkdir(parents=True)
        pictures = [shutil.copy(sample_images[k], media / f"picture-{k}.png") for k in range(2)]
        ingest_images_shard([str(p) for p in pictures], ImageConfig(max_tokens=64))
        ids, bad = add_conversations(answers(pictures), "/", PAPER, ImageConfig(max_tokens=64))
        assert not bad and set(ids) == {"rl-answer#item-0", "rl-answer#item-1"}
        ids_by_home.append(ids)
    assert ids_by_home[0] == ids_by_home[1]
    assert len(set(ids_by_home[0].values())) == 2
    # the same question and answer over the other picture: another sample
    swapped = answers([tmp_path / "home-a/samples/tasks/media/picture-1.png"])
    (other,) = add_conversations(swapped, "/", PAPER, ImageConfig(max_tokens=64))[0].values()
    assert other != ids_by_home[0]["rl-answer#item-0"]
    # a relative path (what source files hold) is hashed as written, as before
    relative = [
        {
            "uri": "made#relative",
            "task": "caption",
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "picture-0.png"}]},
                {"role": "assistant", "content": "A picture."},
            ],
        }
    ]
    source = tmp_path / "home-a" / "samples" / "tasks" / "media"
    (kept,) = add_conversations(relative, str(source), PAPER, ImageConfig(max_tokens=64))[0].values()
    absolute = [dict(relative[0], uri="made#absolute")]
    absolute[0]["messages"] = [
        {"role": "user", "content": [{"type": "image", "image": str(source / "picture-0.png")}]},
        relative[0]["messages"][1],
    ]
    (by_digest,) = add_conversations(absolute, "/", PAPER, ImageConfig(max_tokens=64))[0].values()
    assert kept != by_digest
    digest = content_hash(str(source / "picture-0.png"))[0]
    as_written = json.dumps(
        {"messages": relative[0]["messages"], "media": [digest]}, sort_keys=True, ensure_ascii=False
    )
    assert kept.split("-")[0] == hashlib.sha256(as_written.encode()).hexdigest()[:20]
