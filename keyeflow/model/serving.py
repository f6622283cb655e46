"""A small OpenAI-compatible chat server around `LocalGenerator`, so that the code that talks to a teacher or
judge (`OpenAICompatibleGenerator`) runs the same against our tiny model here as against vLLM/SGLang at scale.

    python -m keyeflow.model.serving --model PATH [--port 8000] [--host 127.0.0.1] [--served-model-name NAME]
    KEYEFLOW_API_KEY=… python -m keyeflow.model.serving --model PATH     # every request needs the token

Endpoints:
- `POST /v1/chat/completions`: `messages`, `n`, `max_tokens` (or `max_completion_tokens`; default 256),
  `temperature` (default 1; 0 is greedy), `seed`, `logprobs` (+ `top_logprobs` 0) → `choices[i]` with
  `message.content`, `finish_reason` and `logprobs.content[{token, logprob, bytes, top_logprobs: []}]`, and
  `usage`. A request's seed is used as given (`LocalGenerator.generate_one`), so `OpenAICompatibleGenerator`,
  which sends `conversation_seed(seed, messages)`, gets what `LocalGenerator.generate` gives in process.
- `POST /v1/completions`: token ids in and out for RL rollouts (`keyeflow.model.rollout_protocol` documents
  the request: `prompt` as token ids, `n`, `max_tokens`, `temperature`, `seed`, `logprobs` 0,
  `return_token_ids`, `return_tokens_as_token_ids`, `stop_token_ids`, `multi_modal_data` with the image and
  Slow/Fast video patches and grids) → `choices[i]` with `text`, `token_ids`, `finish_reason` and
  `logprobs {tokens, token_logprobs, top_logprobs, text_offset}`.
- `POST /update_weights_from_disk {"model_path"}` (only with `--enable-weight-reload`; SGLang's name and
  fields): load an export (`keyeflow.model.export`) in place of the served weights, between requests →
  `{"success", "message"}`. Off by default: it reads any directory the server process can read.
- `GET /v1/models`, `GET /health`.

Limits, each answered with a clear 400 rather than ignored: text only (content a string or `text` parts;
images and videos go through `LocalGenerator` in process, with a media lookup into our tables); no streaming,
no `stop` strings, no `top_p`/`top_k` other than their defaults, no top-k alternatives (`top_logprobs` > 0).
Errors use OpenAI's shape `{"error": {"message", "type", "code"}}`; a wrong `model` name is a 404 as in vLLM.

One generation runs at a time (a lock; the model is not shared across threads). The server binds 127.0.0.1
unless told otherwise. With a bearer token (`--api-key`, or `KEYEFLOW_API_KEY` in its environment, which
unlike the flag does not show in `ps`), every request but `GET /health` must carry
`Authorization: Bearer <token>` or gets a 401; `OpenAICompatibleGenerator(api_key_env=...)` sends it. Without
a token it warns when bound to anything but loopback. The token is never logged or printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from keyeflow.model.auth import API_KEY_ENV, OPEN_PATHS, bearer_ok
from keyeflow.model.generation import LocalGenerator
from keyeflow.model.rollout_protocol import OUR_OWNER, TOKEN_ID_PREFIX, request_features

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MIN_LOGPROB = -9999.0  # JSON has no -inf (vLLM uses the same floor)


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat-completions request this server reads; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[dict[str, Any]]
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    stream: bool = False
    stop: str | list[str] | None = None
    top_p: float | None = None
    top_k: int | None = None


class CompletionRequest(BaseModel):
    """The fields of a token-id `/v1/completions` request this server reads (`rollout_protocol`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: list[int] | str
    n: int = Field(1, ge=1, le=128)
    max_tokens: int = Field(16, ge=1)  # OpenAI's completions default
    temperature: float = Field(1.0, ge=0.0)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0)
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    stop_token_ids: list[int] | None = None
    multi_modal_data: dict[str, Any] | None = None
    stream: bool = False
    echo: bool = False
    stop: str | list[str] | None = None
    top_p: float | None = None
    top_k: int | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_path: str


class _RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _text_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with content as a string or text parts; anything else is a 400."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise _RequestError(
                        400,
                        f"message {i}: content part type {kind!r} is not supported; this server is text-only",
                    )
    return messages


def _unsupported(request: ChatCompletionRequest) -> str | None:
    if request.stream:
        return "stream=true is not supported"
    if request.stop:
        return "stop strings are not supported"
    if request.top_p not in (None, 1, 1.0):
        return "top_p other than 1 is not supported"
    if request.top_k not in (None, 0, -1):
        return "top_k is not supported"
    if request.top_logprobs:
        return "top_logprobs > 0 is not supported (only the sampled token's logprob is returned)"
    return None


def create_app(
    generator: LocalGenerator,
    model_name: str,
    api_key: str | None = None,
    *,
    weight_reload: bool = False,
) -> FastAPI:
    """The FastAPI app serving `generator` under the name `model_name`; with `api_key`, every request but
    the health check must carry it as a bearer token; with `weight_reload`, `/update_weights_from_disk`
    replaces the served weights."""
    app = FastAPI(title="keyeflow model server", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one generation or reload at a time; a reload waits for the running request
    served = {"generator": generator}  # swapped whole by a reload
    created = int(time.time())

    if api_key:

        @app.middleware("http")
        async def _authenticate(request: Request, call_next):
            if request.url.path in OPEN_PATHS or bearer_ok(request.headers.get("authorization"), api_key):
                return await call_next(request)
            response = _error(
                401, "missing or wrong bearer token (Authorization: Bearer …)", "AuthenticationError"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
            for e in error.errors()
        )
        return _error(400, f"invalid request: {problems}", "BadRequestError")

    @app.exception_handler(_RequestError)
    async def _request_error(request: Request, error: _RequestError) -> JSONResponse:
        return _error(error.status, error.message, error.kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request to %s failed", request.url.path)
        return _error(500, f"internal error: {type(error).__name__}: {error}", "InternalServerError")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": OUR_OWNER}],
        }

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatCompletionRequest) -> dict:
        if request.model is not None and request.model != model_name:
            raise _RequestError(
                404, f"model {request.model!r} not found; this server serves {model_name!r}", "NotFoundError"
            )
        problem = _unsupported(request)
        if problem:
            raise _RequestError(400, problem)
        messages = _text_messages(request.messages)
        max_tokens = request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS
        try:
            with lock:
                generator = served["generator"]
                num_prompt_tokens = generator.num_prompt_tokens(messages)
                completions = generator.generate_one(
                    messages, n=request.n, max_new_tokens=max_tokens, temperature=request.temperature,
                    seed=request.seed, logprobs=True,  # tokens kept for `usage`; logprobs sent if asked
                )  # fmt: skip
        except (ValueError, TypeError) as error:  # bad messages or arguments: the caller's to fix
            raise _RequestError(400, str(error)) from error

        choices = []
        for index, completion in enumerate(completions):
            logprobs = None
            if request.logprobs:
                logprobs = {
                    "content": [
                        {
                            "token": token,
                            "logprob": logprob if math.isfinite(logprob) else MIN_LOGPROB,
                            "bytes": list(token.encode("utf-8")),
                            "top_logprobs": [],
                        }
                        for token, logprob in zip(completion.tokens, completion.token_logprobs)
                    ]
                }
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": logprobs,
            })  # fmt: skip
        num_completion_tokens = sum(len(c.tokens) for c in completions)
        usage = {
            "prompt_tokens": num_prompt_tokens,
            "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": usage,
        }

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> dict:
        if request.model is not None and request.model != model_name:
            raise _RequestError(
                404, f"model {request.model!r} not found; this server serves {model_name!r}", "NotFoundError"
            )
        problem = _unsupported_completion(request)
        if problem:
            raise _RequestError(400, problem)
        try:
            with lock:
                generator = served["generator"]
                stops = set(request.stop_token_ids or ())
                if not stops <= generator.stop_token_ids:
                    raise _RequestError(
                        400,
                        f"stop_token_ids {sorted(stops - generator.stop_token_ids)} are not the model's stop "
                        f"tokens {sorted(generator.stop_token_ids)} (the only ones this server stops on)",
                    )
                prompt = request_features(request.prompt, request.multi_modal_data, generator.model.config)
                completions = generator.generate_from_features(
                    prompt, n=request.n, max_new_tokens=request.max_tokens, temperature=request.temperature,
                    seed=request.seed, logprobs=True,
                )  # fmt: skip
        except (ValueError, TypeError) as error:
            raise _RequestError(400, str(error)) from error
        choices = []
        for index, completion in enumerate(completions):
            choice: dict[str, Any] = {
                "index": index,
                "text": completion.text,
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
            if request.return_token_ids:
                choice["token_ids"] = completion.token_ids
                choice["prompt_token_ids"] = request.prompt
            if request.logprobs is not None:
                tokens = (
                    [f"{TOKEN_ID_PREFIX}{i}" for i in completion.token_ids]
                    if request.return_tokens_as_token_ids
                    else completion.tokens
                )
                choice["logprobs"] = {
                    "tokens": tokens,
                    "token_logprobs": [
                        lp if math.isfinite(lp) else MIN_LOGPROB for lp in completion.token_logprobs
                    ],
                    "top_logprobs": None,
                    "text_offset": completion.token_offsets,
                }
            choices.append(choice)
        num_completion_tokens = sum(len(c.token_ids) for c in completions)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(request.prompt),
                "completion_tokens": num_completion_tokens,
                "total_tokens": len(request.prompt) + num_completion_tokens,
            },
        }

    @app.post("/update_weights_from_disk")
    def update_weights_from_disk(request: ReloadRequest) -> JSONResponse:
        if not weight_reload:
            return JSONResponse(
                {
                    "success": False,
                    "message": "weight reload is off (start the server with --enable-weight-reload)",
                },
                status_code=404,
            )
        current = served["generator"]
        try:
            # Loaded outside the lock (requests keep running on the old weights), swapped under it.
            loaded = LocalGenerator(request.model_path, device=current.device)
        except (ValueError, OSError, KeyError) as error:
            return JSONResponse(
                {"success": False, "message": f"could not load {request.model_path}: {error}"},
                status_code=400,
            )
        old, new = current.model.config.text_config, loaded.model.config.text_config
        if (old.vocab_size, old.hidden_size, old.num_hidden_layers) != (
            new.vocab_size,
            new.hidden_size,
            new.num_hidden_layers,
        ):
            return JSONResponse(
                {
                    "success": False,
                    "message": f"{request.model_path} is another architecture than the served model",
                },
                status_code=400,
            )
        with lock:
            served["generator"] = loaded
        logger.info("reloaded weights from %s", request.model_path)
        return JSONResponse({"success": True, "message": f"loaded {request.model_path}"})

    return app


def _unsupported_completion(request: CompletionRequest) -> str | None:
    if isinstance(request.prompt, str):
        return "prompt must be a list of token ids (this server takes no text prompts on /v1/completions)"
    if request.stream or request.echo:
        return "stream and echo are not supported"
    if request.stop:
        return "stop strings are not supported (use stop_token_ids)"
    if request.top_p not in (None, 1, 1.0) or request.top_k not in (None, 0, -1):
        return "top_p/top_k other than their defaults are not supported"
    if request.logprobs:
        return "logprobs > 0 is not supported (0: only the sampled token's logprob is returned)"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    served_model_name: str | None = None,
    device: str = "cpu",
    log_level: str = "info",
    api_key: str | None = None,
    weight_reload: bool = False,
) -> None:
    """Load the model at `model_path` and serve it until interrupted (SIGINT/SIGTERM). `port=0` takes any
    free port; the address actually bound is printed (`keyeflow serving NAME at http://HOST:PORT`).
    `served_model_name` defaults to `model_path` as given, like vLLM. `api_key` (default: the environment's
    `KEYEFLOW_API_KEY`) makes every request but the health check need it as a bearer token."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    generator = LocalGenerator(model_path, device=device)
    name = served_model_name or str(model_path)
    app = create_app(generator, name, api_key, weight_reload=weight_reload)
    if not _is_loopback(host) and not api_key:
        logger.warning(
            "serving on %s without a token (--api-key or %s): anyone who reaches it can use it",
            host,
            API_KEY_ENV,
        )
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"keyeflow serving {name} at http://{url_host}:{bound_port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m keyeflow.model.serving",
        description="OpenAI-compatible chat server for a keyeflow model",
    )
    parser.add_argument(
        "--model", required=True, help="checkpoint directory (ours or the Keye-VL-1.5 layout)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 takes any free port (default 8000)"
    )
    parser.add_argument(
        "--served-model-name", default=None, help="name clients ask for (default: --model as given)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"bearer token every request but /health must carry (default: ${API_KEY_ENV}; the variable "
        "keeps it out of the process list)",
    )
    parser.add_argument(
        "--enable-weight-reload",
        action="store_true",
        help="serve POST /update_weights_from_disk (RL weight sync; loads any directory this process reads)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(
        args.model, args.host, args.port, served_model_name=args.served_model_name, device=args.device,
        log_level=args.log_level, api_key=args.api_key, weight_reload=args.enable_weight_reload,
    )  # fmt: skip


if __name__ == "__main__":
    main()
