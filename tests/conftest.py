"""Shared fixtures: a fresh data root per test, generated clips once per session, Prefect's harness."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fresh KEYEFLOW_HOME: its own Lance tables and MLflow store."""
    root = tmp_path / "home"
    monkeypatch.setenv("KEYEFLOW_HOME", str(root))
    for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return root


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def sample_videos(media_dir) -> list[Path]:
    from keyeflow.synthetic.videos import generate_videos

    return generate_videos(media_dir / "videos")


@pytest.fixture(scope="session")
def bad_inputs(media_dir) -> dict[str, Path]:
    from keyeflow.synthetic.videos import generate_bad_videos

    return generate_bad_videos(media_dir / "bad")


@pytest.fixture()
def mixed_batch(tmp_path, sample_videos, bad_inputs) -> Path:
    """A folder with every sample, every bad input and one renamed copy of a sample (a duplicate)."""
    folder = tmp_path / "batch"
    folder.mkdir()
    for path in sample_videos:
        shutil.copy(path, folder / path.name)
    for path in bad_inputs.values():
        target = folder / path.name
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
        else:
            shutil.copy(path, target)
    shutil.copy(sample_videos[0], folder / f"copy of {sample_videos[0].name}")
    return folder


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def subprocesses_report_to_the_harness(prefect_harness):
    """Every `keyeflow` process a test starts reports to the session's Prefect server (PREFECT_API_URL in
    the environment it inherits) instead of starting and migrating an ephemeral server of its own: ~10 s of
    every CLI run on this machine, and on a busy one past Prefect's start timeout. A test that needs its own
    server (the real `prefect server` tests) sets the variable itself."""
    from prefect.settings import PREFECT_API_URL

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
    yield
    if before is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = before


@pytest.fixture(scope="session")
def sample_images(media_dir) -> list[Path]:
    from keyeflow.synthetic.images import generate_images

    return generate_images(media_dir / "images")


@pytest.fixture(scope="session")
def sample_corpus(media_dir, sample_videos, sample_images) -> dict[str, Path]:
    """Conversations, captions, text and bad records referencing the sample media (source root: media_dir)."""
    from keyeflow.synthetic.corpus import generate_corpus

    return generate_corpus(media_dir / "corpus", sample_videos, sample_images)


@pytest.fixture(scope="session")
def serve_model():
    """`serve_model(model_dir, served_name, log_dir)`: a context manager running the real
    `python -m keyeflow.model.serving` on a free 127.0.0.1 port until healthy; yields its base URL (…/v1)."""
    import contextlib
    import socket
    import subprocess
    import sys
    import time

    import httpx

    repo = Path(__file__).resolve().parents[1]

    @contextlib.contextmanager
    def serve(model_dir: Path, served_name: str, log_dir: Path, timeout_s: float = 60):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log = log_dir / "server.log"
        command = [
            sys.executable,
            "-m",
            "keyeflow.model.serving",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--served-model-name",
            served_name,
            "--log-level",
            "warning",
        ]
        env = os.environ | {"PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=repo)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"server not healthy after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    return serve


@pytest.fixture(scope="module")
def multirank_training_data(request, tmp_path_factory, sample_corpus, media_dir):
    """The trainer tests' data (sample corpus → train_samples → a stage-2 mixture, a tiny init model) in a
    home of the calling module's own, set up for multi-process DeepSpeed runs on CPU."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
    from test_trainer import build_training_data

    home = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]) / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYEFLOW_HOME", str(home))
        for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        # DeepSpeed JIT-builds its shared-memory comm op on first use (~35 s) and caches it here.
        mp.setenv(
            "TORCH_EXTENSIONS_DIR",
            os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "keyeflow" / "torch_extensions")
            ),
        )
        yield build_training_data(home, sample_corpus["conversations"].parent, media_dir)
