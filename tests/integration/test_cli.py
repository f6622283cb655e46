"""The `keyeflow` command in process (typer's runner): slowfast, sql, tables."""

from __future__ import annotations

import io
import json

import pandas as pd
from typer.testing import CliRunner

from keyeflow.cli import app
from keyeflow.datasets import ingest, pretokenize, tables
from keyeflow.datasets.slowfast import allocate_tokens, resolve_config, select_frames
from keyeflow.datasets.video import content_hash, probe

runner = CliRunner()


def test_slowfast_json_matches_the_python_api(home, sample_videos):
    clip = str(sample_videos[0])
    result = runner.invoke(app, ["slowfast", clip, "--preset", "keye-vl-utils", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)

    config = resolve_config("keye-vl-utils")
    info = probe(clip, clip, content_hash(clip)[1])
    frames = pretokenize.sample_frames(info, clip, config)
    types = select_frames(frames.frames, preset="keye-vl-utils")
    slow, fast, total = allocate_tokens(types, info.height, info.width, preset="keye-vl-utils")[:3]
    assert out["frame_types"] == ["slow" if t == 0 else "fast" for t in types]
    assert out["timestamps"] == [round(float(t), 3) for t in frames.timestamps]
    # keye-vl-utils' stamps: frame index / the container's frame rate, at linspace-spread indices (0, 13, 27
    # of the clip's 25 fps frames), not multiples of 0.5 s.
    assert out["timestamps"][:3] == [0.0, 0.52, 1.08]
    assert (tuple(out["slow_size"]), tuple(out["fast_size"]), out["total_tokens"]) == (slow, fast, total)
    assert out["num_slow"] + out["num_fast"] == len(types) and out["token_budget"] == 65536


def test_slowfast_override_and_bad_input(home, sample_videos, bad_inputs):
    clip = str(sample_videos[0])
    out = json.loads(runner.invoke(app, ["slowfast", clip, "--set", "fps=1", "--json"]).output)
    assert out["timestamps"][:2] == [0.0, 1.0]
    bad = runner.invoke(app, ["slowfast", str(bad_inputs["text_as_mp4"])])
    assert bad.exit_code == 2 and "not a readable video container" in bad.output
    unknown = runner.invoke(app, ["slowfast", clip, "--set", "speed=3"])
    assert unknown.exit_code != 0 and "unknown SlowFastConfig override" in str(unknown.exception)


def test_sql_formats_and_errors(home, sample_videos, bad_inputs):
    uris = [str(p) for p in sample_videos[:3]] + [str(bad_inputs["zero_byte"])]
    ingest.ingest_shard(uris)
    query = "select count(*) as n, sum(case when width > 0 then 1 else 0 end) as sized from videos"

    as_json = runner.invoke(app, ["sql", query, "--format", "json"])
    assert json.loads(as_json.output) == [{"n": 3, "sized": 3}]
    as_csv = runner.invoke(app, ["sql", "select reason from quarantine", "--format", "csv"])
    assert pd.read_csv(io.StringIO(as_csv.output)).reason.tolist() == ["empty file (0 bytes)"]
    as_table = runner.invoke(app, ["sql", "select uri from videos order by uri"])
    assert as_table.exit_code == 0 and sample_videos[0].name[:10] in as_table.output

    broken = runner.invoke(app, ["sql", "select * from no_such_table"])
    assert broken.exit_code == 2 and "tables: quarantine, videos" in broken.output
    listing = runner.invoke(app, ["tables"])
    assert "videos" in listing.output and "quarantine" in listing.output
    assert tables.open_table("videos").count_rows() == 3
