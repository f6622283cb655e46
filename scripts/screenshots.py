"""Screenshots of the Prefect UI and the MLflow UI for the docs, taken in headless Chromium against local
servers.

    python scripts/screenshots.py [--home KEYEFLOW_HOME] [--out docs/images]

Run it after `keyeflow run` (or any flows): it starts `prefect server start` (over the same Prefect database
the flows wrote to: PREFECT_HOME, default ~/.prefect) and `mlflow ui` (over KEYEFLOW_HOME's store) on
127.0.0.1, opens the flow-run list, the newest `pretrain` flow run, the MLflow experiment and the fused
checkpoint's run (its lineage tags), writes one PNG each, and stops both servers. Needs Chromium's headless
shell: `apt-get install -y chromium-headless-shell` (Debian), or set CHROMIUM to another Chromium binary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

WINDOW = "1440,900"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], health: str, env: dict, timeout_s: float = 120) -> Iterator[None]:
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {process.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(health, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command)} not healthy after {timeout_s:.0f} s")
            time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def shoot(chromium: str, url: str, out: Path, wait_ms: int = 12_000) -> None:
    """One page, after `wait_ms` of virtual time for the single-page app to fetch and render."""
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={WINDOW}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"  {out}  ←  {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=os.environ.get("KEYEFLOW_HOME", "keyeflow_home"))
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    chromium = (
        os.environ.get("CHROMIUM") or shutil.which("chromium-headless-shell") or shutil.which("chromium")
    )
    if not chromium:
        sys.exit("no Chromium found: apt-get install -y chromium-headless-shell (or set CHROMIUM)")
    home = Path(args.home).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"KEYEFLOW_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    bin_dir = Path(sys.executable).parent

    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("keyeflow")
    if experiment is None:
        sys.exit(f"no keyeflow experiment in {store}: run `keyeflow run` first")
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.`keyeflow.kind` = 'pretrain'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    final_run = runs[0].data.tags.get("keyeflow.final_run_id") if runs else None

    prefect_port, mlflow_port = free_port(), free_port()
    prefect_cmd = [
        str(bin_dir / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(prefect_port),
    ]
    mlflow_cmd = [
        str(bin_dir / "mlflow"),
        "ui",
        "--backend-store-uri",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        str(mlflow_port),
    ]
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    # The UI is served by the same process but must be told where its API is (default: port 4200).
    prefect_env = env | {
        "PREFECT_UI_API_URL": f"{prefect_url}/api",
        "PREFECT_SERVER_UI_API_URL": f"{prefect_url}/api",
    }
    with (
        server(prefect_cmd, f"{prefect_url}/api/health", prefect_env),
        server(mlflow_cmd, f"{mlflow_url}/health", env),
    ):
        print("screenshots:")
        shoot(chromium, f"{prefect_url}/runs", out / "prefect-flow-runs.png")
        flow_runs = httpx.post(
            f"{prefect_url}/api/flow_runs/filter",
            timeout=30,
            json={"flows": {"name": {"any_": ["pretrain"]}}, "sort": "START_TIME_DESC", "limit": 1},
        ).json()
        if flow_runs:
            shoot(
                chromium,
                f"{prefect_url}/runs/flow-run/{flow_runs[0]['id']}",
                out / "prefect-pretrain-run.png",
            )
        shoot(chromium, f"{mlflow_url}/#/experiments/{experiment.experiment_id}", out / "mlflow-runs.png")
        if final_run:
            shoot(
                chromium,
                f"{mlflow_url}/#/experiments/{experiment.experiment_id}/runs/{final_run}",
                out / "mlflow-fused-checkpoint-run.png",
            )


if __name__ == "__main__":
    main()
