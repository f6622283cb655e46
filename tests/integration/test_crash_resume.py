"""SIGKILL the real `keyeflow ingest` mid-run, rerun it: the tables hold exactly an uninterrupted run's
rows."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import pytest

KEYEFLOW = str(Path(sys.executable).parent / "keyeflow")

# Row content that must match; times of writing naturally differ between runs.
COMPARE = {
    "videos": ("video_id", ["uri", "size_bytes", "codec", "width", "height", "fps", "duration_s"]),
    "video_samples": (
        "sample_id",
        [
            "video_id",
            "uri",
            "config_hash",
            "frame_types",
            "timestamps",
            "slow_height",
            "slow_width",
            "fast_height",
            "fast_width",
            "total_tokens",
        ],
    ),
    "video_frames": ("frame_id", ["sample_id", "frame_index", "frame_type", "grid_h", "grid_w", "patches"]),
    "quarantine": ("quarantine_id", ["uri", "reason", "stage"]),
}


def snapshot(root: Path) -> dict:
    out = {}
    for name, (key, columns) in COMPARE.items():
        rows = (
            lance.dataset(str(root / "tables" / f"{name}.lance"))
            .to_table(columns=[key, *columns])
            .to_pylist()
        )
        digest = {}
        for row in rows:
            assert row[key] not in digest, f"duplicate {name} row {row[key]}"
            if "patches" in row:
                row["patches"] = hashlib.sha256(row["patches"]).hexdigest()
            digest[row[key]] = row
        out[name] = digest
    return out


def cli(home: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "KEYEFLOW_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.Popen(
        [KEYEFLOW, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **kwargs,
    )


def versions(root: Path, name: str) -> int:
    try:
        return lance.dataset(str(root / "tables" / f"{name}.lance")).version
    except (ValueError, OSError):
        return 0


@pytest.mark.slow
def test_sigkill_mid_ingest_then_rerun_matches_uninterrupted(tmp_path, mixed_batch):
    args = ["ingest", str(mixed_batch), "--shard-size", "2", "--pretokenize-shard-size", "1"]

    reference = tmp_path / "reference"
    proc = cli(reference, *args)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    crashed = tmp_path / "crashed"
    proc = cli(crashed, *args)
    # Kill as soon as the first video's frames are committed: mid pre-tokenisation, other shards pending.
    deadline = time.monotonic() + 300
    while versions(crashed, "video_frames") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = lance.dataset(str(crashed / "tables" / "video_samples.lance")).count_rows()
    assert partial < len(snapshot(reference)["video_samples"]), "kill came too late to be mid-run"

    proc = cli(crashed, *args)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    assert snapshot(crashed) == snapshot(reference)
