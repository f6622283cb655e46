"""A file name with both quote characters, a newline and non-ASCII letters goes through `keyeflow ingest`,
`keyeflow sql` and `keyeflow lineage` intact: no query or filter is built by pasting it into a string."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from keyeflow import lineage
from keyeflow.cli import app
from keyeflow.datasets import mixture, tables

runner = CliRunner()

HOSTILE = 'it\'s "ok"\nété'


def test_hostile_name_through_ingest_sql_and_lineage(home, tmp_path, sample_videos, prefect_harness):
    folder = tmp_path / f"clips {HOSTILE}"
    folder.mkdir()
    clip = folder / f"{HOSTILE}.mp4"
    shutil.copy(min(sample_videos, key=lambda p: p.stat().st_size), clip)

    ingested = runner.invoke(app, ["ingest", str(folder), "--pretokenize-shard-size", "1"])
    assert ingested.exit_code == 0, ingested.output
    # Ingesting again finds the clip done (the keyed lookups by URI and hash match it exactly).
    again = runner.invoke(app, ["ingest", str(folder)])
    assert again.exit_code == 0, again.output
    assert tables.open_table("videos").count_rows() == 1

    query = "select v.uri, s.sample_id from videos v join video_samples s using (video_id)"
    found = runner.invoke(app, ["sql", query, "--format", "json"])
    assert found.exit_code == 0, found.output
    rows = json.loads(found.output)
    assert [r["uri"] for r in rows] == [str(clip)]

    # A checkpoint directory with the same hostile name, made by a run that trained on a mixture of it.
    sample_id = rows[0]["sample_id"]
    tables.upsert(
        "train_samples",
        [
            {
                "sample_id": "video-sample-1",
                "source": HOSTILE,
                "task": "caption",
                "modality": "video",
                "num_tokens": 10,
                "num_text_tokens": 2,
                "num_vision_tokens": 8,
                "media_ids": [sample_id],
                "source_uri": f"{folder}/captions.jsonl#L1",
                "content_hash": "0" * 64,
                "config_hash": "c",
                "messages": "[]",
                "created_at": tables.now(),
            }
        ],
    )
    mixed = mixture.fixed_mixture(tables.ref("train_samples"), {"video-sample-1": 1}, name=HOSTILE, stage=1)
    checkpoint = tmp_path / f"ckpt {HOSTILE}"
    checkpoint.mkdir()
    # A decoy whose name differs only where the quotes are: a filter that matched loosely would find it.
    decoy = tmp_path / "ckpt it_s _ok_\nété"
    decoy.mkdir()
    runs = {}
    for path in (checkpoint, decoy):
        run_id = lineage.start_run("stage-1", {"mixture_id": mixed.mixture_id})
        lineage.log_input(run_id, mixed.mixture)
        lineage.set_tags(run_id, {lineage.CHECKPOINT_TAG: str(path)})
        lineage.end_run(run_id)
        runs[path] = run_id

    for path in (checkpoint, decoy):
        traced = runner.invoke(app, ["lineage", str(path), "--json"])
        assert traced.exit_code == 0, traced.output
        chain = json.loads(traced.output)
        assert chain["run_id"] == runs[path] and chain["checkpoint"] == str(path)
        assert chain["sources"]["videos"] == [str(clip)]
    shown = runner.invoke(app, ["lineage", str(checkpoint)])
    assert shown.exit_code == 0 and runs[checkpoint] in shown.output


def test_tag_filter_quotes_each_value_it_can_and_matches_the_rest_exactly(home):
    assert lineage.tag_filter("k", "it's") == 'tags.`k` = "it\'s"'
    assert lineage.tag_filter("k", 'say "hi"') == "tags.`k` = 'say \"hi\"'"
    assert lineage.tag_filter("k", "a'b\"c\\d") == "tags.`k` LIKE 'a_b_c_d'"
    ids = {}
    for value in ("a'b\"c\\d", "a_b_c_d", "axbxcxd", "it's", "été\n"):
        ids[value] = lineage.start_run("probe", tags={"probe": value})
    for value, run_id in ids.items():
        assert [r.info.run_id for r in lineage.runs_with_tag("probe", value)] == [run_id]
