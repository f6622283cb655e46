"""Screenshots of the MLflow UI and the Prefect UI for the docs, taken in headless Chromium against local
servers.

    python scripts/screenshots.py [--home KEYEFLOW_HOME] [--out docs/images]

Run it after `keyeflow run`: it starts `mlflow ui` (over KEYEFLOW_HOME's store) and `prefect server start`
(over the Prefect database the flows wrote to: PREFECT_HOME, default ~/.prefect) on 127.0.0.1, drives one
headless Chromium over the DevTools protocol, writes one PNG per view, and stops both servers:

- mlflow-runs-compared.png: the newest `pretrain` flow run's training stages in the experiment's chart
  view, all selected, their `loss` (and grad_norm, lr, tokens...) curves side by side;
- mlflow-stage-run.png: the stage run `pretrain-2-multitask`: its Datasets (tables read, with their
  context), its Logged models (input: the checkpoint it started from; output: the one it wrote) and their
  registered versions;
- mlflow-run-dataset.png: one of those datasets opened: row count, fragments, Lance version, digest, schema;
- mlflow-registered-model.png: the recipe's registered model, its versions with the gate's verdict and the
  `champion` alias (a `candidate` alias shows only while a version awaits or failed its gate);
- prefect-flow-run-artifacts.png: the newest `pretrain` flow run's task graph and Artifacts tab (the
  resolved recipe, a `stage-…` and an `eval-…` report per stage);
- prefect-flow-runs.png: the flow-run list.

MLflow pages are opened with `?workflowType=machine_learning`: without it MLflow 3 opens an experiment on
its GenAI overview.

Needs Chromium's headless shell: `apt-get install -y chromium-headless-shell` (Debian), or set CHROMIUM to
another Chromium binary.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
from PIL import Image
from websockets.sync.client import connect

WIDTH, HEIGHT = 1440, 900
# Images committed to the repository stay under ~300 KB: above that a PNG is reduced to a 256-colour palette,
# which a flat UI screenshot survives without visible loss.
MAX_PNG_BYTES = 300_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], health: str, env: dict, timeout_s: float = 180) -> Iterator[None]:
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
        process.wait(timeout=30)


class Page:
    """One Chromium tab driven over the DevTools protocol. `chromium --screenshot` cannot click, and the
    views wanted here need clicks (unfold the nested stage runs and select them, open a dataset, switch the
    Prefect tab); and the single-page apps fetch after load, so each picture waits for a condition on the
    page rather than a fixed time."""

    def __init__(self, ws, session: str) -> None:
        self.ws, self.session, self.ids = ws, session, itertools.count(1)

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(
            json.dumps({"id": call_id, "method": method, "params": params, "sessionId": self.session})
        )
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.eval(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def wait_text(self, text: str, timeout_s: float = 60) -> None:
        self.wait(
            f"document.body && document.body.innerText.includes({json.dumps(text)})", repr(text), timeout_s
        )

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'", f"load of {url}")

    def click(self, selector: str, timeout_s: float = 60) -> None:
        """Clicks the element `selector` names once it exists (the grids re-render rows as data arrives)."""
        self.wait(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e?.click(); return e; })()",
            selector,
            timeout_s,
        )

    def screenshot(self, out: Path, settle_s: float = 2.0) -> None:
        time.sleep(settle_s)  # charts animate in; fonts swap
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        write_png(png, out)


def write_png(png: bytes, out: Path) -> None:
    if len(png) > MAX_PNG_BYTES:
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        png = buffer.getvalue()
    out.write_bytes(png)
    print(f"  {out}  ({len(png) // 1000} KB)")


@contextlib.contextmanager
def browser(chromium: str) -> Iterator[Page]:
    # Chromium's helper processes may still write to the profile for a moment after it exits.
    with tempfile.TemporaryDirectory(prefix="keyeflow-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={WIDTH},{HEIGHT}",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            endpoint = None
            for line in process.stderr:
                if match := re.search(rb"DevTools listening on (ws://\S+)", line):
                    endpoint = match.group(1).decode()
                    break
            if endpoint is None:
                raise RuntimeError(f"{chromium} did not open a DevTools endpoint")
            with connect(endpoint, max_size=64 * 2**20) as ws:
                ws.send(
                    json.dumps({"id": 0, "method": "Target.createTarget", "params": {"url": "about:blank"}})
                )
                target = next(m for m in map(json.loads, ws) if m.get("id") == 0)["result"]["targetId"]
                ws.send(
                    json.dumps(
                        {
                            "id": 0,
                            "method": "Target.attachToTarget",
                            "params": {"targetId": target, "flatten": True},
                        }
                    )
                )
                session = next(m for m in map(json.loads, ws) if m.get("id") == 0)["result"]["sessionId"]
                page = Page(ws, session)
                page.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=WIDTH,
                    height=HEIGHT,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                page.call("Page.enable")
                yield page
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


# The assistant panel and the navigation take a third of the width; the navigation's toggle is remembered
# across pages, so it is pressed only while the navigation is open (its "Model training" switch shows).
HIDE_CHROME = """
  document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]')?.click();
  if ([...document.querySelectorAll('div')].some(e => e.innerText === 'Model training' && e.offsetParent))
    document.querySelector('[aria-label="Toggle sidebar"]')?.click();
"""
# Plotly's zoom/pan toolbar shows on every chart when nothing hovers in a headless page; it only hides data.
HIDE_PLOTLY_TOOLBAR = """
  const style = document.createElement('style');
  style.textContent = '.modebar-container { display: none !important; }';
  document.head.appendChild(style);
"""


def click_all(page: Page, selector: str, text_starts: str = "") -> int:
    """Clicks every visible element `selector` names whose text starts with `text_starts`."""
    return page.eval(
        f"""(() => {{
          const found = [...document.querySelectorAll({json.dumps(selector)})]
            .filter(e => e.offsetParent !== null
                         && (e.innerText || '').trim().startsWith({json.dumps(text_starts)}));
          found.forEach(e => e.click());
          return found.length;
        }})()"""
    )


def mlflow_runs_compared(
    page: Page, mlflow_url: str, experiment_id: str, parent_id: str, stage_ids: list[str], out: Path
) -> None:
    """The chart view of one `pretrain` flow run's training stages (stages and stage-3 variants), all
    selected, with their training metrics (`loss` among them) as line charts over the step, a colour each."""
    search = quote(f"metrics.loss > 0 and tags.mlflow.parentRunId = '{parent_id}'")
    page.goto(
        f"{mlflow_url}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&compareRunsMode=CHART&searchFilter={search}"
    )
    page.wait_text("matching runs")
    page.eval(HIDE_CHROME + HIDE_PLOTLY_TOOLBAR)
    # The stage runs are nested under the flow's run: unfold it, leave it (no metrics of its own) out of the
    # charts, and select its children.
    page.click(f'[row-id="{parent_id}"] [data-component-id$="runnamecellrenderer.tsx_46"]')
    page.click(f'[row-id="{parent_id}"] [col-id="2"] label:not([data-testid]) input')
    for run_id in stage_ids:
        page.click(f'[row-id="{run_id}"] input[aria-label^="Press Space"]')
    page.wait_text("Model metrics")
    click_all(page, '[data-testid="experiment-view-compare-runs-section-header"]', "eval")
    page.wait("document.querySelectorAll('.js-plotly-plot').length >= 3", "the metric charts")
    page.screenshot(out, settle_s=3)


DATASETS_SECTION = "[...document.querySelectorAll('h4')].find(h => h.innerText === 'Datasets').parentElement"


def mlflow_stage_run(
    page: Page, mlflow_url: str, experiment_id: str, run_id: str, out: Path, dataset_out: Path
) -> None:
    """One stage run's overview: the tables it read as MLflow datasets (name, digest, context), its logged
    models (the checkpoint it wrote, the one it started from) and their registered versions; then one of
    those datasets opened (its Lance source and version, row count, schema)."""
    page.call(
        "Emulation.setDeviceMetricsOverride", width=WIDTH, height=1300, deviceScaleFactor=1, mobile=False
    )
    try:
        page.goto(f"{mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning")
        page.wait_text("Logged models")
        page.eval(HIDE_CHROME)
        page.wait(
            "document.querySelector('a[href*=\"/models/m-\"]')"
            " && document.querySelector('a[href*=\"/versions/\"]')",
            "the logged models",
        )
        # The `stage` parameter (the resolved stage config) unfolds to ~40 lines: fold it so the logged
        # models table comes into view; list every dataset, not the first and "+1".
        page.eval(
            """[...document.querySelectorAll('[role=row], tr')].filter(r => r.innerText.startsWith('stage'))
                 .forEach(r => r.querySelector('button, [role=button]')?.click())"""
        )
        page.eval(f"{DATASETS_SECTION}.querySelector('button[aria-haspopup=dialog]')?.click()")
        page.screenshot(out)
    finally:
        page.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )
    page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    page.eval(f"{DATASETS_SECTION}.querySelector('[role=button]').click()")
    page.wait_text("Digest")
    page.screenshot(dataset_out)


def mlflow_registered_model(page: Page, mlflow_url: str, model_name: str, out: Path) -> None:
    page.goto(f"{mlflow_url}/#/models/{quote(model_name)}?workflowType=machine_learning")
    page.wait_text("champion")
    page.eval(HIDE_CHROME)
    page.screenshot(out)


def prefect_flow_run_artifacts(page: Page, prefect_url: str, flow_run_id: str, out: Path) -> None:
    """A `pretrain` flow run: its task graph over time (artifact markers on it) and its Artifacts tab, the
    resolved recipe on the flow run and a `stage-…` and `eval-…` report per stage."""
    page.call(
        "Emulation.setDeviceMetricsOverride", width=WIDTH, height=1500, deviceScaleFactor=1, mobile=False
    )
    try:
        page.goto(f"{prefect_url}/runs/flow-run/{flow_run_id}")
        page.wait_text("Job Variables")
        # The tab is not taken from the URL on a first load (`?tab=Artifacts` comes back as Logs): click it.
        page.click("[role=tablist] li#artifacts")
        page.wait_text("Task runs")
        page.wait_text("stage-pretrain-")
        page.screenshot(out, settle_s=3)
    finally:
        page.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )


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
    flows = client.search_runs(
        [experiment.experiment_id],
        "tags.`keyeflow.kind` = 'pretrain' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    trained = client.search_runs(
        [experiment.experiment_id],
        f"metrics.loss > 0 and tags.mlflow.parentRunId = '{flows[0].info.run_id}'" if flows else "",
    )
    stage_runs = client.search_runs(
        [experiment.experiment_id],
        "tags.`keyeflow.kind` = 'pretrain-2-multitask' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    models = [m for m in client.search_registered_models() if "champion" in (m.aliases or {})]
    if not flows or not stage_runs or not models:
        sys.exit(f"no finished pretrain stage run or no model with a champion in {store}: run `keyeflow run`")

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
        browser(chromium) as page,
    ):
        print("screenshots:")
        mlflow_runs_compared(
            page,
            mlflow_url,
            experiment.experiment_id,
            flows[0].info.run_id,
            [r.info.run_id for r in trained],
            out / "mlflow-runs-compared.png",
        )
        mlflow_stage_run(
            page,
            mlflow_url,
            experiment.experiment_id,
            stage_runs[0].info.run_id,
            out / "mlflow-stage-run.png",
            out / "mlflow-run-dataset.png",
        )
        mlflow_registered_model(page, mlflow_url, models[0].name, out / "mlflow-registered-model.png")
        flow_runs = httpx.post(
            f"{prefect_url}/api/flow_runs/filter",
            timeout=30,
            json={"flows": {"name": {"any_": ["pretrain"]}}, "sort": "START_TIME_DESC", "limit": 1},
        ).json()
        if not flow_runs:
            sys.exit(
                "no pretrain flow run in the Prefect database: is PREFECT_HOME the one `keyeflow run` used?"
            )
        prefect_flow_run_artifacts(
            page, prefect_url, flow_runs[0]["id"], out / "prefect-flow-run-artifacts.png"
        )
        page.goto(f"{prefect_url}/runs")
        page.wait_text("pretrain")
        page.screenshot(out / "prefect-flow-runs.png")


if __name__ == "__main__":
    main()
