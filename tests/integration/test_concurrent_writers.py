"""Several processes writing one data root at once: every key ends up in its table exactly once.

Processes are real (``subprocess``), start their writes together (each blocks on its stdin until the test
has seen all of them ready, then the test releases them at once) and write real Lance tables.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from keyeflow import lineage
from keyeflow.datasets import tables

NUM_WRITERS = 4
ROUNDS = 5

# Each writer: upserts overlapping keys into `quarantine` (insert-only keyed writes), rewrites overlapping
# rows of `longcot_reviews` (keyed updates), and replaces overlapping frame groups of `video_frames`
# (delete + append; every writer the same groups), all several times, released together by a line on stdin.
WRITER = textwrap.dedent(
    """
    import sys
    import pyarrow as pa
    from keyeflow.datasets import tables

    writer = int(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    for round_ in range(int(sys.argv[2])):
        keys = range(writer * 5 + round_, writer * 5 + round_ + 12)
        tables.upsert("quarantine", [tables.quarantine_row(f"file-{k}", "bad", "ingest") for k in keys])
        reviews = [
            {"review_id": f"review-{k}", "path_id": f"path-{k}", "note": f"writer {writer}"} for k in keys
        ]
        tables.update_rows("longcot_reviews", reviews)
        frames = [
            {"frame_id": f"sample-{g}/{i}", "sample_id": f"sample-{g}", "frame_index": i}
            for g in range(round_, round_ + 3)
            for i in range(4)
        ]
        tables.replace_groups(
            "video_frames", pa.Table.from_pylist(frames, schema=tables.SCHEMAS["video_frames"]), "sample_id"
        )
    print("done", flush=True)
    """
)


def _release_together(commands: list[list[str]], env: dict) -> list[subprocess.Popen]:
    """Start every process, wait until each says it is ready, then let them all go at once."""
    processes = [
        subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for cmd in commands
    ]
    for p in processes:
        assert p.stdout.readline().strip() == "ready"
    for p in processes:
        p.stdin.write("go\n")
        p.stdin.flush()
    return processes


def _keys(home: Path, name: str) -> list[str]:
    ds = lance.dataset(str(home / "tables" / f"{name}.lance"))
    return ds.to_table(columns=[tables.PRIMARY_KEYS[name]]).column(0).to_pylist()


def test_concurrent_writers_keep_every_key_once(home):
    env = {**os.environ, "KEYEFLOW_HOME": str(home), "OMP_NUM_THREADS": "1"}
    processes = _release_together(
        [[sys.executable, "-c", WRITER, str(w), str(ROUNDS)] for w in range(NUM_WRITERS)], env
    )
    for p in processes:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "done"

    expected = {
        "quarantine": {
            tables.quarantine_row(f"file-{k}", "bad", "ingest")["quarantine_id"]
            for w in range(NUM_WRITERS)
            for r in range(ROUNDS)
            for k in range(w * 5 + r, w * 5 + r + 12)
        },
        "longcot_reviews": {
            f"review-{k}"
            for w in range(NUM_WRITERS)
            for r in range(ROUNDS)
            for k in range(w * 5 + r, w * 5 + r + 12)
        },
        "video_frames": {
            f"sample-{g}/{i}"
            for w in range(NUM_WRITERS)
            for r in range(ROUNDS)
            for g in range(r, r + 3)
            for i in range(4)
        },
    }
    for name, keys in expected.items():
        found = Counter(_keys(home, name))
        assert {k: n for k, n in found.items() if n > 1} == {}, f"{name}: duplicate keys"
        assert set(found) == keys, name


def test_primary_key_is_marked_for_lance(home):
    """New tables carry Lance's unenforced-primary-key marker: on an object store, where there is no
    lock, it is what makes Lance detect two writers inserting one key."""
    tables.upsert("quarantine", [tables.quarantine_row("a", "bad", "ingest")])
    field = tables.open_table("quarantine").schema.field("quarantine_id")
    assert field.metadata == {b"lance-schema:unenforced-primary-key": b"true"}
    assert not field.nullable


def test_table_made_before_the_key_marker_still_takes_writes(home):
    """A data root written by an older keyeflow (nullable key, no marker) keeps working."""
    legacy = pa.schema([f.with_nullable(True).remove_metadata() for f in tables.SCHEMAS["quarantine"]])
    lance.write_dataset(legacy.empty_table(), tables.table_uri("quarantine"))
    rows = [tables.quarantine_row(f"file-{k}", "bad", "ingest") for k in range(3)]
    tables.upsert("quarantine", rows)
    tables.upsert("quarantine", rows)
    assert sorted(_keys(home, "quarantine")) == sorted(r["quarantine_id"] for r in rows)


KEYEFLOW = str(Path(sys.executable).parent / "keyeflow")


def _text_samples(n: int) -> list[dict]:
    return [
        {
            "sample_id": f"text-{k:03d}",
            "source": "corpus",
            "task": "text",
            "modality": "text",
            "num_tokens": 100 + k,
            "num_text_tokens": 100 + k,
            "num_vision_tokens": 0,
            "media_ids": [],
            "source_uri": f"corpus.txt#L{k}",
            "content_hash": f"{k:064x}",
            "config_hash": "c",
            "messages": "[]",
            "created_at": tables.now(),
        }
        for k in range(n)
    ]


@pytest.mark.slow
def test_two_ingests_and_a_mix_at_once(home, tmp_path, sample_videos):
    """Two `keyeflow ingest` over overlapping folders (one clip in both, under another name too) and a
    `keyeflow mix`, all started together on one data root: all succeed, every row is there once."""
    by_name = {p.name: p for p in sample_videos}
    first, shared, second = (
        by_name["solid_colors_640x480_mpeg4_25fps.mp4"],
        by_name["life_320x240_h264_12fps.mp4"],
        by_name["zoom_640x360_h264_60fps.mp4"],
    )
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    folder_a.mkdir()
    folder_b.mkdir()
    shutil.copy(first, folder_a / first.name)
    shutil.copy(shared, folder_a / shared.name)
    shutil.copy(shared, folder_b / f"copy of {shared.name}")
    shutil.copy(second, folder_b / second.name)
    tables.upsert("train_samples", _text_samples(40))

    env = {**os.environ, "KEYEFLOW_HOME": str(home), "OMP_NUM_THREADS": "1"}
    ingest = ["ingest", "--shard-size", "1", "--pretokenize-shard-size", "1"]
    commands = {
        "ingest a": [KEYEFLOW, *ingest, str(folder_a)],
        "ingest b": [KEYEFLOW, *ingest, str(folder_b)],
        "mix": [
            KEYEFLOW,
            "mix",
            "--stage",
            "3",
            "--set",
            'target_shares={"text": 1.0}',
            "--set",
            "tasks=null",
        ],
    }
    processes = {
        name: subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    for name, p in processes.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name} failed:\n{err[-4000:]}"

    for name in tables.list_tables():
        found = Counter(_keys(home, name))
        assert {k: n for k, n in found.items() if n > 1} == {}, f"{name}: duplicate keys"

    contents = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, shared, second)}
    assert set(_keys(home, "videos")) == contents
    samples = tables.open_table("video_samples").to_table(columns=["sample_id", "video_id", "num_frames"])
    assert sorted(samples.column("video_id").to_pylist()) == sorted(contents)
    frames = Counter(
        tables.open_table("video_frames").to_table(columns=["sample_id"]).column("sample_id").to_pylist()
    )
    assert frames == dict(
        zip(samples.column("sample_id").to_pylist(), samples.column("num_frames").to_pylist())
    )

    mixture = tables.open_table("mixtures").to_table(columns=["sample_id", "repeats"]).to_pylist()
    assert sorted(r["sample_id"] for r in mixture) == [s["sample_id"] for s in _text_samples(40)]

    runs = lineage.client().search_runs([lineage.experiment_id()])
    kinds = Counter(r.data.tags["keyeflow.kind"] for r in runs)
    assert kinds["video-pipeline"] == 2 and kinds["mixture-stage-3"] == 1, kinds
    assert {r.info.status for r in runs} == {"FINISHED"}
