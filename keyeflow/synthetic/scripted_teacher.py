"""A scripted LongCoT teacher: an OpenAI-compatible chat server that replays hand-written teacher answers
(``teacher_recordings``) to the sample questions (``keyeflow.synthetic.longcot_questions``).

A real teacher (Keye-VL behind vLLM) cannot run on a CPU, and our tiny random model answers nothing
correctly, so the LongCoT flow would keep no path and post-training would have no LongCoT data.
``keyeflow run`` therefore starts this server with ``teacher_recordings()`` for its LongCoT step, and the
tests that need known good, flawed and wrong reasoning paths use it too. It is a real process on
127.0.0.1 speaking the same ``/v1/chat/completions`` protocol (``choices[i].message.content``,
``logprobs.content[{token, logprob}]``), so ``OpenAICompatibleGenerator`` and the whole flow run unchanged
against it, as they would against vLLM.

    python -m keyeflow.synthetic.scripted_teacher --recordings FILE [--port 0] [--log REQUESTS.jsonl]

It binds 127.0.0.1 only. With a token (``--api-key`` or ``KEYEFLOW_API_KEY``; ``start_server(api_key=...)``
passes it in the environment) every request but ``GET /health`` needs ``Authorization: Bearer <token>``
(401 otherwise), as from the model server. The request log holds bodies only, never headers.

Recordings (JSON): ``{"model": name, "entries": [{"match": substring, "completions": [completion, ...]}],
"default": completion}``. A request is answered by the first entry whose ``match`` occurs in the text of
its last user message; choice ``i`` of ``n`` is ``completions[i % len]``. A completion is ``{"segments":
[[text, logprob], ...]}`` (the text is the concatenation; every token of a segment gets its logprob) or
``{"text": str, "logprob": float}``. Tokens are whitespace-led word pieces, so ``"".join(tokens) == text``.
Every request is appended to ``--log`` (data URLs shortened) when it arrives, before it is answered, so tests
can check what was sent and count attempts (a request the client gave up on is logged too).

For the bad-input tests an entry can also misbehave, as a real server does: ``"delay_s": seconds`` waits
before answering (longer than the client's timeout: a generator that times out); ``"respond": {"status": int,
"body": str | object}`` answers that instead of completions (a string body is sent as it is, so it need not be
JSON: malformed output; an object is sent as JSON, e.g. without ``choices``, or a 503 error). With ``"times":
k`` the misbehaviour applies to the first k requests the entry matches, then it answers normally (a
transient failure that a retry gets past); without it, to every request. An entry without ``completions``
only misbehaves: when it lets a request through, the next matching entry (or the default) answers it, so a
misbehaving entry placed before the teacher's recordings turns a known question bad.

``start_server(recordings, workdir)`` runs it as a subprocess and yields its base URL; it stops the server
when the ``with`` block ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from keyeflow.model.auth import API_KEY_ENV, OPEN_PATHS, bearer_ok

DEFAULT = {"text": "<think>\nI cannot tell.\n</think>\n<answer>unknown</answer>", "logprob": -2.0}
_PIECE = re.compile(r"\s*\S+|\s+")


def tokens_of(completion: dict) -> tuple[str, list[str], list[float]]:
    segments = completion.get("segments") or [[completion["text"], completion.get("logprob", -0.1)]]
    tokens, logprobs = [], []
    for text, logprob in segments:
        pieces = _PIECE.findall(text)
        tokens += pieces
        logprobs += [float(logprob)] * len(pieces)
    text = "".join(tokens)
    return text, tokens, logprobs


def _user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
    return ""


def _shorten(value):
    if isinstance(value, str) and value.startswith("data:"):
        return value[:48] + "…"
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    return value


def _path(steps: list[tuple[str, float]], answer: str) -> dict:
    """A recorded path: think steps (text, token logprob) separated by blank lines, then the answer."""
    segments = [["<think>\n", -0.01]]
    for k, (text, logprob) in enumerate(steps):
        segments.append([("\n\n" if k else "") + text, logprob])
    segments.append([f"\n</think>\n<answer>{answer}</answer>", -0.01])
    return {"segments": segments}


def teacher_recordings() -> dict:
    """What a teacher said about some of the sample questions (``keyeflow.synthetic.longcot_questions``):
    correct paths whose answers are written unlike the reference (½ / 1/2 / 0.5, 1000 m for 1 km,
    \\frac{1}{2} and 50% for 1/2), a path with a digression (B), one with a false calculation (B), a
    repetitive one (borderline A), visual paths (a bar chart, a box), and wrong answers (C). Every other
    prompt gets "unknown" (C)."""
    return {
        "model": "replay-teacher",
        "entries": [
            {
                "match": "What is 1 divided by 2?",
                "completions": [
                    _path(
                        [
                            ("Step 1: Dividing 1 by 2 splits one whole into 2 equal parts.", -0.05),
                            ("Step 2: Each of the 2 parts is one half of 1, and 1 / 2 = 0.5.", -0.05),
                        ],
                        "½",
                    ),
                    _path(
                        [
                            ("Step 1: The question asks for 1 divided by 2.", -0.1),
                            ("Step 2: Written as a fraction, 1 divided by 2 is 1/2.", -0.1),
                        ],
                        "1/2",
                    ),
                    _path(
                        [
                            ("Step 1: Half of 1 is what dividing 1 by 2 gives.", -0.2),
                            ("Step 2: As a decimal, 1 / 2 = 0.5 exactly.", -0.2),
                        ],
                        "0.5",
                    ),
                    _path([("Step 1: 2 / 1 = 2.", -0.3)], "2"),
                ],
            },
            {
                "match": "A road is 1000 m long.",
                "completions": [
                    _path(
                        [
                            ("Step 1: The road is 1000 m long and one kilometre is 1000 m.", -0.05),
                            ("Step 2: So 1000 / 1000 = 1, and the road is 1 km long.", -0.05),
                        ],
                        "1000 m",
                    ),
                    _path(
                        [
                            ("Step 1: Kilometres are metres divided by 1000.", -0.15),
                            ("Step 2: 1000 m / 1000 gives 1 km.", -0.15),
                        ],
                        "1 km",
                    ),
                ],
            },
            {
                "match": "What fraction of the pizza is eaten?",
                "completions": [
                    _path(
                        [
                            ("Step 1: 4 of the 8 slices are eaten.", -0.05),
                            ("Step 2: 4 / 8 = 0.5 of the pizza.", -0.05),
                        ],
                        "\\frac{1}{2}",
                    ),
                    _path(
                        [
                            (
                                (
                                    "Step 1: The pizza has 8 slices and 4 are eaten, "
                                    "so the eaten share is 4 out of 8."
                                ),
                                -0.1,
                            ),
                            ("Step 2: 4 / 8 = 0.5, which is 50%.", -0.1),
                        ],
                        "50%",
                    ),
                ],
            },
            {
                "match": "Solve for x: 3x + 5 = 20.",
                "completions": [
                    _path(
                        [
                            ("Step 1: Subtract 5 from both sides: 20 - 5 = 15, so 3x = 15.", -0.05),
                            ("Step 2: Divide both sides by 3: 15 / 3 = 5.", -0.05),
                        ],
                        "5",
                    ),
                    _path(
                        [
                            ("Step 1: Move the 5 over: 3x = 20 - 5 = 15.", -0.2),
                            (
                                "Step 2: The weather in Paris is lovely in spring and the cafes are busy.",
                                -0.4,
                            ),
                            ("Step 3: Then x = 15 / 3 = 5.", -0.2),
                        ],
                        "5",
                    ),
                ],
            },
            {
                "match": "What is 15% of 240?",
                "completions": [
                    _path(
                        [
                            ("Step 1: 15% of 240 means 0.15 times 240.", -0.1),
                            ("Step 2: 15% of 240 means 0.15 times 240.", -0.1),
                            ("Step 3: 0.15 × 240 = 36.", -0.1),
                        ],
                        "36",
                    ),
                ],
            },
            {
                "match": "interior angles of a triangle",
                "completions": [
                    _path(
                        [
                            ("Step 1: An equilateral triangle has three angles of 60 degrees.", -0.1),
                            (
                                (
                                    "Step 2: 60 + 60 + 60 = 200, "
                                    "but the angle sum of any triangle is 180 degrees."
                                ),
                                -0.1,
                            ),
                        ],
                        "180",
                    ),
                ],
            },
            {
                "match": "Simplify (x + 1)^2 - (x - 1)^2.",
                "completions": [
                    _path([("Step 1: The squares cancel and leave 2x.", -0.5)], "2x"),
                ],
            },
            {
                "match": "What share of the tokens does the image bar show?",
                "completions": [
                    _path(
                        [
                            ("Step 1: The chart in the image has three bars: video, image and text.", -0.05),
                            ("Step 2: The image bar is the tallest and its label reads 50%.", -0.05),
                            ("Step 3: The axis on the left confirms the bar ends at 50.", -0.05),
                        ],
                        "50%",
                    ),
                ],
            },
            {
                "match": "bounding box of the red rectangle",
                "completions": [
                    _path(
                        [
                            ("Step 1: The red rectangle is in the top left part of the image.", -0.05),
                            (
                                (
                                    "Step 2: Its left edge is at about 76 "
                                    "and its right edge at about 374 on the 1000 scale."
                                ),
                                -0.05,
                            ),
                            (
                                (
                                    "Step 3: Its top is near 101 "
                                    "and its bottom near 430, above the green triangle."
                                ),
                                -0.05,
                            ),
                        ],
                        "[[76, 101, 374, 430]]",
                    ),
                ],
            },
        ],
    }


def make_handler(recordings: dict, log_path: Path | None, api_key: str | None = None):
    model = recordings.get("model", "replay-teacher")
    lock = threading.Lock()
    matched: dict[int, int] = {}  # entry index -> requests it matched so far

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: dict | str) -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left: nobody to answer
                pass

        def _authorised(self) -> bool:
            if (
                not api_key
                or self.path in OPEN_PATHS
                or bearer_ok(self.headers.get("Authorization"), api_key)
            ):
                return True
            message = "missing or wrong bearer token (Authorization: Bearer …)"
            self._send(401, {"error": {"message": message, "type": "AuthenticationError", "code": 401}})
            return False

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            else:
                self._send(
                    404, {"error": {"message": f"no route {self.path}", "type": "NotFoundError", "code": 404}}
                )

        def do_POST(self) -> None:
            if not self._authorised():
                return
            if self.path != "/v1/chat/completions":
                self._send(
                    404, {"error": {"message": f"no route {self.path}", "type": "NotFoundError", "code": 404}}
                )
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if log_path is not None:
                with lock, log_path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(_shorten(body)) + "\n")
            if body.get("model") not in (None, model):
                self._send(
                    404,
                    {
                        "error": {
                            "message": f"model {body.get('model')!r} not found",
                            "type": "NotFoundError",
                            "code": 404,
                        }
                    },
                )
                return
            prompt = _user_text(body.get("messages") or [])
            completions = [recordings.get("default", DEFAULT)]
            for index, entry in enumerate(recordings.get("entries", [])):
                if entry["match"] not in prompt:
                    continue
                with lock:
                    matched[index] = seen = matched.get(index, 0) + 1
                if seen <= entry.get("times", seen):
                    time.sleep(float(entry.get("delay_s", 0.0)))
                    if "respond" in entry:
                        self._send(int(entry["respond"].get("status", 200)), entry["respond"].get("body", ""))
                        return
                if "completions" in entry:
                    completions = entry["completions"]
                    break
            choices = []
            for i in range(int(body.get("n", 1))):
                text, tokens, logprobs = tokens_of(completions[i % len(completions)])
                choice = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                if body.get("logprobs"):
                    choice["logprobs"] = {
                        "content": [
                            {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
                            for tok, lp in zip(tokens, logprobs)
                        ]
                    }
                choices.append(choice)
            self._send(
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": choices,
                },
            )

    return Handler


def serve(recordings_path: Path, port: int, log_path: Path | None, api_key: str | None = None) -> None:
    recordings = json.loads(Path(recordings_path).read_text(encoding="utf-8"))
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(recordings, log_path, api_key))
    print(f"replay serving at http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def free_port() -> int:
    """A port nothing listens on (until someone binds it): a server that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def requests_for(log_path: Path, match: str) -> int:
    """How many logged requests (attempts included) had ``match`` in their last user message."""
    if not log_path.is_file():
        return 0
    return sum(
        match in _user_text(json.loads(line).get("messages") or [])
        for line in log_path.read_text(encoding="utf-8").splitlines()
    )


@contextlib.contextmanager
def start_server(
    recordings: dict,
    workdir: Path,
    timeout_s: float = 30.0,
    port: int | None = None,
    api_key: str | None = None,
) -> Iterator[tuple[str, Path]]:
    """Run the server as a subprocess on ``port`` (default: a free one); yields (base URL with /v1, request
    log path). Giving the port of a server that was down brings it back at the same URL. With ``api_key``
    it requires that bearer token (passed in its environment, not on its command line); without, none,
    whatever this process's environment holds."""
    import httpx

    workdir.mkdir(parents=True, exist_ok=True)
    recordings_path, log_path = workdir / "recordings.json", workdir / "requests.jsonl"
    recordings_path.write_text(json.dumps(recordings), encoding="utf-8")
    port = port or free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyeflow.synthetic.scripted_teacher",
            "--recordings",
            str(recordings_path),
            "--port",
            str(port),
            "--log",
            str(log_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        | ({API_KEY_ENV: api_key} if api_key else {}),
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"replay server exited: {process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("replay server not healthy in time")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1", log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m keyeflow.synthetic.scripted_teacher",
        description="replay recorded chat completions (a recorded teacher)",
    )
    parser.add_argument("--recordings", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--api-key", default=None, help=f"bearer token to require (default: ${API_KEY_ENV})")
    args = parser.parse_args(argv)
    serve(args.recordings, args.port, args.log, args.api_key or os.environ.get(API_KEY_ENV) or None)


if __name__ == "__main__":
    main()
