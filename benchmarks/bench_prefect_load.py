"""Orchestration overhead at load: ingesting thousands of videos through a real Prefect server against the
same domain work called directly, side by side in one run.

    python benchmarks/bench_prefect_load.py [--num-videos 2000] [--shard-size 16] [--repeats 1]
        [--untagged-shards]

Starts `prefect server start` on a free 127.0.0.1 port with its own PREFECT_HOME (SQLite), then:
  direct:  the flow's domain work with no Prefect at all: plan_shards, ingest_shard per shard, the videos
           gate and its record, the MLflow lineage run (keyeflow.datasets / quality / lineage functions);
  prefect: the `ingest_videos` flow itself, its flow and task runs recorded on that server (one task run
           per shard, progress artifacts, logs), in this process as `python -c "ingest_videos(...)"` would.
Each side ingests into a fresh data root, so both do all the work. The clips are a few tiny H.264 MP4s
made by ffmpeg, copied with a distinct MP4 `free` box appended to each copy: every file is a valid video
with its own content hash, so each is hashed, probed with ffprobe and registered. Times are wall seconds
(the server is a separate process on the same cores, so its CPU counts against the flow as it would on a
laptop); the server's own CPU time during the flow is printed too. The flow must complete (a thread with
a deadline catches a stall) and register every clip. Target: overhead < 10 %.

`--untagged-shards` adds a third side, a diagnosis: the same flow with its shard task's tags removed in
this process. A task with tags makes Prefect ask the server for tag-concurrency slots before it runs;
on the SQLite-backed server that request is sometimes answered 503 (database busy) and retried 2 s later.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_CLIPS = [  # lavfi source, size: four tiny clips of a few frames (different content and frame size)
    ("testsrc2", "160x120"),
    ("smptebars", "128x96"),
    ("mandelbrot", "96x96"),
    ("rgbtestsrc", "120x160"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_clips(dest: Path, num_videos: int) -> list[Path]:
    """num_videos valid MP4s with distinct bytes: a few ffmpeg clips, each copy with its own `free` box."""
    base_dir = dest / "base"
    base_dir.mkdir(parents=True)
    bases = []
    for name, size in BASE_CLIPS:
        path = base_dir / f"{name}.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-nostdin",
                "-y",
                "-f",
                "lavfi",
                "-i",
                f"{name}=s={size}:r=10",
                "-frames:v",
                "5",
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-pix_fmt",
                "yuv420p",
                str(path),
            ],
            check=True,
        )
        bases.append(path.read_bytes())
    clips_dir = dest / "clips"
    clips_dir.mkdir()
    paths = []
    for i in range(num_videos):
        # A top-level `free` box is valid anywhere in an MP4 and ignored by demuxers.
        payload = f"keyeflow bench clip {i:06d}".encode()
        path = clips_dir / f"clip_{i:06d}.mp4"
        path.write_bytes(bases[i % len(bases)] + struct.pack(">I", 8 + len(payload)) + b"free" + payload)
        paths.append(path)
    return paths


def start_server(prefect_home: Path, port: int, log: Path) -> subprocess.Popen:
    env = os.environ | {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    import httpx

    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"prefect server not healthy after 120 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    """End the server's whole process group (it was started in its own session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def use_home(home: Path) -> None:
    """A fresh data root whose MLflow store already exists (as for a nightly ingest), so creating MLflow's
    SQLite schema (seconds) is not timed on either side."""
    os.environ["KEYEFLOW_HOME"] = str(home)
    from keyeflow import lineage

    lineage.experiment_id()


SHARD_SECONDS: list[float] = []  # each ingest_shard call of the direct side


def direct(paths: list[str], shard_size: int) -> dict:
    """What ingest_videos does, minus Prefect: the same domain calls in the same order."""
    from keyeflow import lineage
    from keyeflow.datasets import ingest, tables
    from keyeflow.quality import gates

    run_id = lineage.start_run("ingest-videos", {"paths": paths, "shard_size": shard_size})
    shards = ingest.plan_shards(paths, ingest.IngestConfig(shard_size=shard_size))
    reports = []
    for shard in shards:
        s0 = time.perf_counter()
        reports.append(ingest.ingest_shard(shard).to_dict())
        SHARD_SECONDS.append(time.perf_counter() - s0)
    totals = {
        k: sum(r[k] for r in reports)
        for k in ("num_seen", "num_ingested", "num_already_present", "num_duplicates", "num_quarantined")
    }
    videos, quarantine = tables.ref("videos"), tables.ref("quarantine")
    lineage.log_metrics(run_id, totals)
    for ref in (videos, quarantine):
        lineage.log_output(run_id, ref)
    result = gates.check_videos(videos)
    lineage.log_dict(run_id, result.to_dict(), f"gates/{result.gate}.json")
    lineage.log_text(run_id, result.markdown(), f"gates/{result.gate}.md")
    lineage.set_tags(run_id, {f"keyeflow.gate.{result.gate}": "passed" if result.passed else "failed"})
    gates.record(result, videos, run_id)
    result.raise_if_failed()
    lineage.end_run(run_id)
    return totals


def through_prefect(paths: list[str], shard_size: int, timeout_s: float) -> tuple[dict, str]:
    """The flow, recorded on the server; a thread with a deadline so a stalled run fails the benchmark."""
    from keyeflow.flows.video import ingest_videos

    box: dict = {}

    def target() -> None:
        try:
            box["state"] = ingest_videos(paths, shard_size=shard_size, return_state=True)
        except BaseException as error:  # noqa: BLE001 - reported below
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise SystemExit(f"the flow stalled: not finished after {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    state = box["state"]
    if not state.is_completed():
        raise SystemExit(f"the flow ended {state.type.value}: {state.message}")
    return state.result(), str(state.state_details.flow_run_id)


@contextlib.contextmanager
def untagged_shards(active: bool) -> Iterator[None]:
    """For the diagnostic side only: the flow's shard task without its tags (the flow looks the task up on
    its module at call time). A task with tags makes Prefect acquire tag-concurrency slots on the server
    before it runs; the untagged run shows what that costs."""
    if not active:
        yield
        return
    from keyeflow.tasks import video

    original = video.ingest_shard
    untagged = original.with_options()
    untagged.tags = (
        set()
    )  # with_options(tags=set()) would keep the old tags: an empty set reads as "not given"
    video.ingest_shard = untagged
    try:
        yield
    finally:
        video.ingest_shard = original


def server_record(flow_run_id: str) -> tuple[str, int, float]:
    """The flow run's final state, its number of task runs and the seconds its shard tasks ran, as the
    server has them."""
    import httpx

    api = os.environ["PREFECT_API_URL"]
    state = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()["state"]["type"]
    task_runs: list[dict] = []
    while True:
        page = (
            httpx.post(
                f"{api}/task_runs/filter",
                json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200, "offset": len(task_runs)},
                timeout=30,
            )
            .raise_for_status()
            .json()
        )
        task_runs += page
        if len(page) < 200:
            break
    shards = [t["total_run_time"] for t in task_runs if t["task_key"].startswith("ingest_shard")]
    return state, len(task_runs), sum(shards)


def drain_prefect() -> None:
    """Send the logs and events still queued in this process, before the server goes away."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def cpu_of(process) -> float:
    """CPU seconds of a process and its live children (psutil)."""
    import psutil

    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a child that just ended
            times = p.cpu_times()
            total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-videos", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=16, help="the flow's shard size (its default: 16)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per side, alternating which side goes first"
    )
    parser.add_argument(
        "--untagged-shards",
        action="store_true",
        help="also run the flow with its shard tasks untagged (diagnosis: a task with tags asks the "
        "server for tag-concurrency slots)",
    )
    parser.add_argument("--timeout-s", type=float, default=1800, help="the flow counts as stalled after this")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    port = free_port()
    # Before prefect is imported: this process's flows talk to the server started below.
    os.environ |= {
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    server = None
    try:
        t0 = time.perf_counter()
        clips = make_clips(tmp / "media", args.num_videos)
        print(
            f"{len(clips)} clips ({sum(p.stat().st_size for p in clips) / 1e6:.1f} MB) made in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        server = start_server(tmp / "prefect-home", port, tmp / "server.log")
        print(f"prefect server healthy on 127.0.0.1:{port} after {time.perf_counter() - t0:.1f} s")
        import psutil

        server_process = psutil.Process(server.pid)

        # Warm up both sides (imports, Great Expectations, MLflow's SQLite schema, the Prefect client) on a
        # few other clips, so neither side pays one-off start-up costs inside the measurement.
        warm = tmp / "media" / "warm"
        warm.mkdir()
        for p in clips[:4]:
            shutil.copy(p, warm / p.name)
        use_home(tmp / "warm-direct")
        direct([str(warm)], args.shard_size)
        use_home(tmp / "warm-prefect")
        through_prefect([str(warm)], args.shard_size, args.timeout_s)

        paths = [str(tmp / "media" / "clips")]
        sides = ["direct", "prefect"] + (["prefect-untagged"] if args.untagged_shards else [])
        times: dict[str, list[float]] = {side: [] for side in sides}
        shard_s: dict[str, list[float]] = {side: [] for side in sides}  # time inside the shards
        records: dict[str, list[tuple]] = {side: [] for side in sides[1:]}
        server_cpu: dict[str, list[float]] = {side: [] for side in sides[1:]}
        for r in range(args.repeats):
            for side in sides if r % 2 == 0 else sides[::-1]:
                use_home(tmp / f"home-{side}-{r}")
                if side == "direct":
                    SHARD_SECONDS.clear()
                    w0 = time.perf_counter()
                    totals = direct(paths, args.shard_size)
                    times[side].append(time.perf_counter() - w0)
                    shard_s[side].append(sum(SHARD_SECONDS))
                else:
                    s0, w0 = cpu_of(server_process), time.perf_counter()
                    with untagged_shards(side == "prefect-untagged"):
                        totals, flow_run_id = through_prefect(paths, args.shard_size, args.timeout_s)
                    times[side].append(time.perf_counter() - w0)
                    server_cpu[side].append(cpu_of(server_process) - s0)
                    records[side].append(server_record(flow_run_id))
                    shard_s[side].append(records[side][-1][2])
                if totals["num_ingested"] != args.num_videos or totals["num_quarantined"]:
                    raise SystemExit(f"{side}: expected {args.num_videos} ingested, got {totals}")
                from keyeflow.datasets import tables

                assert tables.open_table("videos").count_rows() == args.num_videos
                print(f"  run {r + 1} {side:16s} {times[side][-1]:7.1f} s")
        drain_prefect()
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.num_videos
    num_shards = -(-n // args.shard_size)
    mean = {side: sum(v) / len(v) for side, v in times.items()}
    inside = {side: sum(v) / len(v) for side, v in shard_s.items()}
    labels = {
        "direct": "direct (domain functions)",
        "prefect": "prefect (the flow, real server)",
        "prefect-untagged": "prefect, shard tasks untagged",
    }
    print(
        f"\ningest {n} videos in {num_shards} shards of {args.shard_size}, one after another "
        "(hash + ffprobe + "
        f"Lance commits per shard), mean of {args.repeats} run(s) per side; wall seconds"
    )
    print(
        f"{'side':32s} {'wall s':>7s} {'ms/video':>9s} {'overhead':>9s} "
        f"{'in shards s':>12s} {'outside s':>10s}"
    )
    for side in sides:
        overhead = "" if side == "direct" else f"{100 * (mean[side] / mean['direct'] - 1):+8.1f}%"
        print(
            f"{labels[side]:32s} {mean[side]:7.1f} {1000 * mean[side] / n:9.2f} {overhead:>9s} "
            f"{inside[side]:12.1f} {mean[side] - inside[side]:10.1f}"
        )
    print(
        f"orchestration overhead of the flow: {100 * (mean['prefect'] / mean['direct'] - 1):+.1f} % "
        f"(target < 10 %), {1000 * (mean['prefect'] - mean['direct']) / num_shards:+.0f} ms per shard task"
    )
    for side in sides[1:]:
        states = sorted({rec[0] for rec in records[side]})
        print(
            f"{side}: flow runs {', '.join(states)} on the server, {records[side][0][1]} task runs recorded, "
            f"server CPU during the flow {sum(server_cpu[side]) / len(server_cpu[side]):.1f} s"
        )
    print(
        "(in shards: direct = its ingest_shard calls; prefect = the shard task runs' run time on the server)"
    )


if __name__ == "__main__":
    main()
