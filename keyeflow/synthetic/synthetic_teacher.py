"""The synthetic LongCoT teacher: a programmatic solver behind an OpenAI-compatible chat server.

A real teacher (Keye-VL behind vLLM or SGLang, any OpenAI-compatible server) cannot run on a CPU, and our
tiny random model answers nothing correctly, so the LongCoT flow would keep no path and post-training would
have no LongCoT data. ``keyeflow run`` therefore starts this server for its LongCoT step (``--teacher-url``
points it at a real teacher instead). It is a real process on 127.0.0.1 speaking ``/v1/chat/completions``
(``choices[i].message.content``, ``logprobs.content[{token, logprob}]``), so ``OpenAICompatibleGenerator``
and the whole flow run unchanged against it, as they would against vLLM.

    python -m keyeflow.synthetic.synthetic_teacher --config FILE [--port 0] [--log REQUESTS.jsonl]
        [--paths-log PATHS.jsonl] [--api-key TOKEN]

**What it answers.** The config (:func:`teacher_config`) holds the questions it can solve, each with its
reference solution (``steps``, ``answer_forms``, ``wrong_answers``; the sample questions'
``longcot_questions.SOLUTIONS`` and the verifiable task families' solutions): a request whose last user
message holds a known question's text (and, for a question on media, sends media with the same SHA-256
content hashes: an image's data URL or a video's file URL) gets ``n`` reasoning paths written from that
solution. Any other request gets "I cannot tell" with the answer "unknown".

**Paths and their error kinds** (:data:`ERROR_KINDS`, :data:`DEFAULT_PROPORTIONS`). Path ``i`` of a question
is drawn by ``random.Random(f"{seed}|{question}|{media hashes, comma-joined}|{i}")``: the same request gets
the same paths on every run, and two questions with one text on different pictures get their own draws.
Its kind is drawn with the config's ``proportions`` (default: correct 0.5, wrong_step 0.2, wrong_arithmetic
0.1, irrelevant_step 0.1, repeated_step 0.1); a kind that cannot apply to a solution (wrong_arithmetic with no
``a op b = c`` step, wrong_step with no wrong answer) is drawn again among those that can, with the same
weights. A ``plans`` entry (``{question substring: [kind, ...]}``) fixes the kinds instead: path ``i`` is
``plan[i % len(plan)]`` (tests use it to get a flawed path where they need one).

Path ``i`` is written in style ``STYLES[i % 3]`` (a teacher's paths are worded differently, so LongCoT can
keep several correct ones instead of dropping near-duplicates): ``numbered`` ("Step 1: …"), ``connectives``
("First, … Then, … Finally, …") or ``restated`` ("The question asks: …", then "(1) …", "(2) …"); the step
texts are the solution's own.

- ``correct``: the reference steps; the answer in form ``answer_forms[i % len]`` (½ / 1/2 / 0.5): graded A.
- ``wrong_step``: the last step reaches a wrong value (a seeded pick of ``wrong_answers``) and the answer
  carries it: a wrong answer, graded C.
- ``wrong_arithmetic``: one ``a op b = c`` claim gets a wrong result (c ± a seeded offset), the rest of the
  path and the answer stay right: the process check catches the false claim, graded B.
- ``irrelevant_step``: a digression that shares no word with the question is inserted at a seeded place:
  relevance 0, graded B.
- ``repeated_step``: a step is written twice (numbered on, or word for word in the other styles):
  redundancy, a "borderline A" that people review.

**Log-probs follow from what it did.** Every token's log-prob is the log of the probability the solver gave
the token it wrote: a token of the reference solution (or of a listed answer form) was its top choice, with
probability ``1 - e`` (``e`` drawn per token from U[0.005, 0.08]); a token it wrote instead (a corrupted
number, a wrong answer, an inserted or repeated step) was an alternative, with probability ``q`` drawn per
token from U[0.05, 0.35]. So LongCoT's step confidences (exp of the mean token log-prob) are lower exactly on
the steps it corrupted. Tokens are whitespace-led word pieces, so ``"".join(tokens) == text``.

**Served paths.** Every path it serves is appended to ``--paths-log`` (``{"question", "path_index", "kind",
"answer"}``), so tests can join what the graders said with what the solver did.

**Server behaviour.** It binds 127.0.0.1 only. With a token (``--api-key`` or ``KEYEFLOW_API_KEY``;
``start_server(api_key=...)`` passes it in the environment) every request but ``GET /health`` needs
``Authorization: Bearer <token>`` (401 otherwise). Every request is appended to ``--log`` (bodies only, never
headers; data URLs shortened) when it arrives, before it is answered, so tests can check what was sent and
count attempts (a request the client gave up on is logged too).

Fixed replies and misbehaviour (config ``entries``, checked in order before the solver): an entry
``{"match": substring, "completions": [completion, ...]}`` answers a matching request with fixed text
(tests use it to stand in for a judge model or a question rewriter; choice ``i`` of ``n`` is
``completions[i % len]``; a completion is ``{"text": str, "logprob": float}``). For the bad-input tests an
entry can misbehave, as a real server does: ``"delay_s": seconds`` waits before answering; ``"respond":
{"status": int, "body": str | object}`` answers that instead (a string body is sent as it is: malformed
output; an object as JSON). With ``"times": k`` the misbehaviour applies to the first k matching requests,
then the request goes on (a transient failure that a retry gets past); without it, to every request. An
entry without ``completions`` only misbehaves: a request it lets through goes on to the next entry, then
the solver. A request nothing answers gets the config's ``"default"`` completion (when given) or "unknown".
With fixed replies and no questions the server is a plain stand-in for any chat model (tests use it as a
policy or a judge).

``start_server(config, workdir)`` runs it as a subprocess and yields its base URL and request log; it stops
the server when the ``with`` block ends.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from keyeflow.model.auth import API_KEY_ENV, OPEN_PATHS, bearer_ok
from keyeflow.synthetic.longcot_questions import SOLUTIONS

MODEL = "synthetic-teacher"
ERROR_KINDS = ("correct", "wrong_step", "wrong_arithmetic", "irrelevant_step", "repeated_step")
DEFAULT_PROPORTIONS = {
    "correct": 0.5,
    "wrong_step": 0.2,
    "wrong_arithmetic": 0.1,
    "irrelevant_step": 0.1,
    "repeated_step": 0.1,
}
TOP_CHOICE_MISS = (0.005, 0.08)  # 1 - p of a token the solver copied from the reference solution
ALTERNATIVE_P = (0.05, 0.35)  # p of a token it wrote instead of its top choice
# Digressions for irrelevant_step: none shares a content word with another or with the sample questions.
DIGRESSIONS = (
    "The weather in Paris is lovely in spring and the cafes are busy.",
    "Lighthouses were once kept by families who lived beside the lamp.",
    "Bees dance to tell each other where flowers grow.",
    "Glaciers carve wide valleys over thousands of years.",
)
# Fixed kinds for some sample questions (``teacher_config(plans=SAMPLE_PLANS)``), for tests and demos that
# need a known flawed path on a known question: every error kind on one question each (one path of it among
# four, the others wrong answers, so one path per question comes up for review), correct paths
# cycling through answer forms written unlike the reference (½ / 1/2 / 0.5, 1000 m / 1 km, \frac{1}{2} /
# 50%), and, last, every other question answered wrongly (the empty match holds for every prompt).
SAMPLE_PLANS: dict[str, list[str]] = {
    "What is 1 divided by 2?": ["correct", "correct", "correct", "wrong_step"],
    "A road is 1000 m long.": ["correct"],
    "What fraction of the pizza is eaten?": ["correct"],
    "Solve for x: 3x + 5 = 20.": ["correct", "irrelevant_step", "wrong_step", "wrong_step"],
    "What is 15% of 240?": ["repeated_step", "wrong_step", "wrong_step", "wrong_step"],
    "interior angles of a triangle": ["wrong_arithmetic", "wrong_step", "wrong_step", "wrong_step"],
    "Simplify (x + 1)^2 - (x - 1)^2.": ["wrong_step"],
    "What share of the tokens does the image bar show?": ["correct"],
    "bounding box of the red rectangle": ["correct"],
    "": ["wrong_step"],
}
UNKNOWN = "<think>\nI cannot tell.\n</think>\n<answer>unknown</answer>"
_PIECE = re.compile(r"\s*\S+|\s+")
_STEP_PREFIX = re.compile(r"^Step \d+: ")
_CLAIM = re.compile(r"(-?\d+(?:\.\d+)?(?:\s*[-+*/×÷]\s*-?\d+(?:\.\d+)?)+\s*=\s*)(-?\d+(?:\.\d+)?)(?![.,]?\d)")


# =========================================================================================== solving


def _pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


def _kind_applies(kind: str, solution: dict) -> bool:
    if kind == "wrong_arithmetic":
        return any(_CLAIM.search(step) for step in solution["steps"])
    if kind == "wrong_step":
        return bool(solution.get("wrong_answers"))
    return True


def path_kind(solution: dict, rng: random.Random, proportions: dict[str, float]) -> str:
    """A kind drawn with ``proportions`` among those that apply to ``solution`` (module docstring)."""
    kinds = [k for k in ERROR_KINDS if proportions.get(k, 0) > 0 and _kind_applies(k, solution)]
    return rng.choices(kinds, weights=[proportions[k] for k in kinds])[0]


STYLES = ("numbered", "connectives", "restated")


def _styled(steps: list[str], roles: list[str], style: str, question: str) -> list[str]:
    """The steps written in ``style`` (module docstring). Roles: "step" (the solution's), "aside" (a
    digression: no marker, so its own step number never ties it to a number of the question) and "repeat"
    (a step written again: numbered on as a step, or else a verbatim copy of the step before it)."""
    counted = [
        k for k, role in enumerate(roles) if role == "step" or (role == "repeat" and style == "numbered")
    ]
    out = list(steps)
    for position, k in enumerate(counted):
        text = steps[k]
        if style == "numbered":
            out[k] = f"Step {position + 1}: {text}"
        elif style == "connectives" and len(counted) > 1:
            word = "First" if position == 0 else "Finally" if position == len(counted) - 1 else "Then"
            lowered = text[0].lower() + text[1:] if len(text) > 1 and text[1].islower() else text
            out[k] = f"{word}, {lowered}"
        elif style == "restated":
            out[k] = f"({position + 1}) {text}"
    for k, role in enumerate(roles):
        if role == "repeat" and style != "numbered":
            out[k] = out[k - 1]
    if style == "restated":
        out.insert(0, f"The question asks: {question}")
    return out


def write_path(
    solution: dict, kind: str, index: int, rng: random.Random, question: str = ""
) -> tuple[list[tuple[str, bool]], str]:
    """The path of ``kind`` as (text, written by the solver instead of copied) pieces of the think part,
    one list entry per step, and its answer. ``index`` picks the style and the answer form."""
    bare = [_STEP_PREFIX.sub("", s) for s in solution["steps"]]
    changed = [False] * len(bare)
    roles = ["step"] * len(bare)
    forms = solution.get("answer_forms") or [solution["answer"]]
    answer = forms[index % len(forms)]
    if kind == "wrong_step":
        wrong = rng.choice(solution["wrong_answers"])
        last = bare[-1]
        pattern = re.compile(rf"(?<![\w.]){re.escape(solution['answer'])}(?![\w]|\.\d)")
        bare[-1] = pattern.sub(lambda _: wrong, last) if pattern.search(last) else f"{last} So it is {wrong}."
        changed[-1] = True
        answer = wrong
    elif kind == "wrong_arithmetic":
        k = rng.choice([k for k, s in enumerate(bare) if _CLAIM.search(s)])
        match = rng.choice(list(_CLAIM.finditer(bare[k])))
        value = float(match.group(2))
        offset = rng.choice((1, 2, 3, 10)) * (1 if value < 1 or rng.random() < 0.6 else -1)
        wrong = value + offset
        text = f"{wrong:g}" if "." not in match.group(2) else f"{wrong:.{len(match.group(2).split('.')[1])}f}"
        bare[k] = bare[k][: match.start(2)] + text + bare[k][match.end(2) :]
        changed[k] = True
    elif kind == "irrelevant_step":
        at = rng.randint(1, len(bare)) if len(bare) > 1 else 1
        bare.insert(at, rng.choice(DIGRESSIONS))
        changed.insert(at, True)
        roles.insert(at, "aside")
    elif kind == "repeated_step":
        k = rng.randrange(len(bare))
        bare.insert(k + 1, bare[k])
        changed.insert(k + 1, True)
        roles.insert(k + 1, "repeat")
    style = STYLES[index % len(STYLES)]
    steps = _styled(bare, roles, style, question)
    if style == "restated":
        changed.insert(0, False)
    return list(zip(steps, changed)), answer


def path_tokens(
    steps: list[tuple[str, bool]], answer: str, answer_changed: bool, rng: random.Random
) -> tuple[str, list[str], list[float]]:
    """The completion text, its tokens and their log-probs (module docstring: what the solver did)."""
    segments = [("<think>\n", False)]
    for k, (text, changed) in enumerate(steps):
        segments.append((("\n\n" if k else "") + text, changed))
    segments += [("\n</think>\n<answer>", False), (answer, answer_changed), ("</answer>", False)]
    tokens, logprobs = [], []
    for text, changed in segments:
        for piece in _pieces(text):
            tokens.append(piece)
            if changed:
                logprobs.append(math.log(rng.uniform(*ALTERNATIVE_P)))
            else:
                logprobs.append(math.log1p(-rng.uniform(*TOP_CHOICE_MISS)))
    return "".join(tokens), tokens, logprobs


def solve(
    question: dict, n: int, seed: int, proportions: dict[str, float], plan: list[str] | None
) -> list[dict]:
    """``n`` paths for a known question: ``{"text", "tokens", "logprobs", "kind", "answer"}`` each."""
    solution = question["solution"]
    paths = []
    for i in range(n):
        rng = random.Random(f"{seed}|{question['question']}|{','.join(question.get('media', []))}|{i}")
        kind = plan[i % len(plan)] if plan else path_kind(solution, rng, proportions)
        if not _kind_applies(kind, solution):
            raise ValueError(f"the plan asks {kind} of {question['question']!r}, which cannot apply")
        steps, answer = write_path(solution, kind, i, rng, question["question"])
        text, tokens, logprobs = path_tokens(steps, answer, kind == "wrong_step", rng)
        paths.append({"text": text, "tokens": tokens, "logprobs": logprobs, "kind": kind, "answer": answer})
    return paths


# =========================================================================================== config


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def questions_from_files(files: Iterable[Path]) -> list[dict]:
    """The solvable questions of LongCoT question files (rows with a ``solution``): text, media hashes,
    reference and solution. Media paths are relative to their file, as the conversation format has them."""
    out = []
    for file in files:
        file = Path(file)
        for line in file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if not row.get("solution"):
                continue
            content = row["messages"][0]["content"]
            media = []
            if isinstance(content, list):
                media = [
                    _file_hash(file.parent / p[p["type"]])
                    for p in content
                    if p.get("type") in ("image", "video")
                ]
            text = re.sub(r"\s*/(?:no_)?think\s*$", "", _text_of(content)).strip()
            out.append(
                {
                    "question": text,
                    "media": sorted(media),
                    "reference": row["reference"],
                    "solution": row["solution"],
                }
            )
    return out


def teacher_config(
    question_files: Iterable[Path] = (),
    *,
    seed: int = 0,
    proportions: dict[str, float] | None = None,
    plans: dict[str, list[str]] | None = None,
    entries: list[dict] = (),
    sample_questions: bool = True,
) -> dict:
    """The server's config: the sample questions' solutions (``longcot_questions.SOLUTIONS``, unless
    ``sample_questions`` is False) and those of ``question_files``, the seed, the kind proportions, fixed
    plans and fixed entries (module docstring)."""
    proportions = dict(proportions or DEFAULT_PROPORTIONS)
    unknown = set(proportions) - set(ERROR_KINDS)
    if unknown or not any(v > 0 for v in proportions.values()) or any(v < 0 for v in proportions.values()):
        raise ValueError(f"proportions must weigh kinds of {ERROR_KINDS} (>= 0, one > 0), got {proportions}")
    for match, plan in (plans or {}).items():
        if not plan or set(plan) - set(ERROR_KINDS):
            raise ValueError(f"plan for {match!r} must be a non-empty list of {ERROR_KINDS}, got {plan}")
    questions = []
    if sample_questions:
        questions += [
            {"question": q, "media": [], "reference": s["answer"], "solution": s}
            for q, s in SOLUTIONS.items()
        ]
    for q in questions_from_files(question_files):
        q["solution"] = {"answer": q["reference"], **q["solution"]}
        questions.append(q)
    return {
        "model": MODEL,
        "seed": seed,
        "proportions": proportions,
        "plans": dict(plans or {}),
        "entries": list(entries),
        "questions": questions,
    }


def _user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content") or "")
    return ""


def _request_media_hashes(messages: list[dict]) -> list[str]:
    """SHA-256 of the media in the last user message: data URLs decoded, file URLs read."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        hashes = []
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict) or part.get("type") not in ("image_url", "video_url"):
                continue
            url = part[part["type"]].get("url", "")
            if url.startswith("data:"):
                hashes.append(hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest())
            elif url.startswith("file:"):
                path = Path(unquote(urlparse(url).path))
                hashes.append(_file_hash(path) if path.is_file() else f"missing:{path}")
            else:
                hashes.append(f"unreadable:{url[:40]}")
        return sorted(hashes)
    return []


def find_question(config: dict, prompt: str, media: list[str]) -> dict | None:
    """The known question whose text the prompt holds and whose media hashes the request's media have (a
    question without media constraints matches on text alone); the longest text wins."""
    found = [
        q
        for q in config.get("questions", [])
        if q["question"] in prompt and (not q["media"] or q["media"] == media)
    ]
    return max(found, key=lambda q: len(q["question"]), default=None)


def _shorten(value):
    if isinstance(value, str) and value.startswith("data:"):
        return value[:48] + "…"
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    return value


def _fixed(completion: dict) -> dict:
    text = completion["text"]
    tokens = _pieces(text)
    return {
        "text": text,
        "tokens": tokens,
        "logprobs": [float(completion.get("logprob", -0.1))] * len(tokens),
    }


def make_handler(
    config: dict, log_path: Path | None, api_key: str | None = None, paths_log: Path | None = None
):
    model = config.get("model", MODEL)
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

        def _error(self, status: int, message: str, kind: str = "NotFoundError") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def _authorised(self) -> bool:
            if (
                not api_key
                or self.path in OPEN_PATHS
                or bearer_ok(self.headers.get("Authorization"), api_key)
            ):
                return True
            self._error(401, "missing or wrong bearer token (Authorization: Bearer …)", "AuthenticationError")
            return False

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}")

        def _answers(self, body: dict, n: int) -> list[dict] | None:
            """The n completions for a request, or None when an entry already answered it."""
            messages = body.get("messages") or []
            prompt = _user_text(messages)
            for index, entry in enumerate(config.get("entries", [])):
                if entry["match"] not in prompt:
                    continue
                with lock:
                    matched[index] = seen = matched.get(index, 0) + 1
                if seen <= entry.get("times", seen):
                    time.sleep(float(entry.get("delay_s", 0.0)))
                    if "respond" in entry:
                        self._send(int(entry["respond"].get("status", 200)), entry["respond"].get("body", ""))
                        return None
                if "completions" in entry:
                    return [_fixed(entry["completions"][i % len(entry["completions"])]) for i in range(n)]
            question = find_question(config, prompt, _request_media_hashes(messages))
            if question is None:
                return [_fixed(config.get("default") or {"text": UNKNOWN, "logprob": math.log(0.5)})] * n
            plan = next((p for m, p in config.get("plans", {}).items() if m in prompt), None)
            paths = solve(
                question,
                n,
                int(config.get("seed", 0)),
                config.get("proportions") or DEFAULT_PROPORTIONS,
                plan,
            )
            if paths_log is not None:
                with lock, paths_log.open("a", encoding="utf-8") as out:
                    for i, path in enumerate(paths):
                        record = {"question": question["question"], "path_index": i}
                        out.write(
                            json.dumps(record | {"kind": path["kind"], "answer": path["answer"]}) + "\n"
                        )
            return paths

        def do_POST(self) -> None:
            if not self._authorised():
                return
            if self.path != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if log_path is not None:
                with lock, log_path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(_shorten(body)) + "\n")
            if body.get("model") not in (None, model):
                self._error(404, f"model {body.get('model')!r} not found")
                return
            answers = self._answers(body, int(body.get("n", 1)))
            if answers is None:
                return
            choices = []
            for i, answer in enumerate(answers):
                choice = {
                    "index": i,
                    "message": {"role": "assistant", "content": answer["text"]},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                if body.get("logprobs"):
                    choice["logprobs"] = {
                        "content": [
                            {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
                            for tok, lp in zip(answer["tokens"], answer["logprobs"])
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


def serve(
    config_path: Path,
    port: int,
    log_path: Path | None,
    api_key: str | None = None,
    paths_log: Path | None = None,
) -> None:
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(config, log_path, api_key, paths_log))
    print(f"synthetic teacher serving at http://127.0.0.1:{server.server_address[1]}", flush=True)
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
    config: dict,
    workdir: Path,
    timeout_s: float = 30.0,
    port: int | None = None,
    api_key: str | None = None,
) -> Iterator[tuple[str, Path]]:
    """Run the server as a subprocess on ``port`` (default: a free one); yields (base URL with /v1, request
    log path; the served paths go to ``paths.jsonl`` beside it). Giving the port of a server that was down
    brings it back at the same URL. With ``api_key`` it requires that bearer token (passed in its
    environment, not on its command line); without, none, whatever this process's environment holds."""
    import httpx

    workdir.mkdir(parents=True, exist_ok=True)
    config_path, log_path = workdir / "teacher.json", workdir / "requests.jsonl"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    port = port or free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyeflow.synthetic.synthetic_teacher",
            "--config",
            str(config_path),
            "--port",
            str(port),
            "--log",
            str(log_path),
            "--paths-log",
            str(log_path.with_name("paths.jsonl")),
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
                raise RuntimeError(f"synthetic teacher exited: {process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("synthetic teacher not healthy in time")
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
        prog="python -m keyeflow.synthetic.synthetic_teacher",
        description="the synthetic teacher: reasoning paths from reference solutions, with seeded errors",
    )
    parser.add_argument("--config", type=Path, required=True, help="JSON written by teacher_config()")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None, help="append every request body here")
    parser.add_argument("--paths-log", type=Path, default=None, help="append every served path's kind here")
    parser.add_argument("--api-key", default=None, help=f"bearer token to require (default: ${API_KEY_ENV})")
    args = parser.parse_args(argv)
    serve(
        args.config, args.port, args.log, args.api_key or os.environ.get(API_KEY_ENV) or None, args.paths_log
    )


if __name__ == "__main__":
    main()
