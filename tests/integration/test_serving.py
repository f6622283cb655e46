"""The OpenAI-compatible path end to end: the real server (`python -m keyeflow.model.serving`) as a subprocess
on 127.0.0.1, `OpenAICompatibleGenerator` against it giving exactly what `LocalGenerator` gives in process,
clear errors (404, 400, 500 after retries), and retries on 503 and on a server that comes up late (tiny real
`http.server` servers stand in for those). Every server binds 127.0.0.1 only and is stopped in a `finally`."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch

from keyeflow.model.config import tiny
from keyeflow.model.generation import GenerationServerError, LocalGenerator, OpenAICompatibleGenerator
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SERVED_NAME = "keye-tiny"
CONVERSATIONS = [
    [{"role": "user", "content": "Count the red blocks. /think"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What colour is the sky?"}]},
    ],
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("served-model")
    KeyeForConditionalGeneration(tiny(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, serve_model):
    """The real server in a subprocess; yields its base URL (…/v1)."""
    with serve_model(model_dir, SERVED_NAME, tmp_path_factory.mktemp("server-log")) as url:
        yield url


def test_server_equals_local_generator(server, model_dir):
    remote = OpenAICompatibleGenerator(server, SERVED_NAME, timeout=30, max_retries=0)
    local = LocalGenerator(model_dir)
    args = {"n": 3, "max_new_tokens": 12, "temperature": 1.0, "seed": 7, "logprobs": True}
    got = remote.generate(CONVERSATIONS, **args)
    expected = local.generate(CONVERSATIONS, **args)
    assert [len(group) for group in got] == [3, 3]
    for got_group, expected_group in zip(got, expected):
        assert len({c.text for c in got_group}) == 3
        for g, e in zip(got_group, expected_group):
            assert len(g.tokens) == len(g.token_logprobs) == len(g.token_offsets) > 0
            assert (g.text, g.tokens, g.token_offsets, g.finish_reason) == (
                e.text, e.tokens, e.token_offsets, e.finish_reason,
            )  # fmt: skip
            assert g.token_logprobs == pytest.approx(e.token_logprobs, abs=1e-5)
    # Greedy, and text without logprobs.
    greedy = remote.generate(
        CONVERSATIONS[:1], n=1, max_new_tokens=8, temperature=0, seed=None, logprobs=False
    )
    local_greedy = local.generate(
        CONVERSATIONS[:1], n=1, max_new_tokens=8, temperature=0, seed=None, logprobs=False
    )
    assert greedy[0][0].text == local_greedy[0][0].text and greedy[0][0].tokens == []


def test_models_health_and_raw_response_shape(server):
    root = server.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(f"{server}/models").json()["data"]] == [SERVED_NAME]
    body = httpx.post(
        f"{server}/chat/completions",
        json={"model": SERVED_NAME, "messages": CONVERSATIONS[0], "n": 2, "max_tokens": 5, "seed": 1,
              "logprobs": True, "top_logprobs": 0, "top_p": 1.0},
    ).json()  # fmt: skip
    assert body["object"] == "chat.completion" and len(body["choices"]) == 2
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert {"token", "logprob", "bytes", "top_logprobs"} <= set(choice["logprobs"]["content"][0])
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in body["choices"])


def test_server_errors_are_clear_and_not_retried(server):
    wrong_model = OpenAICompatibleGenerator(server, "no-such-model", max_retries=3, backoff_s=5)
    started = time.monotonic()
    with pytest.raises(GenerationServerError, match="404.*no-such-model") as error:
        wrong_model.generate(CONVERSATIONS[:1], n=1, max_new_tokens=2, temperature=0, seed=0, logprobs=True)
    assert error.value.status == 404
    assert time.monotonic() - started < 4, "a 404 must not be retried"

    wrong_path = OpenAICompatibleGenerator(server.removesuffix("/v1"), SERVED_NAME, max_retries=0)
    with pytest.raises(GenerationServerError, match="404"):
        wrong_path.generate(CONVERSATIONS[:1], n=1, max_new_tokens=2, temperature=0, seed=0, logprobs=True)

    remote = OpenAICompatibleGenerator(server, SERVED_NAME, max_retries=0)
    image_url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(GenerationServerError, match="400.*text-only"):
        remote.generate([image_url], n=1, max_new_tokens=2, temperature=0, seed=0, logprobs=True)
    with pytest.raises(GenerationServerError, match="400.*role"):
        remote.generate([[{"role": "robot", "content": "hi"}]], n=1, max_new_tokens=2, temperature=0, seed=0,
                        logprobs=True)  # fmt: skip
    with pytest.raises(GenerationServerError, match="400.*max_position_embeddings"):
        remote.generate(CONVERSATIONS[:1], n=1, max_new_tokens=10_000, temperature=0, seed=0, logprobs=True)
    response = httpx.post(f"{server}/chat/completions", json={"messages": CONVERSATIONS[0], "n": 0})
    assert response.status_code == 400 and "n" in response.json()["error"]["message"]
    response = httpx.post(f"{server}/chat/completions", json={"messages": CONVERSATIONS[0], "stream": True})
    assert response.status_code == 400 and "stream" in response.json()["error"]["message"]
    with pytest.raises(ValueError, match="image_url"):
        remote.generate([[{"role": "user", "content": [{"type": "image", "image_id": "x"}]}]], n=1,
                        max_new_tokens=2, temperature=0, seed=0, logprobs=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- stand-ins


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 that answers each POST with the next (status, body) of `script` (the
    last one repeats) and records the requests it got."""

    def __init__(self, script: list[tuple[int, dict]], port: int = 0):
        self.script, self.requests = script, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                status, reply = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def ok_body(n: int) -> dict:
    content = [{"token": "Hi", "logprob": -0.5}, {"token": " there", "logprob": -1.0},
               {"token": "<|im_end|>", "logprob": -0.1}]  # fmt: skip
    return {
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop",
             "logprobs": {"content": content}}
            for i in reversed(range(n))
        ]
    }  # fmt: skip


def test_retries_503_then_succeeds_and_sends_the_key_only_in_the_header(monkeypatch):
    monkeypatch.setenv("KEYEFLOW_TEST_KEY", "sk-secret-123")
    script = [(503, {"error": {"message": "overloaded"}}), (503, {"error": {"message": "overloaded"}}),
              (200, ok_body(2))]  # fmt: skip
    with ScriptedServer(script) as stub:
        remote = OpenAICompatibleGenerator(stub.url, "m", api_key_env="KEYEFLOW_TEST_KEY", max_retries=3,
                                           backoff_s=0.01)  # fmt: skip
        [[first, _]] = remote.generate(
            CONVERSATIONS[:1], n=2, max_new_tokens=4, temperature=0.5, seed=3, logprobs=True
        )
    assert len(stub.requests) == 3
    path, headers, body = stub.requests[-1]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert (
        body["n"] == 2 and body["logprobs"] is True and body["top_logprobs"] == 0 and body["max_tokens"] == 4
    )
    assert isinstance(body["seed"], int)
    assert "sk-secret" not in repr(remote)
    assert first.tokens == ["Hi", " there", "<|im_end|>"] and first.token_offsets == [0, 2, 8]
    assert first.token_logprobs == [-0.5, -1.0, -0.1] and first.finish_reason == "stop"


def test_500_fails_clearly_after_retries(monkeypatch):
    monkeypatch.setenv("KEYEFLOW_TEST_KEY", "sk-secret-123")
    with ScriptedServer([(500, {"error": {"message": "CUDA out of memory"}})]) as stub:
        remote = OpenAICompatibleGenerator(stub.url, "m", api_key_env="KEYEFLOW_TEST_KEY", max_retries=2,
                                           backoff_s=0.01)  # fmt: skip
        with pytest.raises(GenerationServerError, match="3 attempt.*500.*CUDA out of memory") as error:
            remote.generate(CONVERSATIONS[:1], n=1, max_new_tokens=4, temperature=0, seed=0, logprobs=True)
    assert len(stub.requests) == 3 and error.value.status == 500
    assert "sk-secret" not in str(error.value)


def test_missing_logprobs_or_wrong_choice_count_is_an_error():
    body = ok_body(1)
    body["choices"][0]["logprobs"] = None
    with ScriptedServer([(200, body)]) as stub:
        remote = OpenAICompatibleGenerator(stub.url, "m", max_retries=0)
        with pytest.raises(GenerationServerError, match="no logprobs"):
            remote.generate(CONVERSATIONS[:1], n=1, max_new_tokens=4, temperature=0, seed=0, logprobs=True)
        with pytest.raises(GenerationServerError, match="n=2"):
            remote.generate(CONVERSATIONS[:1], n=2, max_new_tokens=4, temperature=0, seed=0, logprobs=False)


def test_retries_until_a_late_server_comes_up():
    port = free_port()  # nothing listens there for the first second: connections are refused
    holder: dict = {}

    def start_later():
        time.sleep(1.0)
        holder["server"] = ScriptedServer([(200, ok_body(1))], port=port).__enter__()

    starter = threading.Thread(target=start_later)
    starter.start()
    try:
        remote = OpenAICompatibleGenerator(f"http://127.0.0.1:{port}/v1", "m", max_retries=6, backoff_s=0.2)
        out = remote.generate(CONVERSATIONS, n=1, max_new_tokens=4, temperature=0, seed=0, logprobs=True)
        assert [group[0].text for group in out] == ["Hi there", "Hi there"]
    finally:
        starter.join(timeout=10)
        if "server" in holder:
            holder["server"].__exit__(None, None, None)

    nobody = OpenAICompatibleGenerator(
        f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=1, backoff_s=0.01
    )
    with pytest.raises(GenerationServerError, match="2 attempt.*Connect"):
        nobody.generate(CONVERSATIONS[:1], n=1, max_new_tokens=4, temperature=0, seed=0, logprobs=True)
