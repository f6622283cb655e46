"""The servers keyeflow starts (the model server, the synthetic teacher) bind 127.0.0.1 unless told otherwise,
require a bearer token when given one (401 without it; the health check stays open), and never print or log
the token; `OpenAICompatibleGenerator` sends it from the environment variable it is told."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from keyeflow.model.config import tiny
from keyeflow.model.generation import GenerationServerError, OpenAICompatibleGenerator
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.synthetic import synthetic_teacher

TOKEN = "kf-token-5d1e0c2a-do-not-log"
MESSAGES = [[{"role": "user", "content": "Count the red blocks. /think"}]]


def _check_token_required(base: str) -> None:
    """`base` is the API root (…/v1); its health check is beside it."""
    root = base.removesuffix("/v1")
    assert httpx.get(f"{root}/health", timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = httpx.get(f"{base}/models", headers=headers, timeout=30)
        assert answer.status_code == 401, headers
        assert TOKEN not in answer.text
    refused = httpx.post(f"{base}/chat/completions", json={"messages": MESSAGES[0]}, timeout=30)
    assert refused.status_code == 401
    allowed = httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert allowed.status_code == 200


def _generate(base: str, model: str, monkeypatch, key: str | None) -> list:
    if key is None:
        monkeypatch.delenv("KEYEFLOW_CLIENT_KEY", raising=False)
    else:
        monkeypatch.setenv("KEYEFLOW_CLIENT_KEY", key)
    client = OpenAICompatibleGenerator(
        base, model, api_key_env="KEYEFLOW_CLIENT_KEY", timeout=60, max_retries=0
    )
    return client.generate(MESSAGES, max_new_tokens=4, temperature=0.0, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("auth-model")
    KeyeForConditionalGeneration(tiny(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_model_server_binds_loopback_and_requires_the_token(model_dir, monkeypatch, tmp_path):
    env = os.environ | {"KEYEFLOW_API_KEY": TOKEN}
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "keyeflow.model.serving", "--model", str(model_dir), "--port", "0"]
    command += ["--served-model-name", "m", "--log-level", "info"]
    with log.open("w") as errors:
        server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        banner = server.stdout.readline()  # printed once the socket is bound, before serving
        match = re.search(r"at http://([^:]+):(\d+)", banner)
        assert match, banner + log.read_text()
        assert match.group(1) == "127.0.0.1"  # no --host: this machine only
        base = f"http://127.0.0.1:{match.group(2)}/v1"
        health = f"http://127.0.0.1:{match.group(2)}/health"
        deadline = time.monotonic() + 60
        while True:  # the banner comes once the socket is bound; uvicorn listens right after
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                httpx.get(health, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        _check_token_required(base)
        assert _generate(base, "m", monkeypatch, TOKEN)[0][0].text is not None
        with pytest.raises(GenerationServerError, match="401"):
            _generate(base, "m", monkeypatch, None)
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=30)
    assert TOKEN not in banner + out + log.read_text()


def test_synthetic_teacher_requires_the_token_it_is_given(monkeypatch, tmp_path):
    recordings = {"model": "teacher", "default": {"text": "<answer>4</answer>", "logprob": -0.1}}
    with synthetic_teacher.start_server(recordings, tmp_path / "guarded", api_key=TOKEN) as (base, log):
        _check_token_required(base)
        assert _generate(base, "teacher", monkeypatch, TOKEN)[0][0].text == "<answer>4</answer>"
        with pytest.raises(GenerationServerError, match="401"):
            _generate(base, "teacher", monkeypatch, "wrong")
    assert TOKEN not in log.read_text()

    # Without api_key it requires none, whatever token this process's environment holds.
    monkeypatch.setenv("KEYEFLOW_API_KEY", TOKEN)
    with synthetic_teacher.start_server(recordings, tmp_path / "open") as (base, _):
        assert _generate(base, "teacher", monkeypatch, None)[0][0].text == "<answer>4</answer>"
