"""A write that fails inside a commit (the disk refuses the data file, the process dies) leaves the table
readable at its previous version, and running the write again completes it with every row once.

The failures are real: a writer process whose file-size limit (RLIMIT_FSIZE) is below its data file gets
"File too large" from the kernel inside Lance's writer, as it would get "No space left on device" from a full
disk; a writer killed at a named kill point (`keyeflow.faults`) dies holding the table's lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from keyeflow.datasets import tables

# The child writes frames (1 MB of random patches each: incompressible) or quarantine rows, with optional
# limits.
CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    import pyarrow as pa
    from keyeflow.datasets import tables

    kind, group, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        if kind == "frames":
            rows = [
                {"frame_id": f"{group}/{i}", "sample_id": group, "frame_index": i,
                 "patches": os.urandom(2**20)}
                for i in range(4)
            ]
            data = pa.Table.from_pylist(rows, schema=tables.SCHEMAS["video_frames"])
            tables.replace_groups("video_frames", data, "sample_id")
        else:
            tables.upsert("quarantine", [tables.quarantine_row(f"{group}-{i}", os.urandom(100_000).hex(), "x")
                                         for i in range(8)])
    except OSError as exc:
        print("write failed:", exc, flush=True)
        sys.exit(3)
    """
)


def _write(
    home, kind: str, group: str, limit: int = 0, kill: str | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEYEFLOW_HOME": str(home)}
    env.pop("KEYEFLOW_KILL_POINT", None)
    if kill:
        env["KEYEFLOW_KILL_POINT"] = kill
    return subprocess.run(
        [sys.executable, "-c", CHILD, kind, group, str(limit)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _state(name: str) -> tuple[int, Counter]:
    ds = tables.open_table(name)
    key = tables.PRIMARY_KEYS[name]
    return ds.version, Counter(ds.to_table(columns=[key]).column(0).to_pylist())


@pytest.mark.parametrize("kind,name", [("frames", "video_frames"), ("quarantine", "quarantine")])
def test_write_refused_by_the_disk_keeps_the_previous_version_and_a_rerun_completes(home, kind, name):
    assert _write(home, kind, "first").returncode == 0
    version, before = _state(name)

    failed = _write(home, kind, "second", limit=256 * 1024)
    assert failed.returncode == 3 and "File too large" in failed.stdout, failed.stdout + failed.stderr
    assert _state(name) == (version, before)  # the same version, the same rows, still readable

    assert _write(home, kind, "second").returncode == 0
    new_version, after = _state(name)
    assert new_version > version and set(after.values()) == {1}
    assert len(after) == 2 * len(before) and set(before) <= set(after)


def test_writer_killed_inside_a_commit_leaves_a_readable_table_and_the_rerun_completes(home):
    assert _write(home, "frames", "first").returncode == 0
    version, before = _state("video_frames")

    # Killed holding the lock, keys checked, before its commit: nothing of it is in the table.
    killed = _write(home, "quarantine", "q", kill="table.commit")
    assert killed.returncode == -9, killed.stderr
    assert not tables.exists("quarantine") or tables.open_table("quarantine").count_rows() == 0

    # Killed between clearing a group and appending its new rows: the table is readable at every version;
    # the latest lacks the group until the rerun puts it back, once. The lock died with the process.
    killed = _write(home, "frames", "first", kill="table.replace.deleted")
    assert killed.returncode == -9, killed.stderr
    assert _state("video_frames")[1] == Counter()
    assert tables.open_table("video_frames", version=version).to_table().num_rows == sum(before.values())

    assert _write(home, "frames", "first").returncode == 0
    assert _write(home, "quarantine", "q").returncode == 0
    assert _state("video_frames")[1] == before
    assert set(_state("quarantine")[1].values()) == {1} and len(_state("quarantine")[1]) == 8
