"""`tables.compact` on real Lance tables: fragments merged, rows and readers untouched, a kill before its
commit harmless, a run with nothing to merge commits nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa

from keyeflow.datasets import pretokenize, tables


def _frames(group: str, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = [
        {
            "frame_id": f"{group}/{i:06d}",
            "sample_id": group,
            "frame_index": i,
            "grid_h": 2,
            "grid_w": 2,
            "patches": rng.integers(0, 256, 4 * 588, dtype=np.uint8).tobytes(),
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=tables.SCHEMAS["video_frames"])


def _write_shards() -> None:
    """Four appends, as pre-tokenisation shards make them, the last replacing a group of the first (a rerun
    after a crash): deleted rows in an old fragment."""
    tables.replace_groups(
        "video_frames", pa.concat_tables([_frames("v0", 3, 0), _frames("v1", 4, 1)]), "sample_id"
    )
    for k in (2, 3):
        tables.replace_groups("video_frames", _frames(f"v{k}", 3 + k, seed=k), "sample_id")
    tables.replace_groups("video_frames", _frames("v1", 4, seed=99), "sample_id")


def _rows(ds) -> dict:
    table = ds.to_table(columns=["frame_id", "sample_id", "frame_index", "patches"])
    return {r["frame_id"]: r for r in table.to_pylist()}


def test_compaction_merges_fragments_and_keeps_rows_and_pinned_readers(home):
    _write_shards()
    before = tables.open_table("video_frames")
    assert len(before.get_fragments()) == 4
    assert sum(1 for f in before.get_fragments() if f.metadata.deletion_file) == 1
    wanted = np.array([0, 2, 3, 7, 12, 14])
    taken = before.take(wanted, columns=["frame_id", "patches"]).to_pylist()

    version = pretokenize.compact_frames()
    after = tables.open_table("video_frames")
    assert version == after.version > before.version
    assert len(after.get_fragments()) == 1 and not after.get_fragments()[0].metadata.deletion_file
    assert _rows(after) == _rows(before)
    # Same order: row offsets computed on either version name the same rows.
    assert after.take(wanted, columns=["frame_id", "patches"]).to_pylist() == taken
    # A reader pinned before (a MediaReader holds its dataset and row offsets) still reads its version.
    assert before.take(wanted, columns=["frame_id", "patches"]).to_pylist() == taken
    assert after.schema.equals(tables.SCHEMAS["video_frames"], check_metadata=True)  # zstd, key marker kept

    # Nothing left to merge: no commit, the version stays.
    assert pretokenize.compact_frames() == after.version == tables.open_table("video_frames").version
    tables.replace_groups("video_frames", _frames("v9", 2, seed=9), "sample_id")
    assert len(tables.open_table("video_frames").get_fragments()) == 2
    pretokenize.compact_frames()
    assert len(tables.open_table("video_frames").get_fragments()) == 1


def test_fragment_size_bounds_the_merge(home):
    """A table over the byte target keeps fragments of about that size (not one), and those are not
    rewritten again by the next compaction."""
    for k in range(6):
        tables.replace_groups("video_frames", _frames(f"v{k}", 4, seed=k), "sample_id")
    one = tables.open_table("video_frames").get_fragments()[0]
    size = sum(f.file_size_bytes for f in one.metadata.files)
    tables.compact("video_frames", fragment_bytes=2 * size)  # about two appends per fragment
    ds = tables.open_table("video_frames")
    assert 2 <= len(ds.get_fragments()) <= 4 and ds.count_rows() == 24
    assert tables.compact("video_frames", fragment_bytes=2 * size) == ds.version


CHILD = textwrap.dedent(
    """
    from keyeflow.datasets import pretokenize
    pretokenize.compact_frames()
    """
)


def test_compaction_killed_before_its_commit_leaves_the_table_and_the_rerun_compacts(home):
    _write_shards()
    before = tables.open_table("video_frames")
    rows = _rows(before)
    env = {**os.environ, "KEYEFLOW_HOME": str(home), "KEYEFLOW_KILL_POINT": "table.compact.rewritten"}
    killed = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "keyeflow kill point table.compact.rewritten" in killed.stderr
    # Died holding the lock with the merged files written: the table is as it was (the lock freed).
    now = tables.open_table("video_frames")
    assert now.version == before.version and len(now.get_fragments()) == 4
    assert _rows(now) == rows

    env.pop("KEYEFLOW_KILL_POINT")
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    now = tables.open_table("video_frames")
    assert len(now.get_fragments()) == 1 and _rows(now) == rows
