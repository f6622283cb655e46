"""SIGKILL the real `keyeflow ingest` mid-run, rerun it: the tables hold exactly an uninterrupted run's
rows."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
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


def cli(home: Path, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """The real `keyeflow` command in `home`; with `kill`, SIGKILLed by itself at that kill point."""
    env = {k: v for k, v in os.environ.items() if k != "KEYEFLOW_KILL_POINT"}
    env |= {"KEYEFLOW_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if kill:
        env["KEYEFLOW_KILL_POINT"] = kill
    # Its own process group, stderr to a file: a killed CLI leaves its ephemeral Prefect server behind, which
    # would hold a pipe open (and the test waiting) until it is stopped with the rest of the group.
    home.mkdir(parents=True, exist_ok=True)
    with (home / "cli.err").open("w+b") as err:
        proc = subprocess.Popen(
            [KEYEFLOW, *args], env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, returncode, None, err.read())


def count(root: Path, name: str) -> int:
    path = root / "tables" / f"{name}.lance"
    return lance.dataset(str(path)).count_rows() if path.exists() else 0


ARGS = ["--shard-size", "2", "--pretokenize-shard-size", "1"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory, sample_videos, bad_inputs) -> Path:
    """conftest's mixed_batch (every sample, every bad input, one renamed copy), once for the module: the
    reference and the crashed runs must read the same paths."""
    folder = tmp_path_factory.mktemp("crash-batch")
    for path in sample_videos:
        shutil.copy(path, folder / path.name)
    for path in bad_inputs.values():
        if path.is_symlink():
            (folder / path.name).symlink_to(os.readlink(path))
        else:
            shutil.copy(path, folder / path.name)
    shutil.copy(sample_videos[0], folder / f"copy of {sample_videos[0].name}")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, batch) -> Path:
    """One uninterrupted ingest, shared by every kill point."""
    root = tmp_path_factory.mktemp("crash-reference") / "home"
    done = cli(root, "ingest", str(batch), *ARGS)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    [
        # Ingestion proper: the second shard's quarantine rows committed, its videos not; shards 3.. pending.
        "ingest.quarantine_committed@2",
        # Pre-tokenisation: the first video's frames and sample committed, the others pending.
        "pretokenize.shard_committed@1",
    ],
)
def test_sigkill_mid_ingest_then_rerun_matches_uninterrupted(tmp_path, batch, reference, point):
    # Killed by a named kill point (keyeflow.faults), not by polling table versions: the process dies after
    # exactly the same writes however busy the machine is.
    crashed = tmp_path / "crashed"
    done = cli(crashed, "ingest", str(batch), *ARGS, kill=point)
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == -signal.SIGKILL, stderr[-3000:]
    assert f"keyeflow kill point {point.partition('@')[0]} " in stderr
    want = snapshot(reference)
    if point.startswith("ingest."):
        assert count(crashed, "videos") < len(want["videos"]) and count(crashed, "video_samples") == 0
    else:
        assert count(crashed, "videos") == len(want["videos"])
        assert 1 <= count(crashed, "video_samples") < len(want["video_samples"]), "kill came too late"

    done = cli(crashed, "ingest", str(batch), *ARGS)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert snapshot(crashed) == want
