"""Evaluation on real pre-tokenised sample videos (ffmpeg clips → Lance) with the tiny model: held-out loss
per modality against a sample-by-sample computation, a Video-MME-format set built from the tables,
option-likelihood scoring that follows what the model was trained to answer, and the promotion gate on literal
metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from keyeflow.datasets import ingest, pretokenize, tables
from keyeflow.datasets.pretokenize import patchify
from keyeflow.datasets.sample_reader import LanceSampleReader
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches, collate, encode_sample
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.training.evaluate import (
    evaluate_mcq,
    generate_mcq_set,
    heldout_loss,
    lance_video_lookup,
    mcq_accuracy,
    option_conversation,
    predict,
    promotion_gate,
    score_options,
)

# Small budgets keep every video under ~250 vision tokens, so the tiny model runs them in milliseconds.
SMALL = resolve_config("paper", total_token_budget=256, min_tokens_per_frame=4, max_tokens_per_frame=16)


@pytest.fixture()
def video_rows(home, sample_videos) -> list[dict]:
    ingest.ingest_shard([str(v) for v in sample_videos])
    pretokenize.pretokenize_shard(pretokenize.pending_videos(tables.ref("videos"), SMALL), SMALL)
    rows = tables.open_table("video_samples").to_table().to_pylist()
    assert len(rows) == len(sample_videos)
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_model(tokenizer, seed: int = 0) -> KeyeForConditionalGeneration:
    torch.manual_seed(seed)
    return KeyeForConditionalGeneration(tiny(tokenizer))


def write_train_samples(video_rows: list[dict]) -> dict[str, list[str]]:
    """Held-out train_samples: a question about each of three videos, and three plain-text chunks."""
    rows, ids = [], {"video": [], "text": []}
    for n, video in enumerate(sorted(video_rows, key=lambda r: r["sample_id"])[:3]):
        messages = [
            {"role": "user", "content": [{"type": "video", "video": video["uri"]},
                                         {"type": "text", "text": "What happens in this clip?"}]},
            {"role": "assistant", "content": f"The clip has {video['num_slow']} shots over {n + 4} seconds."},
        ]  # fmt: skip
        rows.append({"sample_id": f"v{n}", "modality": "video", "media_ids": [video["sample_id"]],
                     "messages": json.dumps(messages)})  # fmt: skip
        ids["video"].append(f"v{n}")
    for n, text in enumerate(["A short note about trains.", "Rivers run to the sea, mostly downhill.",
                              "Seven plus five is twelve, and twelve minus seven is five."]):  # fmt: skip
        rows.append({"sample_id": f"t{n}", "modality": "text", "media_ids": [],
                     "messages": json.dumps([{"role": "text", "content": text}])})  # fmt: skip
        ids["text"].append(f"t{n}")
    tables.upsert("train_samples", rows)
    return ids


def test_heldout_loss_equals_sample_by_sample_computation(video_rows, tokenizer):
    ids = write_train_samples(video_rows)
    reader = LanceSampleReader(tables.ref("train_samples"), tokenizer)
    model = tiny_model(tokenizer)

    expected = {}
    with torch.no_grad():
        for modality, sample_ids in ids.items():
            total, count = 0.0, 0
            for features in reader(sample_ids):
                batch = collate([features], pack=False)
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += float(model(**batch).loss) * n
                count += n
            expected[modality] = total / count

    longest = max(len(f) for f in reader(ids["video"] + ids["text"]))
    model.train()
    one_per_row = heldout_loss(model, reader, ids, max_length=longest)
    packed = heldout_loss(model, reader, ids, max_length=10 * longest)
    assert model.training  # the caller's mode is restored
    assert list(one_per_row) == ["video", "text"]
    for modality in ids:
        assert one_per_row[modality] == pytest.approx(expected[modality], rel=1e-5)
        assert packed[modality] == pytest.approx(expected[modality], rel=1e-5)
    # token-weighted, not a mean of per-sample means: differs from it when sample lengths differ
    with torch.no_grad():
        per_sample = [float(model.eval()(**collate([f], pack=False)).loss) for f in reader(ids["text"])]
    assert not math.isclose(sum(per_sample) / len(per_sample), expected["text"], rel_tol=1e-6)

    with pytest.raises(ValueError, match="more than max_length"):
        heldout_loss(model, reader, {"video": ids["video"]}, max_length=8)
    with pytest.raises(ValueError, match="no held-out samples"):
        heldout_loss(model, reader, {"image": []}, max_length=longest)


def test_mcq_set_from_video_samples(video_rows, tokenizer):
    records = generate_mcq_set(video_rows, 24)
    assert records == generate_mcq_set(list(reversed(video_rows)), 24)  # deterministic, order-free
    assert len({r["question_id"] for r in records}) == 24
    by_id = {r["sample_id"]: r for r in video_rows}
    kinds = {r["task_type"] for r in records}
    assert kinds == {"slow_frames", "duration", "fast_frames"}  # 8 videos × 3 kinds
    for record in records:
        row = by_id[record["video"]]
        options = {o.split(". ", 1)[0]: o.split(". ", 1)[1] for o in record["options"]}
        assert len(options) == 4 and len(set(options.values())) == 4
        truth = {
            "slow_frames": str(row["num_slow"]),
            "fast_frames": str(row["num_fast"]),
            "duration": f"{round(row['num_frames'] / row['sampling_fps'])} seconds",
        }[record["task_type"]]
        assert options[record["answer"]] == truth
    # answers are not all at one letter
    assert len({r["answer"] for r in records}) > 1
    everything = generate_mcq_set(video_rows, 5 * len(video_rows))
    orientation = [r for r in everything if r["task_type"] == "orientation"]
    portrait = [r for r in orientation if "portrait" in by_id[r["video"]]["uri"]]
    assert portrait and all(
        r["options"][["A", "B", "C"].index(r["answer"])] == "B. portrait" for r in portrait
    )
    with pytest.raises(ValueError, match="n must be"):
        generate_mcq_set(video_rows, 5 * len(video_rows) + 1)

    # videos resolve from Lance exactly as stored, and the whole set scores end to end
    resolve = lance_video_lookup()
    media = resolve(records[0]["video"])
    frames = (
        tables.open_table("video_frames").to_table(filter=f"sample_id = '{records[0]['video']}'").to_pylist()
    )
    frames.sort(key=lambda f: f["frame_index"])
    stored = np.concatenate([np.frombuffer(f["patches"], np.uint8).reshape(-1, 588) for f in frames])
    assert np.array_equal(media.patches, stored)
    assert resolve(by_id[records[0]["video"]]["uri"]).grids == media.grids  # a URI with one sample works too
    model = tiny_model(tokenizer)
    result = evaluate_mcq(model, tokenizer, records[:8], resolve)
    assert result.num_questions == 8 and len(result.predictions) == 8
    assert result.accuracy == mcq_accuracy(result.predictions, [r["answer"] for r in records[:8]])
    assert result.num_correct == round(result.accuracy * 8)


def test_mcq_scoring_follows_training(video_rows, tokenizer):
    record = generate_mcq_set(video_rows, 1)[0]
    media = lance_video_lookup()(record["video"])
    model = tiny_model(tokenizer)
    before = score_options(model.eval(), tokenizer, record, media)
    # train on the option the untrained model likes least, so winning can only come from training
    target = min(before, key=lambda s: s.mean_logprob).letter
    option = next(o for o in record["options"] if o.startswith(target + "."))
    batch = collate([encode_sample(option_conversation(record, option), tokenizer, lambda part: media)],
                    pack=False)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(10):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()

    after = score_options(model.eval(), tokenizer, record, media)
    assert predict(after) == target and predict(after, length_normalized=False) == target
    assert all(s.num_tokens > 1 for s in after)
    # sum and mean agree with each other for each option
    assert all(math.isclose(s.mean_logprob * s.num_tokens, s.sum_logprob) for s in after)

    # accuracy arithmetic: the same question keyed to the trained letter and to another one → 1 of 2
    other = next(s.letter for s in after if s.letter != target)
    records = [dict(record, answer=target), dict(record, answer=other)]
    result = evaluate_mcq(model, tokenizer, records, lambda ref: media)
    assert result.predictions == [target, target]
    assert (result.num_correct, result.num_questions, result.accuracy) == (1, 2, 0.5)
    assert mcq_accuracy(["A", "B", "C", "D"], ["A", "B", "D", "C"]) == 0.5


def test_mcq_with_patchified_frames_and_bad_records(tokenizer):
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (28, 56), (56, 56)]  # Slow, Fast, Slow: 4, 2, 4 tokens
    media = MediaPatches(
        patches=np.concatenate([patchify(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 14, 2)
                                for h, w in sizes]),
        grids=[(1, h // 14, w // 14) for h, w in sizes], frame_types=[0, 1, 0], timestamps=[0.0, 0.5, 1.0],
    )  # fmt: skip
    record = {"video": "clip", "question": "How many Slow frames?", "options": ["A. 1", "B. 2", "C. 3"],
              "answer": "B"}  # fmt: skip
    result = evaluate_mcq(tiny_model(tokenizer), tokenizer, [record], lambda ref: media)
    assert result.num_questions == 1 and result.predictions[0] in "ABC"
    for bad, match in (
        (dict(record, answer="D"), "not one of the option letters"),
        (dict(record, options=["1", "2"]), "must start with its capital letter"),
        ({k: v for k, v in record.items() if k != "video"}, "lacks"),
    ):
        with pytest.raises(ValueError, match=match):
            evaluate_mcq(tiny_model(tokenizer), tokenizer, [record, bad], lambda ref: media)


def test_promotion_gate_on_literal_metrics():
    parent = {"heldout_loss": {"video": 2.0, "image": 1.5, "text": 3.0}, "mcq_accuracy": 0.60}
    better = {"heldout_loss": {"video": 1.9, "image": 1.5, "text": 3.1}, "mcq_accuracy": 0.57}
    assert promotion_gate(better, parent, margin=0.05) == (True, [])  # +3.3% loss, -0.03 accuracy: within

    worse = {"heldout_loss": {"video": 2.2, "image": 1.5, "text": 3.0}, "mcq_accuracy": 0.50}
    passed, reasons = promotion_gate(worse, parent, margin=0.05)
    assert not passed and len(reasons) == 2
    assert reasons[0].startswith("heldout_loss/video: 2.2000 vs parent 2.0000 (+10.00%)")
    assert reasons[1].startswith("mcq_accuracy: 0.5000 vs parent 0.6000 (-0.1000)")
    assert promotion_gate(worse, parent, margin=0.11) == (True, [])

    passed, reasons = promotion_gate(
        {"heldout_loss": {"video": 2.0, "text": float("nan")}}, parent, margin=0.05
    )
    assert not passed
    assert [r.split(":")[0] for r in reasons] == ["heldout_loss/image", "heldout_loss/text", "mcq_accuracy"]
    assert "missing" in reasons[0] and "not finite" in reasons[1]

    many = {"mcq_accuracy": {"video-mme": 0.40, "tiny-mcq": 0.80}}
    passed, reasons = promotion_gate(
        {"mcq_accuracy": {"video-mme": 0.41, "tiny-mcq": 0.70}}, many, margin=0.05
    )
    assert not passed and reasons == [
        "mcq_accuracy/tiny-mcq: 0.7000 vs parent 0.8000 (-0.1000), a drop larger than the allowed 0.0500"
    ]
    with pytest.raises(ValueError, match="margin"):
        promotion_gate(parent, parent, margin=-0.1)
