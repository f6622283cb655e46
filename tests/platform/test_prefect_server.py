"""The platform as a team runs it: a real `prefect server start`, the `keyeflow-local` process work pool,
every deployment of prefect.yaml deployed with `prefect deploy --all`, a process worker, and runs triggered
on that server: ingest-videos on two generated clips, then LongCoT paused for human review and resumed
through the server's API with a person's decisions. Every process listens on 127.0.0.1 only, and each is
ended with its whole process group (and the flow-run processes the worker started) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import httpx
import pyarrow.compute as pc
import pytest
import yaml

from keyeflow.datasets import sql, tables
from keyeflow.synthetic import synthetic_teacher as teacher_server
from keyeflow.synthetic.longcot_questions import generate_longcot_questions

REPO = Path(__file__).resolve().parents[2]
POOL = "keyeflow-local"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


@dataclass
class Platform:
    api_url: str
    env: dict[str, str]  # what the CLI, the worker and its flow runs see
    home: Path  # the worker's KEYEFLOW_HOME
    logs: Path

    def prefect(self, *args: str, timeout: float = 120) -> str:
        """Run the prefect CLI as a person would, from the repository root; returns its output."""
        result = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            check=False,
            cwd=REPO,
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
            start_new_session=True,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, (
            f"prefect {' '.join(args)} exited {result.returncode}:\n{output[-4000:]}"
        )
        return output

    @contextlib.contextmanager
    def client(self) -> Iterator:
        """A sync Prefect client for this server, whatever else (the test harness) this process is set up
        for; Prefect calls inside the block (``resume_flow_run``) talk to this server too."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with (
            temporary_settings(updates={PREFECT_API_URL: self.api_url}),
            get_client(sync_client=True) as client,
        ):
            yield client


def _spawn(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen, grace_s: float = 10) -> None:
    """End a process we started, its process group and every process below it (flow runs a worker started
    may sit in sessions of their own)."""
    import psutil

    try:
        below = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace_s)
    for child in below:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Platform:
    root = tmp_path_factory.mktemp("platform")
    logs = root / "logs"
    logs.mkdir()
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KEYEFLOW_"))}
    env |= {
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick runs up within a second (default 10 s)
        "KEYEFLOW_HOME": str(root / "home"),
        "KEYEFLOW_REPO": str(REPO),  # the pull step's working directory
    }
    processes: list[subprocess.Popen] = []
    try:
        server = _spawn(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            logs / "server.log",
            env,
        )
        processes.append(server)
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"server exited {server.returncode}:\n{_tail(logs / 'server.log')}"
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not healthy in 90 s:\n{_tail(logs / 'server.log')}"
            time.sleep(0.25)
        platform = Platform(api_url, env, root / "home", logs)
        platform.prefect("work-pool", "create", POOL, "--type", "process")
        platform.prefect("--no-prompt", "deploy", "--all", timeout=180)
        processes.append(
            _spawn(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
                logs / "worker.log",
                env,
            )
        )
        yield platform
    finally:
        for process in reversed(processes):  # the worker (and its flow runs) first, then the server
            _stop(process)


def _wait_final(platform: Platform, flow_run_id: UUID, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    with platform.client() as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state.is_final():
                return run
            assert time.monotonic() < deadline, (
                f"flow run {run.name} still {run.state.name} after {timeout_s:.0f} s;"
                f"\nworker log:\n{_tail(platform.logs / 'worker.log')}"
            )
            time.sleep(0.5)


def _run_by_name(platform: Platform, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with platform.client() as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert len(runs) == 1, runs
    return runs[0]


def test_deploy_from_prefect_yaml_then_a_worker_runs_ingest(platform, sample_videos, monkeypatch):
    from prefect.client.schemas.schedules import CronSchedule

    # Every deployment of prefect.yaml is on the server, as written, with its variables filled in.
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    with platform.client() as client:
        deployments = {d.name: d for d in client.read_deployments()}
    assert set(deployments) == {d["name"] for d in spec["deployments"]}
    for d in deployments.values():
        assert d.work_pool_name == POOL
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    ingest = deployments["ingest-videos"]
    assert ingest.parameters == {"paths": [f"{platform.home}/incoming"]}
    # The nightly schedule example: deployed as written, and inactive.
    assert len(ingest.schedules) == 1
    schedule = ingest.schedules[0]
    assert isinstance(schedule.schedule, CronSchedule)
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (
        "0 2 * * *",
        "UTC",
        False,
    )
    assert all(not d.schedules for name, d in deployments.items() if name != "ingest-videos")
    # Turned on and off again from the CLI, as the README says.
    for command, active in (("resume", True), ("pause", False)):
        platform.prefect("deployment", "schedule", command, "ingest-videos/ingest-videos", str(schedule.id))
        with platform.client() as client:
            assert client.read_deployment(ingest.id).schedules[0].active is active

    # Two clips dropped into the watched folder; the deployment run as a person starts it, with a parameter.
    incoming = platform.home / "incoming"
    incoming.mkdir(parents=True)
    for clip in sample_videos[:2]:
        shutil.copy(clip, incoming / clip.name)
    started = time.monotonic()
    platform.prefect(
        "deployment",
        "run",
        "ingest-videos/ingest-videos",
        "--param",
        "shard_size=1",
        "--flow-run-name",
        "ingest-two-clips",
    )
    run = _wait_final(platform, _run_by_name(platform, "ingest-two-clips").id, 150)
    assert run.state.is_completed(), f"{run.state}\nworker log:\n{_tail(platform.logs / 'worker.log')}"
    assert run.work_pool_name == POOL and run.infrastructure_pid  # a flow-run process the worker started
    assert run.parameters == {"paths": [str(incoming)], "shard_size": 1}
    print(f"ingest-videos on the worker: {time.monotonic() - started:.1f} s")

    monkeypatch.setenv("KEYEFLOW_HOME", str(platform.home))
    videos = sql.query("select uri, codec from videos order by uri")
    assert videos.uri.tolist() == sorted(str(incoming / c.name) for c in sample_videos[:2])
    assert tables.open_table("quarantine").count_rows() == 0
    gate = sql.query("select gate, passed, num_rows from gate_results")
    assert gate.values.tolist() == [["videos", True, 2]]
    with platform.client() as client:
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

        shards = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="ingest_shard"))
        )
    assert len([t for t in shards if t.flow_run_id == run.id]) == 2  # one task run per shard of one clip


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    settings = teacher_server.teacher_config(plans=teacher_server.SAMPLE_PLANS)
    with teacher_server.start_server(settings, tmp_path_factory.mktemp("teacher")) as (url, _log):
        yield url


def test_longcot_review_through_the_server(platform, teacher, monkeypatch):
    """The LongCoT deployment (review: prefect) pauses one review run per item; a person's decision goes in
    through the server's API, as the UI form sends it; the flow completes and the decisions are in SQL."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run
    from prefect.input.run_input import keyset_from_paused_state

    monkeypatch.setenv("KEYEFLOW_HOME", str(platform.home))
    generate_longcot_questions(platform.home / "incoming" / "longcot")  # the deployment's question folder
    params = {
        "review_timeout_s": 150,
        "review_poll_interval_s": 1,
        "generation": {"backend": "openai", "base_url": teacher, "model": teacher_server.MODEL, "n": 4},
    }
    started = time.monotonic()
    platform.prefect(
        "deployment",
        "run",
        "longcot/longcot",
        "--params",
        json.dumps(params),
        "--flow-run-name",
        "longcot-reviewed",
    )
    parent = _run_by_name(platform, "longcot-reviewed")
    assert parent.parameters["review"] == "prefect"  # from prefect.yaml

    decided: dict[str, tuple[str, str]] = {}  # path id -> (action, review run id)
    deadline = time.monotonic() + 150
    with platform.client() as client:
        while True:
            run = client.read_flow_run(parent.id)
            if run.state.is_final():
                break
            assert time.monotonic() < deadline, (
                f"{len(decided)} reviews after 150 s, flow {run.state.name}\n"
                f"worker log:\n{_tail(platform.logs / 'worker.log')}"
            )
            paused = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                )
            )
            for review_run in paused:
                path_id = review_run.parameters["path_id"]
                if path_id in decided:
                    continue
                # A review run of this deployment run, waiting with the form the UI shows.
                assert client.read_task_run(review_run.parent_task_run_id).flow_run_id == parent.id
                keys = keyset_from_paused_state(review_run.state)
                form = json.loads(client.read_flow_run_input(review_run.id, keys["schema"]))
                assert {"item_id", "action", "edited_text", "reviewer", "note"} <= set(form["properties"])
                assert "**Reference:**" in client.read_flow_run_input(review_run.id, keys["description"])
                if not decided:  # an answer the form does not allow is refused; the run stays paused
                    with pytest.raises(RuntimeError):
                        resume_flow_run(review_run.id, run_input={"item_id": path_id, "action": "maybe"})
                    assert client.read_flow_run(review_run.id).state.is_paused()
                row = (
                    tables.open_table("longcot_paths")
                    .to_table(filter=pc.field("path_id") == path_id)
                    .to_pylist()[0]
                )
                assert row["status"] == "review"
                if row["grade"] == "A":
                    decision = {"item_id": path_id, "action": "approve", "reviewer": "dana", "note": "fine"}
                else:
                    decision = {"item_id": path_id, "action": "reject", "reviewer": "erin", "note": "flawed"}
                resume_flow_run(review_run.id, run_input=decision)
                decided[path_id] = (decision["action"], str(review_run.id))
            time.sleep(0.5)
    assert run.state.is_completed(), f"{run.state}\nworker log:\n{_tail(platform.logs / 'worker.log')}"
    print(f"longcot with {len(decided)} human reviews on the worker: {time.monotonic() - started:.1f} s")

    assert len(decided) == 3
    reviews = sql.query(
        "select path_id, reviewer, action, source, outcome, flow_run_id, decided_at "
        "from longcot_reviews order by path_id"
    )
    assert set(reviews.source) == {"person"} and reviews.decided_at.notna().all()
    assert {r.path_id: (r.action, r.flow_run_id) for r in reviews.itertuples()} == decided
    assert {(r.action, r.reviewer, r.outcome) for r in reviews.itertuples()} <= {
        ("approve", "dana", "kept"),
        ("reject", "erin", "dropped"),
    }
    kept = set(sql.query("select sample_id from longcot").sample_id)
    for path_id, (action, _) in decided.items():
        assert (path_id in kept) == (action == "approve")


def _artifact_keys(platform: Platform, flow_run_id: UUID) -> set[str]:
    """Keys of the artifacts on a flow run and on its subflow runs (a flow's mixtures are subflows)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with platform.client() as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(r.id for r in subflows)]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
    return {a.key for a in artifacts if a.key}


def _deployment_run(platform: Platform, deployment: str, name: str, params: dict, timeout_s: float):
    started = time.monotonic()
    platform.prefect("deployment", "run", deployment, "--params", json.dumps(params), "--flow-run-name", name)
    run = _wait_final(platform, _run_by_name(platform, name).id, timeout_s)
    assert run.state.is_completed(), f"{run.state}\nworker log:\n{_tail(platform.logs / 'worker.log')}"
    assert run.work_pool_name == POOL and run.infrastructure_pid
    print(f"{deployment} on the worker: {time.monotonic() - started:.1f} s")
    return run


# Every training stage cut to one step of two samples and the evaluation to one sample a modality: what this
# test checks is the deployments' wiring on a server, not what the stages learn.
PRETRAIN_SHORT = [
    *(f"stage{s}.{k}" for s in (1, 2, 3) for k in ("max_steps=1", "checkpoint_every=1", "window_size=2")),
    "evaluation.heldout_per_modality=1",
    "evaluation.num_mcq=1",
    "evaluation.loss_margin=100",
    "evaluation.accuracy_margin=1",
]
STAGE2_LR = 3e-4  # the `--set`-style override the test follows into stage 2's optimizer


@pytest.mark.slow
def test_every_training_deployment_runs_on_the_worker(platform, teacher, monkeypatch):
    """data-pipeline → pretrain (with a `--set`-style override parameter) → longcot → posttrain (overrides as
    a mapping), each a deployment run on the process worker, each with its per-stage artifacts."""
    from keyeflow.synthetic.corpus import generate_corpus
    from keyeflow.synthetic.images import generate_images
    from keyeflow.synthetic.videos import generate_videos
    from keyeflow.training.recipes import pretrain_recipe

    monkeypatch.setenv("KEYEFLOW_HOME", str(platform.home))
    incoming = platform.home / "incoming"  # the deployments' folders (prefect.yaml)
    videos = generate_videos(incoming / "videos")
    pictures = generate_images(incoming / "images")
    generate_corpus(incoming / "corpus", videos, pictures)
    generate_longcot_questions(incoming / "longcot")  # as the review test does: the teacher's sample plans

    # ---- data-pipeline: stage 1's mixture only (pretrain builds its own), as `keyeflow run` sizes it.
    data = _deployment_run(
        platform,
        "data-pipeline/data-pipeline",
        "data-on-the-worker",
        {"stages": [1], "mixture_overrides": {"1": pretrain_recipe("tiny").mixture_overrides(1)}},
        300,
    )
    assert {"gate-train-samples", "mixture-stage-1"} <= _artifact_keys(platform, data.id)

    # ---- pretrain with overrides as the Custom run form sends them: a list of key=value strings.
    overrides = [*PRETRAIN_SHORT, f"stage2.learning_rate={STAGE2_LR}"]
    pre = _deployment_run(
        platform, "pretrain/pretrain", "pretrain-on-the-worker", {"overrides": overrides}, 600
    )
    assert pre.parameters["overrides"] == overrides and pre.parameters["recipe"] == "tiny"
    stage2 = next((platform.home / "checkpoints").glob("pretrain-2-multitask-*"))
    steps = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 1 and steps[0]["lr"] == pytest.approx(STAGE2_LR)  # warm-up of 1: the peak
    stages = (
        "pretrain-1-alignment",
        "pretrain-2-multitask",
        "pretrain-3-annealing-balanced",
        "pretrain-4-fusion",
    )
    keys = _artifact_keys(platform, pre.id)
    assert {"recipe", "memory-plan", "mixture-stage-1"} <= keys
    assert {f"stage-{s}" for s in stages} | {f"eval-{s}" for s in stages} <= keys

    # ---- longcot, unattended (the review through the server is test_longcot_review_through_the_server).
    cot = _deployment_run(
        platform,
        "longcot/longcot",
        "longcot-on-the-worker",
        {
            "review": "auto_approve",
            "generation": {"backend": "openai", "base_url": teacher, "model": teacher_server.MODEL, "n": 4},
        },
        300,
    )
    assert "longcot-summary" in _artifact_keys(platform, cot.id)

    # ---- posttrain from pretrain's checkpoint, overrides as a mapping (the form's JSON object).
    post_overrides = {"sft.max_steps": 1, "sft_anneal.max_steps": 1, "sft.checkpoint_every": 1}
    post = _deployment_run(
        platform, "posttrain/posttrain", "posttrain-on-the-worker", {"overrides": post_overrides}, 900
    )
    assert (
        post.parameters["checkpoint"] == "latest-pretrain" and post.parameters["overrides"] == post_overrides
    )
    (sft,) = [
        d
        for d in (platform.home / "checkpoints").iterdir()
        if re.fullmatch(r"posttrain-1-sft-[0-9a-f]+", d.name)
    ]
    assert len((sft / "metrics.jsonl").read_text().splitlines()) == 1
    keys = _artifact_keys(platform, post.id)
    assert {"recipe", "memory-plan", "stage-posttrain-1-sft", "stage-posttrain-3-mpo"} <= keys
    assert "stage-posttrain-6-alignment-rl" in keys, keys
