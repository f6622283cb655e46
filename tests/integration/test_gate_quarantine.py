"""A train sample that uses a media sample a gate quarantined is itself quarantined by the train_samples
gate, under its source_uri: the key the mixture builder and the held-out set leave quarantined rows out by."""

from __future__ import annotations

import json

from keyeflow.datasets import tables
from keyeflow.quality import gates


def _sample(sample_id: str, modality: str, media_ids: list[str], vision: int) -> dict:
    return {
        "sample_id": sample_id,
        "source": "captions",
        "task": "caption",
        "modality": modality,
        "num_tokens": 10 + vision,
        "num_text_tokens": 10,
        "num_vision_tokens": vision,
        "media_ids": media_ids,
        "source_uri": f"/data/it's here/captions.jsonl#L{sample_id}",
        "content_hash": "c" * 64,
        "config_hash": "samplescfg",
        "messages": json.dumps([]),
        "created_at": tables.now(),
    }


def test_sample_using_gated_media_is_quarantined_by_its_source_uri(home):
    video_id, config_hash = "ab" * 32, "cfg0123456789abc"
    gated_media = f"{video_id[:16]}-{config_hash}"
    tables.upsert(
        "train_samples",
        [
            _sample("1", "video", [gated_media], 49),
            _sample("2", "video", [f"{'cd' * 8}-{config_hash}"], 49),
            _sample("3", "text", [], 0),
        ],
    )
    reason = "gate video_samples: timestamps strictly increase [expect_column_values_to_be_in_set] x=False"
    tables.upsert(
        "quarantine",
        [tables.quarantine_row("/v/a.mp4", reason, gates.gate_stage("video_samples"), video_id, config_hash)]
        # A duplicate file quarantined at ingest with the same content hash does not make its media unusable.
        + [tables.quarantine_row("/v/copy.mp4", "duplicate content", "ingest", "cd" * 32)],
    )

    strict = gates.check_train_samples(tables.ref("train_samples"))
    assert not strict.passed and strict.num_failing_rows == 1 and gates.quarantine_rows(strict) == []

    result = gates.check_train_samples(tables.ref("train_samples"), max_failing_share=0.5)
    assert result.passed
    rows = gates.quarantine_rows(result)
    assert [(r["uri"], r["stage"]) for r in rows] == [
        ("/data/it's here/captions.jsonl#L1", "gate:train_samples")
    ]
    assert rows[0]["reason"] == (
        "gate train_samples: no media sample a gate quarantined [expect_column_values_to_be_in_set] "
        "uses_quarantined_media=True"
    )
