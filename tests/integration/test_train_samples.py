"""Conversations, captions and text into train_samples on real media, tables and the mixture SQL."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from keyeflow.cli import app
from keyeflow.datasets import conversations, images, ingest, mixture, pretokenize, sql, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.model import token_stream
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.quality import gates

PAPER = resolve_config("paper")


def ingest_media(corpus_dir, source_root):
    media = conversations.referenced_media([str(corpus_dir)], str(source_root))
    ingest.ingest_shard(media["video"])
    pretokenize.pretokenize_shard(pretokenize.pending_videos(tables.ref("videos"), PAPER), PAPER)
    images.ingest_images_shard(media["image"], ImageConfig())
    return media


@pytest.fixture()
def built(home, sample_corpus, media_dir):
    corpus = sample_corpus["conversations"].parent
    media = ingest_media(corpus, media_dir)
    report = conversations.build_train_samples([str(corpus)], str(media_dir), PAPER)
    return corpus, media, report


def test_every_bad_record_is_quarantined_with_its_line_and_reason(built, sample_corpus):
    _, _, report = built
    reasons = sql.query("select uri, reason from quarantine where stage = 'ingest_samples'")
    by_file: dict[str, list[str]] = {}
    for uri, reason in zip(reasons.uri, reasons.reason):
        by_file.setdefault(uri.split("#")[0].rsplit("/", 1)[-1], []).append(f"{uri.split('#')[-1]}: {reason}")
    joined = {k: " | ".join(v) for k, v in by_file.items()}
    assert "L3: invalid JSON at line 3" in joined[sample_corpus["bad_broken_line"].name]
    assert "invalid UTF-8 at line" in joined[sample_corpus["bad_invalid_utf8"].name]
    assert "does_not_exist.mp4' does not exist" in joined[sample_corpus["bad_missing_media"].name]
    outside = joined[sample_corpus["bad_outside_root"].name]
    assert "is outside the source root" in outside and "/etc/hostname" in outside
    schema = joined[sample_corpus["bad_bad_schema"].name]
    assert "role must be one of" in schema and "content must be a string or a list of parts" in schema
    bad_text = sample_corpus["bad_bad_text"]
    text_reasons = " | ".join(r for u, r in zip(reasons.uri, reasons.reason) if str(bad_text) in u)
    assert "empty text file" in text_reasons and "invalid UTF-8 at byte" in text_reasons
    # the good lines of the bad files still went through
    good_from_bad = sql.query("select count(*) as n from train_samples where source_uri like '%/bad/%'").n[0]
    assert good_from_bad >= 4
    assert report.num_quarantined == len(reasons)


def test_token_counts_are_exact_and_modality_follows_media(built):
    tok = load_tokenizer()
    rows = tables.open_table("train_samples").to_table().to_pylist()
    assert {r["modality"] for r in rows} == {"video", "image", "text"}
    video_rows = {
        r["sample_id"]: r
        for r in tables.open_table("video_samples")
        .to_table(columns=["sample_id", "frame_types", "timestamps", "slow_tokens", "fast_tokens"])
        .to_pylist()
    }
    image_rows = {
        r["sample_id"]: r["num_tokens"]
        for r in tables.open_table("image_samples").to_table(columns=["sample_id", "num_tokens"]).to_pylist()
    }
    checked = {"video": 0, "image": 0}
    for row in rows:
        assert row["num_tokens"] == row["num_text_tokens"] + row["num_vision_tokens"]
        if row["modality"] == "text":
            assert row["media_ids"] == [] and row["num_vision_tokens"] == 0
            continue
        expected_vision = 0
        for media_id in row["media_ids"]:
            if media_id in video_rows:
                v = video_rows[media_id]
                expected_vision += token_stream.count_video_tokens(
                    tok, v["frame_types"], v["timestamps"], v["slow_tokens"], v["fast_tokens"]
                )
            else:
                expected_vision += token_stream.count_image_tokens(image_rows[media_id])
        assert row["num_vision_tokens"] == expected_vision
        assert (row["modality"] == "video") == any(m in video_rows for m in row["media_ids"])
        checked[row["modality"]] += 1
    assert checked["video"] > 10 and checked["image"] > 10
    assert gates.check_train_samples(tables.ref("train_samples")).passed


def test_rerun_writes_nothing(built, media_dir):
    corpus, _, first = built
    version = tables.ref("train_samples").version
    again = conversations.build_train_samples([str(corpus)], str(media_dir), PAPER)
    assert again.num_written == 0 and again.num_already_present == first.num_written
    assert tables.ref("train_samples").version == version


def test_stage3_mixture_reaches_24_50_26_and_sql_confirms(built):
    config = mixture.stage_mixture(3)
    result = mixture.build_mixture(tables.ref("train_samples"), config, tables.ref("quarantine"))
    runner = CliRunner()
    out = runner.invoke(app, ["sql", mixture.reached_shares_sql(result.mixture_id), "--format", "json"])
    assert out.exit_code == 0, out.output
    shares = {r["modality"]: r for r in json.loads(out.output)}
    share_column = next(k for k in shares["video"] if "share" in k)
    for modality, target in {"video": 0.24, "image": 0.50, "text": 0.26}.items():
        assert abs(shares[modality][share_column] - target) <= 0.005, (modality, shares[modality])
    verdict = gates.check_mixture(
        result.mixture, result.mixture_id, config, tables.ref("quarantine"), tables.ref("train_samples")
    )
    assert verdict.passed, verdict.failures
    used_bad = sql.query(f"""select count(*) as n from mixtures m join train_samples s using (sample_id)
                             where m.mixture_id = '{result.mixture_id}' and s.source_uri in
                             (select uri from quarantine)""").n[0]
    assert used_bad == 0


def test_a_media_sample_a_gate_quarantined_is_not_used_by_any_conversation(home, sample_corpus, media_dir):
    # A video's pre-tokenised sample failed a row-level gate (quarantined under its content hash and sample
    # config): samples-build quarantines every conversation on that video, and uses the other media.
    corpus = sample_corpus["conversations"].parent
    ingest_media(corpus, media_dir)
    gated = tables.open_table("video_samples").to_table(columns=["video_id", "config_hash"]).to_pylist()[0]
    reason = "gate video_samples: timestamps strictly increase [expect_column_values_to_be_in_set] x=False"
    tables.upsert(
        "quarantine",
        [
            tables.quarantine_row(
                "/v/gated.mp4",
                reason,
                gates.gate_stage("video_samples"),
                gated["video_id"],
                gated["config_hash"],
            )
        ],
    )
    report = conversations.build_train_samples([str(corpus)], str(media_dir), PAPER)
    rows = sql.query("select uri, reason from quarantine where stage = 'ingest_samples'")
    hits = [r for r in rows.reason if "quarantined: " + reason in r]
    assert hits and all("has no pre-tokenised sample" in r for r in hits)
    assert report.num_written > 0
    used = sql.query("select media_ids from train_samples where modality = 'video'").media_ids
    assert not any(m.startswith(gated["video_id"][:16]) for ids in used for m in ids)
