"""Mixtures over real Lance tables and DuckDB: shares confirmed in SQL, determinism, versions, the gate."""

from __future__ import annotations

import random

import pytest

from keyeflow.datasets import sql, tables
from keyeflow.datasets.mixture import (
    OVER_LENGTH,
    POSTTRAIN_TASKS,
    QUARANTINED,
    TASK_NOT_IN_STAGE,
    MixtureShortfall,
    build_mixture,
    classify_sql,
    compute_mixture,
    reached_shares_sql,
    stage_mixture,
)
from keyeflow.quality import gates

# modality → (samples, min tokens, max tokens, sources): long videos, medium images, short texts.
SHAPE = {
    "video": (260, 2_000, 9_000, ["clips-a", "clips-b"]),
    "image": (1_600, 200, 2_500, ["captions-coco-like", "ocr-docs", "grounding-refcoco-like"]),
    "text": (2_600, 40, 1_200, ["web-text"]),
}
TASKS = {"video": ["caption", "vqa"], "image": ["caption", "ocr", "grounding", "vqa"], "text": ["text"]}


def sample_rows(seed: int = 0, shape=SHAPE, prefix: str = "") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for modality, (count, low, high, sources) in shape.items():
        for i in range(count):
            tokens = rng.randint(low, high)
            text = tokens if modality == "text" else rng.randint(20, 200)
            source = sources[i % len(sources)]
            rows.append(
                {
                    "sample_id": f"{prefix}{modality}-{i:05d}",
                    "source": source,
                    "task": rng.choice(TASKS[modality]),
                    "modality": modality,
                    "num_tokens": tokens,
                    "num_text_tokens": text,
                    "num_vision_tokens": tokens - text,
                    "media_ids": [] if modality == "text" else [f"{modality}-media-{i}"],
                    "source_uri": f"file:///data/{source}/{prefix}{i:05d}",
                    "content_hash": f"{seed}-{modality}-{i}",
                    "config_hash": "tok-v1",
                    "messages": "[]",
                    "created_at": tables.now(),
                }
            )
    return rows


@pytest.fixture()
def samples(home) -> tables.TableRef:
    tables.upsert("train_samples", sample_rows())
    return tables.ref("train_samples")


def shares_by_sql(mixture_id: str, version: int | None = None) -> dict[str, float]:
    frame = sql.query(reached_shares_sql(mixture_id), versions={"mixtures": version} if version else None)
    return dict(zip(frame.modality, frame.share))


def mixture_rows(result, columns=("sample_id", "modality", "source", "num_tokens", "repeats", "order")):
    ds = tables.open_table("mixtures", version=result.mixture.version)
    table = ds.to_table(columns=list(columns), filter=f"mixture_id = '{result.mixture_id}'")
    return sorted(zip(*(table.column(c).to_pylist() for c in columns)))


def test_stage3_shares_within_half_a_point_confirmed_by_sql_and_the_gate(samples):
    config = stage_mixture(3, max_sample_tokens=8_192)
    result = build_mixture(samples, config, quarantine=None)

    shares = shares_by_sql(result.mixture_id)
    assert set(shares) == {"video", "image", "text"}
    for modality, target in config.target_shares.items():
        assert abs(shares[modality] - target) * 100 <= 0.5, (modality, shares[modality])
    report = result.report
    assert report.within_tolerance and not report.shortfalls
    for m in report.modalities:
        assert m.reached_share == pytest.approx(shares[m.modality])
        assert m.max_repeats == 1
    # The boundary sample is taken or left, whichever is closer: each modality within half a sample.
    for m in report.modalities:
        assert abs(m.reached_tokens - m.quota_tokens) <= SHAPE[m.modality][2] / 2
    assert report.excluded_counts == {OVER_LENGTH: sum(1 for r in sample_rows() if r["num_tokens"] > 8_192)}
    assert (
        report.reached_tokens
        == sql.query(
            f"select sum(num_tokens * repeats) as t from mixtures where mixture_id = '{result.mixture_id}'"
        ).t[0]
    )

    verdict = gates.check_mixture(
        result.mixture, result.mixture_id, config, tables.ref("quarantine"), samples
    )
    assert verdict.passed, verdict.markdown()


def test_same_seed_same_rows_other_seed_other_order(samples):
    config = stage_mixture(3, max_sample_tokens=8_192, seed=11)
    first = build_mixture(samples, config, None)
    version = first.mixture.version
    again = build_mixture(samples, config, None)
    assert again.mixture_id == first.mixture_id
    assert again.mixture.version == version  # a rerun writes nothing
    assert mixture_rows(again) == mixture_rows(first)
    assert compute_mixture(samples, config).rows.equals(compute_mixture(samples, config).rows)

    other = build_mixture(samples, stage_mixture(3, max_sample_tokens=8_192, seed=12), None)
    assert other.mixture_id != first.mixture_id
    order_a = {s: o for s, *_, o in mixture_rows(first)}
    order_b = {s: o for s, *_, o in mixture_rows(other)}
    common = sorted(set(order_a) & set(order_b))
    assert [order_a[s] for s in common] != [order_b[s] for s in common]
    assert abs(shares_by_sql(other.mixture_id)["video"] - 0.24) * 100 <= 0.5


def test_new_input_version_new_mixture_old_one_still_readable(samples):
    config = stage_mixture(3, max_sample_tokens=8_192)
    old = build_mixture(samples, config, None)
    old_rows = mixture_rows(old)

    tables.upsert("train_samples", sample_rows(seed=5, prefix="more-"))
    newer = tables.ref("train_samples")
    assert newer.version > samples.version
    new = build_mixture(newer, config, None)
    assert new.mixture_id != old.mixture_id
    assert new.mixture.version > old.mixture.version
    assert any(s.startswith("more-") for s, *_ in mixture_rows(new))

    # The old mixture is intact at its own version and still present at the latest one.
    assert mixture_rows(old) == old_rows
    at_old = tables.open_table("mixtures", version=old.mixture.version)
    assert at_old.count_rows(filter=f"mixture_id = '{new.mixture_id}'") == 0
    assert tables.open_table("mixtures").count_rows(filter=f"mixture_id = '{old.mixture_id}'") == len(
        old_rows
    )
    # Rebuilding from the old pinned input gives the old mixture back.
    assert build_mixture(samples, config, None).mixture_id == old.mixture_id


def test_shortfall_raises_naming_modality_and_missing_tokens(samples):
    config = stage_mixture(3, max_sample_tokens=8_192, total_tokens=20_000_000)
    video_tokens = sql.query(
        "select sum(num_tokens) as t from train_samples where modality = 'video' and num_tokens <= 8192"
    ).t[0]
    with pytest.raises(MixtureShortfall) as info:
        build_mixture(samples, config, None)
    message = str(info.value)
    assert f"video is short by {0.24 * 20_000_000 - video_tokens:,.0f} tokens" in message
    assert "upsample=True with max_repeats >=" in message
    assert not tables.exists("mixtures") or tables.open_table("mixtures").count_rows() == 0

    # No video at all: a shortfall whatever the cap.
    with pytest.raises(MixtureShortfall, match="no eligible video tokens"):
        build_mixture(samples, stage_mixture(3, max_sample_tokens=1_000, upsample=True, max_repeats=50), None)


def test_upsample_reaches_the_target_within_the_cap(home):
    # Few videos: the mixture the data gives without repeats is small, video is what runs out.
    tables.upsert(
        "train_samples", sample_rows(shape={**SHAPE, "video": (60, 2_000, 9_000, ["clips-a", "clips-b"])})
    )
    samples = tables.ref("train_samples")
    with pytest.raises(MixtureShortfall, match="video is short by"):
        build_mixture(samples, stage_mixture(3, max_sample_tokens=8_192, total_tokens=2_000_000), None)
    base = build_mixture(samples, stage_mixture(3, max_sample_tokens=8_192), None).report
    video_available = base.modality("video").available_tokens
    total = round(video_available * 2.5 / 0.24)  # needs 2.5 passes over the videos
    config = stage_mixture(3, max_sample_tokens=8_192, total_tokens=total, upsample=True, max_repeats=3)
    result = build_mixture(samples, config, None)

    shares = shares_by_sql(result.mixture_id)
    for modality, target in config.target_shares.items():
        assert abs(shares[modality] - target) * 100 <= 0.5
    video = result.report.modality("video")
    assert 2.4 < video.passes <= 3 and video.max_repeats == 3
    repeats = sql.query(
        f"select modality, min(repeats) as lo, max(repeats) as hi from mixtures "
        f"where mixture_id = '{result.mixture_id}' group by modality"
    )
    assert repeats.hi.max() <= 3
    assert gates.check_mixture(result.mixture, result.mixture_id, config, None, samples).passed

    # A cap too low to reach the target: the best mixture under the cap, reported, never past the cap.
    capped = stage_mixture(3, max_sample_tokens=8_192, total_tokens=total, upsample=True, max_repeats=2)
    short = build_mixture(samples, capped, None)
    assert [s.modality for s in short.report.shortfalls] == ["video"]
    assert short.report.modality("video").max_repeats <= 2
    assert short.report.modality("video").passes == pytest.approx(2.0)
    assert not short.report.within_tolerance
    verdict = gates.check_mixture(short.mixture, short.mixture_id, capped, None, samples)
    assert [f["check"] for f in verdict.failures] == ["modality shares within tolerance"]


def test_quarantined_and_over_length_samples_are_excluded_and_counted(samples):
    rows = sample_rows()
    bad_uris = [r["source_uri"] for r in rows if r["modality"] == "image"][:25]
    tables.upsert(
        "quarantine", [tables.quarantine_row(u, "decode failed", "ingest_images") for u in bad_uris]
    )
    quarantine = tables.ref("quarantine")
    config = stage_mixture(3, max_sample_tokens=6_000)
    result = build_mixture(samples, config, quarantine)

    over = sum(1 for r in rows if r["num_tokens"] > 6_000 and r["source_uri"] not in bad_uris)
    assert result.report.excluded_counts == {QUARANTINED: 25, OVER_LENGTH: over}
    # The same reasons, row by row, in SQL.
    reasons = sql.query(
        f"select reason, count(*) as n from ({classify_sql(config)}) where reason is not null group by reason"
    )
    assert dict(zip(reasons.reason, reasons.n)) == {QUARANTINED: 25, OVER_LENGTH: over}
    used = sql.query(
        f"select m.sample_id, t.source_uri, m.num_tokens from mixtures m "
        f"join train_samples t using (sample_id) where m.mixture_id = '{result.mixture_id}'"
    )
    assert not set(used.source_uri) & set(bad_uris)
    assert used.num_tokens.max() <= 6_000
    assert gates.check_mixture(result.mixture, result.mixture_id, config, quarantine, samples).passed

    # Stage 1 takes image captions only.
    stage1 = build_mixture(samples, stage_mixture(1), quarantine)
    assert set(shares_by_sql(stage1.mixture_id)) == {"image"}
    assert stage1.report.excluded_counts[TASK_NOT_IN_STAGE] == sum(
        1
        for r in rows
        if r["modality"] == "image" and r["task"] != "caption" and r["source_uri"] not in bad_uris
    )
    tasks = sql.query(
        f"select distinct t.task from mixtures m join train_samples t using (sample_id) "
        f"where m.mixture_id = '{stage1.mixture_id}'"
    )
    assert list(tasks.task) == ["caption"]


def test_source_weights_split_a_modality(samples):
    # Stage 1 over every image task, 600K tokens: both weighted sources have room for their part.
    weights = {"captions-coco-like": 3, "ocr-docs": 1, "grounding-refcoco-like": 0}
    config = stage_mixture(1, tasks=None, source_weights=weights, total_tokens=600_000)
    result = build_mixture(samples, config, None)
    by_source = sql.query(
        f"select source, sum(num_tokens * repeats) as t from mixtures "
        f"where mixture_id = '{result.mixture_id}' group by source"
    )
    tokens = dict(zip(by_source.source, by_source.t))
    assert set(tokens) == {"captions-coco-like", "ocr-docs"}
    assert tokens["captions-coco-like"] / tokens["ocr-docs"] == pytest.approx(3, rel=0.02)
    assert abs(sum(tokens.values()) - 600_000) <= 2_500 / 2
    assert result.report.excluded_counts == {
        "source_weight_zero": SHAPE["image"][0] // 3,  # every third image is grounding-refcoco-like
        "modality_not_in_mixture": SHAPE["video"][0] + SHAPE["text"][0],
    }
    sources = {s.source: s for s in result.report.sources}
    assert sources["captions-coco-like"].reached_tokens == tokens["captions-coco-like"]
    assert sources["captions-coco-like"].quota_tokens == pytest.approx(450_000)


def test_gate_names_the_check_a_tampered_mixture_breaks(samples):
    config = stage_mixture(3, max_sample_tokens=8_192)
    result = build_mixture(samples, config, None)
    ds = tables.open_table("mixtures")

    # Someone bumps one sample's repeats past the cap and drops most videos.
    ds.update({"repeats": "7"}, where=f"mixture_id = '{result.mixture_id}' and sample_id = 'text-00001'")
    ds.delete(f"mixture_id = '{result.mixture_id}' and modality = 'video' and sample_id > 'video-00050'")
    tampered = tables.ref("mixtures")
    verdict = gates.check_mixture(tampered, result.mixture_id, config, None, samples)
    failed = {f["check"]: f for f in verdict.failures}
    assert not verdict.passed
    assert "repeats within the cap" in failed
    assert failed["repeats within the cap"]["examples"] == [f"{result.mixture_id}/text-00001"]
    assert "modality shares within tolerance" in failed
    assert "order is a permutation of the rows" in failed
    with pytest.raises(gates.GateFailed, match="'repeats within the cap'"):
        verdict.raise_if_failed()

    # The pinned version before the tampering still passes; an unknown id has no rows and fails.
    assert gates.check_mixture(result.mixture, result.mixture_id, config, None, samples).passed
    assert not gates.check_mixture(result.mixture, "nope", config, None, samples).passed


def test_held_out_samples_are_excluded_from_every_mixture_and_counted(samples):
    from keyeflow.datasets.mixture import HELD_OUT, heldout_sample_ids

    tables.ensure("quarantine")
    quarantine = tables.ref("quarantine")
    config = stage_mixture(3, max_sample_tokens=8_192, holdout_per_mille=50)
    result = build_mixture(samples, config, quarantine)
    used = {row[0] for row in mixture_rows(result)}

    # ~5% of the samples, chosen by id alone: the same set whatever the stage, seed or shares
    frame = sql.query(classify_sql(config))
    held = set(frame.sample_id[frame.reason == HELD_OUT])
    assert 0.03 < len(held) / len(frame) < 0.07
    other = stage_mixture(
        2, max_sample_tokens=8_192, holdout_per_mille=50, seed=7, upsample=True, max_repeats=4
    )
    frame2 = sql.query(classify_sql(other))
    assert set(frame2.sample_id[frame2.reason == HELD_OUT]) == held
    assert not held & used
    assert result.report.excluded_counts[HELD_OUT] == len(held)

    picked = heldout_sample_ids(samples, quarantine, 50, max_tokens=2_000, per_modality=5)
    assert sorted(picked) == ["image", "text", "video"] or sorted(picked) == ["image", "text"]
    lengths = dict(zip(frame.sample_id, frame.num_tokens))
    for modality, ids in picked.items():
        assert 0 < len(ids) <= 5 and set(ids) <= held
        assert all(lengths[i] <= 2_000 and i.startswith(modality) for i in ids)
    assert picked == heldout_sample_ids(samples, quarantine, 50, max_tokens=2_000, per_modality=5)
    with pytest.raises(ValueError, match="holdout_per_mille"):
        stage_mixture(3, holdout_per_mille=1000)


def test_rows_the_config_excludes_do_not_change_the_mixture(samples):
    config = stage_mixture(3, max_sample_tokens=8_192)
    first = build_mixture(samples, config, None)
    # Post-training writes its own rows into train_samples: a new table version, the same mixture.
    extra = sample_rows(seed=9, shape={"text": (5, 40, 400, ["posttrain"])}, prefix="rm-")
    # every task post-training writes: LongCoT, reward-model judgements, RL items' answers
    tasks = [POSTTRAIN_TASKS[k % len(POSTTRAIN_TASKS)] for k in range(len(extra))]
    assert set(tasks) == {"longcot", "reward_model", "rl-answer"}
    tables.upsert("train_samples", [r | {"task": t} for r, t in zip(extra, tasks)])
    later = tables.ref("train_samples")
    assert later.version > samples.version
    again = build_mixture(later, config, None)
    assert again.mixture_id == first.mixture_id
    assert again.mixture.version == first.mixture.version  # nothing written
    assert not any(s.startswith("rm-") for s, *_ in mixture_rows(again))
    gates.check_mixture(again.mixture, again.mixture_id, config, None, later).raise_if_failed()


def test_config_values_with_quotes_are_bound_not_formatted(home):
    # A source name holding a quote, a newline and non-ASCII letters, weighted 0: the mixture keyeflow runs
    # (values bound as parameters) and the SQL text people run (quoted literals) exclude exactly its rows.
    hostile = 'o\'brien\n"çà"'
    shape = {"image": (90, 200, 2_500, ["plain", hostile, "ocr-docs"])}
    tables.upsert("train_samples", sample_rows(shape=shape))
    samples = tables.ref("train_samples")
    config = stage_mixture(1, tasks=None, source_weights={"plain": 1, hostile: 0, "ocr-docs": 1})
    result = build_mixture(samples, config, None)
    assert result.report.excluded_counts == {"source_weight_zero": 30}
    frame = sql.query(classify_sql(config, with_quarantine=False))
    assert set(frame.source[frame.reason == "source_weight_zero"]) == {hostile}
    used = sql.query("select distinct source from mixtures")
    assert set(used.source) == {"plain", "ocr-docs"}
