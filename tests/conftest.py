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
    from keyeflow.datasets.samples import generate_sample_videos

    return generate_sample_videos(media_dir / "videos")


@pytest.fixture(scope="session")
def bad_inputs(media_dir) -> dict[str, Path]:
    from keyeflow.datasets.samples import generate_bad_inputs

    return generate_bad_inputs(media_dir / "bad")


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


@pytest.fixture(scope="session")
def sample_images(media_dir) -> list[Path]:
    from keyeflow.datasets.image_samples import generate_sample_images

    return generate_sample_images(media_dir / "images")


@pytest.fixture(scope="session")
def sample_corpus(media_dir, sample_videos, sample_images) -> dict[str, Path]:
    """Conversations, captions, text and bad records referencing the sample media (source root: media_dir)."""
    from keyeflow.datasets.text_samples import generate_sample_corpus

    return generate_sample_corpus(media_dir / "corpus", sample_videos, sample_images)
