"""Token-in, token-out rollouts over HTTP: one request shape that vLLM's and SGLang's OpenAI-compatible
`/v1/completions` and our own server (`keyeflow.model.serving`) accept, the client that RL samples through
(`HTTPRolloutGenerator`) and the weight-reload call (`reload_weights`).

Why token ids, not chat messages: the trainer scores exactly the prompt it encoded (chat template, media
expanded into pad tokens, `<|im_start|>assistant\\n`) followed by exactly the ids that were sampled. A server
that renders the chat itself, or a client that re-tokenises returned text, can give other ids (another
template, a byte-level BPE merging differently), and the policy gradient would score tokens nobody sampled.

**Request** (`rollout_request`), `POST {base_url}/completions`, JSON:

- `model`: the served model name;
- `prompt`: list[int], the prompt's token ids as the trainer encodes them (`LocalGenerator.encode_prompt`).
  OpenAI's completions API takes a token array as `prompt`; vLLM and SGLang pass it to the engine unchanged;
- `n`: G; `max_tokens`; `temperature`; `seed`: the conversation's seed (`conversation_seed`), so a server
  that seeds per request (ours; vLLM's `seed`) samples the same for the same call;
- `logprobs`: 0, the sampled token's log-prob and no alternatives (completions API: an int, the number of
  alternatives; vLLM returns raw log-probs, before temperature, as ours);
- `return_token_ids`: true (vLLM >= 0.10.2: `choices[i].token_ids`, the sampled ids);
  `return_tokens_as_token_ids`: true (older vLLM: `logprobs.tokens[j]` is `"token_id:<id>"`; a fallback);
- `stop_token_ids`: the model's stop ids (`<|im_end|>`, `<|endoftext|>`; vLLM's and SGLang's sampling
  extension); generation stops on one and it is the completion's last id, as the trainer scores it;
- `multi_modal_data` (only when the prompt holds image/video pad ids; keyeflow's extension):
  `{"pixel_values": TENSOR, "grid_thw": [[t, h, w], ...]}`: every image's and video frame's uint8 patches
  (`[num_patches, 3·14·14]`, our merge-group row order) and grids, in token order, as
  `processor.encode_sample` builds them. A Slow/Fast video is one `(1, h, w)` grid per frame (slow and
  fast frames differ in h, w); its frame kinds and timestamps are text tokens already in `prompt`. TENSOR is
  `{"dtype": "uint8", "shape": [rows, cols], "data": base64 of the row-major bytes}`. The server rebuilds
  the 3D RoPE positions from `prompt` and `grid_thw` (`modeling.mrope_position_ids`), as the trainer does.

**Response**: OpenAI's completions shape; per choice: `index`, `text`, `finish_reason` ("stop"/"length"),
`token_ids` (sampled ids, stop id included), `logprobs: {tokens, token_logprobs, top_logprobs, text_offset}`.
The client takes the ids from `token_ids`, else from `"token_id:<id>"` tokens; it decodes the text itself
from the ids with the trainer's tokenizer (`token_pieces`), so rewards read what the in-process sampler would
have given for the same ids, whatever detokeniser the server runs.

**Where engines differ** (not exercised here: no GPU, no vLLM/SGLang in this environment): vLLM's
`/v1/completions` with a token prompt takes no pixels (vLLM reads images from chat messages or from its
offline `TokensPrompt.multi_modal_data`), and it ignores fields it does not know, so a multimodal prompt sent
to it would be sampled without its image. `HTTPRolloutGenerator` therefore asks `/v1/models` who serves
before the first multimodal request and refuses anything but our server (`owned_by: "keyeflow"`): text-only
rollouts go to any engine, image/video rollouts to ours (an engine needs its own multimodal route first).

**Weight reload** (`reload_weights`): `POST {root}/update_weights_from_disk {"model_path": DIR}` →
`{"success": bool, "message": str}`: SGLang's endpoint and field names (vLLM's equivalent is
`POST /collective_rpc {"method": "reload_weights"}` in its dev mode). DIR is an export in the Keye-VL-1.5
layout (`keyeflow.model.export.export_model`) on a filesystem the server reads.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from keyeflow.model.config import KeyeConfig
from keyeflow.model.generation import (
    Completion,
    GenerationServerError,
    OpenAICompatibleGenerator,
    _check_batch,
    check_generate_args,
    conversation_seed,
    gather_results,
    token_pieces,
)
from keyeflow.model.modeling import mrope_position_ids
from keyeflow.model.processor import Features
from keyeflow.model.token_stream import IGNORE_INDEX

TOKEN_ID_PREFIX = "token_id:"  # vLLM's `return_tokens_as_token_ids` token spelling
OUR_OWNER = "keyeflow"  # `owned_by` of our server's `/v1/models` entries


def tensor_to_json(tensor: torch.Tensor) -> dict:
    """A uint8 tensor as `{"dtype", "shape", "data": base64}` (module docstring)."""
    if tensor.dtype != torch.uint8:
        raise ValueError(f"only uint8 tensors are sent, got {tensor.dtype}")
    array = tensor.detach().cpu().contiguous().numpy()
    return {"dtype": "uint8", "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def tensor_from_json(value: object) -> torch.Tensor:
    """The inverse of `tensor_to_json`; ValueError naming what is wrong."""
    if not isinstance(value, Mapping) or value.get("dtype") != "uint8":
        raise ValueError("a tensor must be {'dtype': 'uint8', 'shape': [...], 'data': base64}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    try:
        raw = base64.b64decode(str(value.get("data", "")), validate=True)
    except ValueError as error:
        raise ValueError(f"tensor data is not base64: {error}") from error
    if len(raw) != int(np.prod(shape)):
        raise ValueError(f"tensor data has {len(raw)} bytes, shape {shape} needs {int(np.prod(shape))}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy())


def rollout_request(
    prompt: Features,
    *,
    model: str,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int | None,
    stop_token_ids: Sequence[int],
) -> dict:
    """The JSON body of one rollout request for an encoded prompt (module docstring)."""
    body = {
        "model": model, "prompt": [int(i) for i in prompt.input_ids.tolist()], "n": n,
        "max_tokens": max_new_tokens, "temperature": float(temperature), "logprobs": 0,
        "return_token_ids": True, "return_tokens_as_token_ids": True,
        "stop_token_ids": sorted(int(i) for i in stop_token_ids),
    }  # fmt: skip
    if seed is not None:
        body["seed"] = seed
    if prompt.pixel_values.numel():
        body["multi_modal_data"] = {
            "pixel_values": tensor_to_json(prompt.pixel_values),
            "grid_thw": prompt.grid_thw.tolist(),
        }
    return body


def request_features(
    prompt_ids: Sequence[int], multi_modal_data: Mapping | None, config: KeyeConfig
) -> Features:
    """The model inputs a server builds from a request's `prompt` and `multi_modal_data`: ids, patches, grids
    and the 3D RoPE positions derived from them. ValueError when they do not fit together (pad tokens and
    grids disagree, patch rows and grids disagree)."""
    ids = torch.tensor([int(i) for i in prompt_ids], dtype=torch.long)
    vocab = config.text_config.vocab_size
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"prompt must be a non-empty list of token ids in [0, {vocab})")
    merge = config.vision_config.spatial_merge_size
    if multi_modal_data:
        pixels = tensor_from_json(multi_modal_data.get("pixel_values"))
        grids = multi_modal_data.get("grid_thw")
        if not isinstance(grids, list) or not all(
            isinstance(g, list) and len(g) == 3 and all(isinstance(v, int) and v > 0 for v in g)
            for g in grids
        ):
            raise ValueError(
                f"multi_modal_data.grid_thw must be a list of [t, h, w] positive ints, got {grids!r}"
            )
        grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    else:
        pixels, grid_thw = torch.zeros(0, 0, dtype=torch.uint8), torch.zeros(0, 3, dtype=torch.long)
    num_pads = int(torch.isin(ids, torch.tensor([config.image_token_id, config.video_token_id])).sum())
    rows = int(grid_thw.prod(dim=1).sum()) if len(grid_thw) else 0
    if num_pads != rows // merge**2:
        raise ValueError(
            f"the prompt holds {num_pads} image/video pad tokens but grid_thw {grid_thw.tolist()} gives "
            f"{rows // merge**2}"
        )
    if pixels.numel() and pixels.shape[0] != rows:
        raise ValueError(f"pixel_values has {pixels.shape[0]} patch rows, grid_thw needs {rows}")
    positions = mrope_position_ids(
        ids, grid_thw, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        spatial_merge_size=merge,
    )  # fmt: skip
    return Features(
        input_ids=ids,
        labels=torch.full_like(ids, IGNORE_INDEX),
        pixel_values=pixels,
        grid_thw=grid_thw,
        position_ids=positions,
        num_vision_tokens=num_pads,
    )


class HTTPRolloutGenerator(OpenAICompatibleGenerator):
    """RL rollouts from a vLLM/SGLang/keyeflow server, token ids in and out (the `Generator` interface).

    `encode_prompt(messages) -> Features` is the trainer's own prompt encoder (the policy's
    `LocalGenerator.encode_prompt`), so the ids sent are the ids trained on; `tokenizer` decodes the returned
    ids into `Completion.text`; `stop_token_ids` are sent with every request. Each conversation is one request
    of `n` samples, sent up to `max_concurrency` at a time (an engine batches them); retries and errors as
    `OpenAICompatibleGenerator`. Completions carry `token_ids` and the server's `token_logprobs`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        encode_prompt: Callable[[Sequence[Mapping]], Features],
        tokenizer: PreTrainedTokenizerBase,
        stop_token_ids: Sequence[int],
        api_key_env: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 4,
        max_concurrency: int = 8,
    ):
        super().__init__(
            base_url, model, api_key_env or "", timeout, max_retries, max_concurrency=max_concurrency
        )
        self.encode_prompt = encode_prompt
        self.tokenizer = tokenizer
        self.stop_token_ids = tuple(sorted(int(i) for i in stop_token_ids))
        self._owner: str | None = None

    def __repr__(self) -> str:
        return f"HTTPRolloutGenerator(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/completions"

    def server_owner(self) -> str:
        """`owned_by` of the served model in `/v1/models` ("keyeflow" for ours, "vllm", "sglang", ...)."""
        if self._owner is None:
            with httpx.Client(timeout=self.timeout) as client:
                response = client.get(f"{self.base_url}/models", headers=self._headers())
            if response.status_code != 200:
                raise GenerationServerError(f"GET {self.base_url}/models: HTTP {response.status_code}")
            entries = response.json().get("data") or []
            match = [e for e in entries if isinstance(e, Mapping) and e.get("id") == self.model]
            self._owner = str((match or entries or [{}])[0].get("owned_by", ""))
        return self._owner

    def request(
        self,
        messages: Sequence[Mapping],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> dict:
        """The body sent for one conversation of a batch sampled with `seed` (the input check reads it)."""
        prompt = self.encode_prompt(messages)
        if prompt.pixel_values.numel() and self.server_owner() != OUR_OWNER:
            raise ValueError(
                f"{self.base_url} is served by {self.server_owner()!r}, whose /v1/completions takes no "
                "pixels with a token prompt (it would sample without the image/video); multimodal rollouts "
                "need keyeflow's server (module docstring)"
            )
        return rollout_request(
            prompt, model=self.model, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
            seed=None if seed is None else conversation_seed(seed, messages),
            stop_token_ids=self.stop_token_ids,
        )  # fmt: skip

    def generate(
        self,
        messages_batch: list[list[dict]],
        *,
        n: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        logprobs: bool = True,
    ) -> list[list[Completion]]:
        check_generate_args(n, max_new_tokens, temperature, seed)
        _check_batch(messages_batch)
        bodies: list[dict | Exception] = []
        for messages in messages_batch:
            try:
                bodies.append(
                    self.request(
                        messages, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
                    )
                )
            except (ValueError, KeyError, OSError, GenerationServerError) as error:  # this conversation only
                bodies.append(error)

        def one(body: dict | Exception) -> list[Completion] | Exception:
            if isinstance(body, Exception):
                return body
            try:
                return self.parse_rollouts(self._post(client, body), n, logprobs)
            except GenerationServerError as error:
                return error

        with httpx.Client(timeout=self.timeout) as client:
            if len(bodies) == 1 or self.max_concurrency == 1:
                results = [one(b) for b in bodies]
            else:
                with ThreadPoolExecutor(min(self.max_concurrency, len(bodies))) as pool:
                    results = list(pool.map(one, bodies))
        return gather_results(results)

    def parse_rollouts(self, body: object, n: int, logprobs: bool) -> list[Completion]:
        """The completions of a `/v1/completions` reply, ids and log-probs per token; GenerationServerError
        naming what is missing from a malformed one."""

        def malformed(problem: str) -> GenerationServerError:
            return GenerationServerError(f"POST {self.url}: malformed response: {problem}")

        choices = body.get("choices") if isinstance(body, Mapping) else None
        if not isinstance(choices, list) or not all(isinstance(c, Mapping) for c in choices):
            raise malformed(f"no 'choices' list of objects in {str(body)[:300]}")
        if len(choices) != n:
            raise GenerationServerError(
                f"POST {self.url}: asked for n={n} choices, the server returned {len(choices)}"
            )
        out = []
        for k, choice in enumerate(sorted(choices, key=lambda c: int(c.get("index", 0)))):
            entry = choice.get("logprobs")
            token_logprobs = entry.get("token_logprobs") if isinstance(entry, Mapping) else None
            ids = choice.get("token_ids")
            if ids is None and isinstance(entry, Mapping):
                tokens = entry.get("tokens") or []
                if tokens and all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in tokens):
                    ids = [int(t.removeprefix(TOKEN_ID_PREFIX)) for t in tokens]
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids) or not ids:
                raise malformed(
                    f"choice {k} has no sampled token ids (neither 'token_ids' nor 'token_id:<id>' tokens; "
                    "vLLM needs return_token_ids or return_tokens_as_token_ids)"
                )
            if not isinstance(token_logprobs, list) or len(token_logprobs) != len(ids):
                raise malformed(
                    f"choice {k}: {len(ids)} token ids but logprobs.token_logprobs {token_logprobs!r:.80}"
                )
            finish = str(choice.get("finish_reason") or "stop")
            pieces = token_pieces(self.tokenizer, ids)
            text = "".join(pieces)
            if not logprobs:
                out.append(Completion(text=text, finish_reason=finish, token_ids=list(ids)))
                continue
            offsets, cursor = [], 0
            for piece in pieces:
                offsets.append(cursor)
                cursor += len(piece)
            out.append(
                Completion(text, [float(x) for x in token_logprobs], pieces, offsets, finish, list(ids))
            )
        return out


def reload_weights(
    base_url: str, model_path: str, *, api_key: str | None = None, timeout: float = 600.0
) -> dict:
    """Tell the server at `base_url` (the API root, with or without `/v1`) to load the export at `model_path`
    (module docstring); its reply, or GenerationServerError with the server's message."""
    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{root}/update_weights_from_disk"
    try:
        response = httpx.post(url, json={"model_path": str(model_path)}, headers=headers, timeout=timeout)
    except httpx.HTTPError as error:
        raise GenerationServerError(f"POST {url}: {type(error).__name__}: {error}") from error
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text[:300]}
    if response.status_code != 200 or not body.get("success", False):
        raise GenerationServerError(
            f"POST {url} could not load {model_path}: HTTP {response.status_code}: "
            f"{body.get('message', body)}",
            response.status_code,
        )
    return body
