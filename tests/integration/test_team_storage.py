"""Team storage for real: Lance tables on an S3-compatible server and an MLflow tracking server.

Both servers are real processes bound to 127.0.0.1 (moto's S3 server, ``mlflow server`` with a SQLite
backend and proxied artifacts), started once for this module and stopped at its end. Credentials and the
endpoint reach keyeflow only through the standard ``AWS_*`` variables; the secret must end up in no MLflow
param or tag, no Prefect parameter or log, and nothing printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from keyeflow import config as keyeflow_config
from keyeflow.datasets import ingest, pretokenize, sql, tables
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.quality import gates

ACCESS_KEY = "AKIAKEYEFLOWTEAM"
SECRET = "team-secret-9f3b1c7e-do-not-log"
SERVER_TOKEN = "kf-server-token-77a0e1-do-not-log"  # the bearer token of the servers keyeflow starts
REGION = "eu-west-1"
BUCKET = "keyeflow-team"
AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ALLOW_HTTP",
    "AWS_PROFILE",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A server subprocess in its own process group (mlflow server forks uvicorn), output to a log file."""

    def __init__(self, command: list[str], url: str, health_path: str, log: Path, cwd: Path):
        self.url, self.health_url, self.log = url, url + health_path, log
        # The servers get no AWS credentials: neither needs them, and the test asserts where the secret goes.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KEYEFLOW_", "MLFLOW_"))}
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    def wait_until_up(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.process.args[:4]} exited with {self.process.returncode}:\n"
                    f"{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.health_url, timeout=2):
                    return self.url
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(
            f"{self.health_url} did not answer in {timeout} s:\n{self.log.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """moto's S3 server and ``mlflow server``, both on 127.0.0.1, started together so that their start-ups
    overlap; stopped (with any child they forked) when the module is done."""
    base = tmp_path_factory.mktemp("team_servers")
    port = _free_port()
    moto = _Server(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        f"http://127.0.0.1:{port}",
        "/moto-api/",
        base / "moto.log",
        base,
    )
    port = _free_port()
    mlflow = _Server(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{base / 'mlflow.db'}",
            "--artifacts-destination",
            str(base / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        f"http://127.0.0.1:{port}",
        "/health",
        base / "mlflow.log",
        base,
    )
    try:
        yield {"moto": moto, "mlflow": mlflow, "artifacts": base / "artifacts"}
    finally:
        mlflow.stop()
        moto.stop()


@pytest.fixture(scope="module")
def s3_endpoint(servers) -> str:
    """The S3 endpoint, with one bucket."""
    import boto3

    endpoint = servers["moto"].wait_until_up()
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET,
        region_name=REGION,
    ).create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    return endpoint


@pytest.fixture(scope="module")
def mlflow_server(servers) -> tuple[str, Path]:
    """The tracking URI, and the folder only the server writes artifacts to."""
    return servers["mlflow"].wait_until_up(), servers["artifacts"]


@pytest.fixture()
def s3_tables(home, s3_endpoint, monkeypatch, request) -> str:
    """KEYEFLOW_TABLES_URI on the S3 server (a prefix per test); credentials only in AWS_* variables."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_REGION", REGION)
    uri = f"s3://{BUCKET}/{request.node.name}"
    monkeypatch.setenv("KEYEFLOW_TABLES_URI", uri)
    return uri


def _s3_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET,
        region_name=REGION,
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_storage_options_come_only_from_the_aws_environment(monkeypatch):
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    assert keyeflow_config.storage_options("/data/tables/videos.lance") is None
    assert keyeflow_config.storage_options("s3://b/t/videos.lance") == {}  # Lance's own credential chain

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-2")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://objects.example.org")
    assert keyeflow_config.storage_options("s3://b/t") == {
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET,
        "aws_region": "us-east-2",
        "aws_endpoint": "https://objects.example.org",
    }

    # The S3-specific endpoint and AWS_REGION win, as in the AWS SDKs; a plain-HTTP endpoint allows HTTP.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    options = keyeflow_config.storage_options("s3://b/t")
    assert options["aws_endpoint"] == "http://127.0.0.1:9000" and options["allow_http"] == "true"
    assert options["aws_region"] == REGION and options["aws_session_token"] == "token"


def test_video_tables_on_s3_answer_sql_and_a_rerun_adds_nothing(
    s3_tables, s3_endpoint, monkeypatch, home, sample_videos, bad_inputs
):
    # The S3-only endpoint variable: Lance does not read it by itself, so every call site on this path
    # must get it from keyeflow's storage options (else it would try AWS and fail here, offline).
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    config = resolve_config("paper")
    paths = [str(p) for p in sample_videos[:3]] + [str(bad_inputs["zero_byte"])]

    def run():
        shards = ingest.plan_shards(paths, ingest.IngestConfig(2))
        reports = [ingest.ingest_shard(shard) for shard in shards]
        rows = pretokenize.pending_videos(tables.ref("videos"), config)
        return reports, pretokenize.pretokenize_shard(rows, config)

    _, first = run()
    assert first.num_done == 3
    assert tables.list_tables() == ["quarantine", "video_frames", "video_samples", "videos"]
    keys = _s3_keys(s3_endpoint, s3_tables.split("/", 3)[3] + "/")
    assert any(k.endswith(".manifest") for k in keys) and any("/video_frames.lance/data/" in k for k in keys)
    assert not (home / "tables").exists()

    counts_sql = (
        "select (select count(*) from videos) as videos, (select count(*) from video_samples) as samples, "
        "(select count(*) from video_frames) as frames, (select count(*) from quarantine) as quarantined"
    )
    counts = sql.query(counts_sql).iloc[0].to_dict()
    assert counts["videos"] == 3 and counts["samples"] == 3 and counts["quarantined"] == 1
    joined = sql.query(
        "select v.uri, s.num_frames, count(f.frame_id) as stored from video_samples s "
        "join videos v using (video_id) join video_frames f using (sample_id) group by all"
    )
    assert len(joined) == 3 and (joined.num_frames == joined.stored).all()
    assert {os.path.basename(u) for u in joined.uri} == {p.name for p in sample_videos[:3]}
    reason = sql.query("select reason, stage from quarantine").iloc[0]
    assert (reason.stage, reason.reason) == ("ingest", "empty file (0 bytes)")

    gate = gates.check_videos(tables.ref("videos"))
    assert gate.passed, gate.failures
    gates.record(gate, tables.ref("videos"), run_id="no-run")
    versions = {name: tables.ref(name).version for name in tables.list_tables()}

    reports, again = run()
    assert sum(r.num_already_present for r in reports) == 3 and again.num_videos == 0
    assert {name: tables.ref(name).version for name in versions} == versions
    assert sql.query(counts_sql).iloc[0].to_dict() == counts
    dupes = sql.query(
        "select (select count(*) - count(distinct video_id) from videos) + "
        "(select count(*) - count(distinct frame_id) from video_frames) as n"
    )
    assert dupes.n[0] == 0

    # The other writers: a rewrite of one sample's frames (replace_groups), a changed row (update_rows).
    sample_id = sql.query("select sample_id from video_samples limit 1").sample_id[0]
    frames = tables.open_table("video_frames").to_table(filter=f"sample_id = '{sample_id}'")
    tables.replace_groups("video_frames", frames, "sample_id")
    assert sql.query(counts_sql).frames[0] == counts["frames"]
    row = tables.open_table("quarantine").to_table().to_pylist()[0]
    tables.update_rows("quarantine", [{**row, "reason": "empty file (0 bytes), checked twice"}])
    assert sql.query("select reason from quarantine").reason.tolist() == [
        "empty file (0 bytes), checked twice"
    ]
    # Pinned reads still see the earlier versions, over the object store.
    pinned = sql.query("select reason from quarantine", versions={"quarantine": versions["quarantine"]})
    assert pinned.reason.tolist() == ["empty file (0 bytes)"]


def test_flows_on_s3_tables_log_to_an_mlflow_server(
    s3_tables, s3_endpoint, mlflow_server, monkeypatch, home, prefect_harness, sample_videos, tmp_path, capfd
):
    from mlflow.tracking import MlflowClient

    from keyeflow import lineage
    from keyeflow.flows.video import video_pipeline

    tracking_uri, artifacts_dir = mlflow_server
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("KEYEFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("KEYEFLOW_API_KEY", SERVER_TOKEN)
    paths = [str(p) for p in sample_videos[:2]]

    result = video_pipeline(paths)
    ing, tok = result["ingest"], result["pretokenize"]
    assert ing["num_ingested"] == 2 and tok["num_done"] == 2
    assert ing["videos"].uri == f"{s3_tables}/videos.lance"

    server = MlflowClient(tracking_uri=tracking_uri)
    experiment = server.get_experiment_by_name("keyeflow")
    # The server chose the artifact location (proxied), not a path on this machine.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    assert not (home / "mlartifacts").exists()

    ingest_run = server.get_run(ing["run_id"])
    assert ingest_run.info.status == "FINISHED"
    assert json.loads(ingest_run.data.params["paths"]) == paths
    assert ingest_run.data.params["shard_size"] == "16"
    assert (
        ingest_run.data.tags["keyeflow.output.videos"] == f"{s3_tables}/videos.lance@v{ing['videos'].version}"
    )
    assert ingest_run.data.metrics["num_ingested"] == 2
    run = server.get_run(tok["run_id"])
    assert run.data.params["config_hash"] == tok["config_hash"]
    assert run.data.tags["keyeflow.input.videos"] == f"{s3_tables}/videos.lance@v{ing['videos'].version}"
    assert run.data.tags["keyeflow.output.video_frames"].startswith(f"{s3_tables}/video_frames.lance@v")
    assert run.data.tags[lineage.PARENT_TAG] == result["run_id"]

    # Artifacts went through the server into its --artifacts-destination and come back through it.
    assert "slowfast_strips.png" in {a.path for a in server.list_artifacts(tok["run_id"])}
    report = Path(server.download_artifacts(tok["run_id"], "gates/video_samples.json", str(tmp_path)))
    assert json.loads(report.read_text())["passed"] is True
    strip = Path(server.download_artifacts(tok["run_id"], "slowfast_strips.png", str(tmp_path)))
    assert strip.read_bytes()[:4] == b"\x89PNG"
    assert list(artifacts_dir.rglob("slowfast_strips.png"))

    again = video_pipeline(paths)
    assert again["ingest"]["num_ingested"] == 0 and again["pretokenize"]["num_videos"] == 0
    assert sql.query("select count(*) - count(distinct sample_id) as n from video_samples").n[0] == 0
    assert sql.query("select count(*) as n from videos").n[0] == 2

    # The secret is nowhere a person (or anyone with read access to the tracking server) could see it.
    runs = server.search_runs([experiment.experiment_id])
    assert len(runs) == 6
    for r in runs:
        recorded = json.dumps([r.data.params, r.data.tags, list(r.data.metrics)])
        assert SECRET not in recorded and ACCESS_KEY not in recorded, r.info.run_name
        assert SERVER_TOKEN not in recorded, r.info.run_name
    _assert_secret_not_in_prefect()
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    assert SERVER_TOKEN not in out + err


def _assert_secret_not_in_prefect() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs()
        assert flow_runs
        for flow_run in flow_runs:
            assert SECRET not in json.dumps(flow_run.parameters, default=str)
            assert SERVER_TOKEN not in json.dumps(flow_run.parameters, default=str)
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[f.id for f in flow_runs]))
        )
        assert all(SECRET not in log.message for log in logs)
        assert all(SERVER_TOKEN not in log.message for log in logs)
