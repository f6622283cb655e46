"""Sampling completions, with per-token logprobs, from a teacher/judge model: our own model in process, or any
OpenAI-compatible server (vLLM, SGLang, `keyeflow.model.serving`). LongCoT multi-path generation (SPEC §4.3.1
step 2) needs several paths per question and the logprob of every sampled token for its confidence scores;
judges and reward models use the same call with `n=1`.

One interface, `Generator.generate(messages_batch, *, n, max_new_tokens, temperature, seed, logprobs)`: for
each conversation of the batch, `n` `Completion`s. Each conversation is a request of its own, sampled with
`conversation_seed(seed, messages)` (a hash of the batch seed and the conversation): a conversation's
completions do not depend on its place in the batch or on what else is in it (a resumed shard samples what
the first run would have; decoded beside other conversations, only the last bits of its logprobs may differ,
as between the rows of any batched matmul), different conversations get unrelated random streams, and the
same call gives the same completions in process and through a server (the client sends the derived seed as
the request's seed).

`Completion` fields, the same from both backends:
- `text`: the completion as a string, stop token excluded (non-markup special tokens are dropped, as
  `tokenizer.decode(..., skip_special_tokens=True)`; `<think>`/`<answer>`/boxes are kept);
- `token_logprobs[i]`: log p(token i | prompt, tokens < i) under the model's own distribution — the raw
  logits, before temperature, as vLLM's default `raw_logprobs` — so confidences do not depend on how the paths
  were sampled. The stop token, when generation stopped on one, is the last token (the trained response ends
  with `<|im_end|>` too, so a sequence logprob is over exactly the tokens a trainer scores);
- `tokens[i]`: the text token i adds to `text`: `"".join(tokens) == text`; a token that adds nothing (the stop
  token, a dropped special token, the first bytes of a character that the next token completes) is `""`;
- `token_offsets[i]`: where `tokens[i]` starts in `text`;
- `finish_reason`: "stop" (a stop token) or "length" (`max_new_tokens` reached);
- `token_ids`: the sampled ids, stop token included, exactly as the model produced them (filled by
  `LocalGenerator` with or without `logprobs`; empty from a server, which sends token strings only). RL trains
  on these ids: re-tokenising `text` can give other ids (a byte-level BPE merges differently, dropped special
  tokens vanish), and the policy gradient must score the tokens that were actually sampled.
With `logprobs=False` the three per-token lists are empty (a server sends no tokens then).

`LocalGenerator` runs `KeyeForConditionalGeneration` with a KV cache built from the model's own parts (each
prompt, images and videos included, is run once on its own; decode steps continue every 3D-RoPE stream at one
past the prompt's largest position, as Qwen2-VL/Keye do). The model's `forward` has no cache; a test checks
the cached loop against a plain loop over `forward`. All conversations of a `generate` call decode together
(up to `MAX_DECODE_ROWS` rows): their prompts' caches are left-padded to the longest into one cache, a mask
hides the padding, and every row keeps its own seed and positions, so a conversation's tokens are those it
gets alone. On a small model a decode step costs framework overhead, not FLOPs, so one step for all rows is
far cheaper than one per conversation. This is the tiny/CPU default; a real teacher belongs behind
vLLM/SGLang.

`OpenAICompatibleGenerator` posts one `/v1/chat/completions` request per conversation (a few at a time),
retrying connection errors, timeouts, 408, 429 and 5xx with exponential backoff (honouring `Retry-After`); any
other error, and a reply that is not a well-formed completion (a body that is not JSON, no `choices`, the
wrong number of them, no logprobs when asked for), is raised at once as `GenerationServerError` with the
status and the problem: a server that answers malformed once answers so again. The API key is read from the
environment only, sent as a bearer token, and never logged or shown in a repr or an error.

Failures are per conversation: when some conversations of a batch fail and others do not, both backends raise
`BatchGenerationError`, whose `results[i]` is conversation i's completions or its error, so a caller keeps
what succeeded and records or retries only what failed (asking again for completions already made costs the
teacher's time again). A batch of one raises that conversation's error itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import httpx
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import Features, MediaLookup, encode_sample
from keyeflow.model.token_stream import vision_token_ids
from keyeflow.model.tokenizer import ENDOFTEXT, IM_END, IM_START, checkpoint_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length")


@dataclass
class Completion:
    """One sampled completion (field meanings in the module docstring)."""

    text: str
    token_logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_offsets: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    token_ids: list[int] = field(default_factory=list)

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        """The average token logprob (NaN without logprobs): a length-independent confidence."""
        return self.sum_logprob / len(self.token_logprobs) if self.token_logprobs else math.nan


@runtime_checkable
class Generator(Protocol):
    def generate(
        self,
        messages_batch: list[list[dict]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
        logprobs: bool,
    ) -> list[list[Completion]]:
        """`n` completions for each conversation of `messages_batch`, in order. `temperature` 0 is greedy."""
        ...


class BatchGenerationError(RuntimeError):
    """Some conversations of a batch failed: `results[i]` is conversation i's completions, or the exception it
    failed with (module docstring)."""

    def __init__(self, results: Sequence[list[Completion] | Exception]):
        self.results = list(results)
        failed = [(i, r) for i, r in enumerate(self.results) if isinstance(r, Exception)]
        i, first = failed[0]
        super().__init__(
            f"{len(failed)} of {len(self.results)} conversations failed; conversation {i}: "
            f"{type(first).__name__}: {first}"
        )

    @property
    def failures(self) -> dict[int, Exception]:
        return {i: r for i, r in enumerate(self.results) if isinstance(r, Exception)}


def gather_results(results: Sequence[list[Completion] | Exception]) -> list[list[Completion]]:
    """The batch's completions, or the failure: a batch of one raises its error, a larger batch with any
    failure raises `BatchGenerationError` carrying the good results too."""
    failed = [r for r in results if isinstance(r, Exception)]
    if not failed:
        return list(results)
    if len(results) == 1:
        raise failed[0]
    raise BatchGenerationError(results)


def check_generate_args(n: int, max_new_tokens: int, temperature: float, seed: int | None) -> None:
    """ValueError for arguments no backend accepts (shared by both backends and the server)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


def _check_batch(messages_batch: object) -> None:
    if isinstance(messages_batch, (str, Mapping)) or not isinstance(messages_batch, Sequence):
        raise TypeError("messages_batch must be a list of conversations (each a list of messages)")
    for i, messages in enumerate(messages_batch):
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError(f"conversation {i} must be a list of {{'role', 'content'}} messages")
        if not messages:
            raise ValueError(f"conversation {i} is empty")


def offsets_of(text: str, tokens: Sequence[str]) -> list[int]:
    """Where each token starts in `text`, walking left to right. A token found at the cursor (or, to step
    over a character a server split into byte tokens, a few characters past it) advances the cursor; one that
    is not in the text (a stop token shown as `<|im_end|>`, `bytes:\\xe2`) gets the cursor and takes no
    room."""
    offsets, cursor = [], 0
    for token in tokens:
        if text.startswith(token, cursor):
            offsets.append(cursor)
            cursor += len(token)
            continue
        found = text.find(token, cursor, cursor + len(token) + 3) if token else -1
        if found >= 0:
            offsets.append(found)
            cursor = found + len(token)
        else:
            offsets.append(cursor)
    return offsets


# ---------------------------------------------------------------------------------------------- local


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """The text each id adds to the decoded completion (special tokens dropped, markup kept), so that
    `"".join(pieces)` is the text. Incremental decoding against a few tokens of context (as vLLM's
    detokeniser); while the text ends in an incomplete UTF-8 character its tokens add "" and the token that
    completes it carries the character."""
    ids = [int(i) for i in ids]

    def decode(span: list[int]) -> str:
        return tokenizer.decode(span, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    pieces: list[str] = []
    start = 0  # first token whose text is not yet in a piece
    for i in range(len(ids)):
        context = max(0, start - 4)
        before = decode(ids[context:start])
        now = decode(ids[context : i + 1])
        if now.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(now[len(before) :])
        start = i + 1
    return pieces


def conversation_seed(seed: int, messages: Sequence[Mapping]) -> int:
    """The request seed of one conversation of a batch sampled with `seed`: 63 bits of
    sha256(seed, the conversation as canonical JSON). Identical conversations get identical seeds."""
    canonical = json.dumps(list(messages), sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha256(f"keyeflow-conversation:{seed}:{canonical}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _row_seed(seed: int, row: int) -> int:
    """A 63-bit seed for completion `row` of a request (distinct rows and seeds never share a stream)."""
    digest = hashlib.sha256(f"keyeflow-generate:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _load_model_and_tokenizer(
    model_path_or_model: str | Path | KeyeForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[KeyeForConditionalGeneration, PreTrainedTokenizerBase]:
    if isinstance(model_path_or_model, KeyeForConditionalGeneration):
        model = model_path_or_model
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    else:
        path = Path(model_path_or_model)
        if not path.is_dir():
            raise ValueError(f"model path {path} is not a local directory (no model hub is used)")
        model = load_keye_checkpoint(path)
        if tokenizer is None:
            tokenizer = checkpoint_tokenizer(path)
    cfg = model.config
    ids = vision_token_ids(tokenizer)
    if (ids.image_pad, ids.video_pad) != (cfg.image_token_id, cfg.video_token_id):
        raise ValueError(
            f"tokenizer and model disagree on the vision pad ids: tokenizer image/video "
            f"{ids.image_pad}/{ids.video_pad}, model {cfg.image_token_id}/{cfg.video_token_id}"
        )
    if len(tokenizer) > cfg.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{cfg.text_config.vocab_size}"
        )
    return model, tokenizer


# Rows (completions of all conversations) decoded together at most. The shared KV cache holds every row's
# prompt padded to the longest of the batch, so on a real model a batch of long (video) prompts would hold
# that many full-length caches at once; on the tiny CPU model what batching saves is per-step overhead, which
# 256 rows already amortise.
MAX_DECODE_ROWS = 256


@dataclass
class _Prefill:
    """One prompt run through the LLM: the next-token logits `[1, V]`, its KV cache (batch 1), its length,
    the 3D position its first completion token takes, and the request seed its rows are seeded from."""

    logits: torch.Tensor
    cache: DynamicCache
    length: int
    next_position: int
    seed: int


class LocalGenerator:
    """Completions from our model in this process.

    `model_path_or_model`: a checkpoint directory (ours, `save_pretrained`, or the Keye-VL-1.5 layout; its
    tokenizer is used if the directory has one, the shipped one otherwise) or a model in memory (with
    `tokenizer`, default the shipped one; it is used as it is — not copied, left on its device unless `device`
    says otherwise, put in eval mode only while sampling). `media_lookup` resolves image/video parts of the
    messages exactly as for `processor.encode_sample`; without it only text messages are accepted.

    Sampling: temperature 0 is greedy (argmax); otherwise completion j of a request draws from
    softmax(logits / temperature) with its own CPU `torch.Generator`, seeded from (`seed`, j) — the same seed
    gives the same completions, and completion j is its own stream. `seed=None` draws a fresh random seed.
    Generation stops at `<|im_end|>`/`<|endoftext|>` or the tokenizer's eos.
    """

    def __init__(
        self,
        model_path_or_model: str | Path | KeyeForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = None,
        *,
        media_lookup: MediaLookup | None = None,
    ):
        model, self.tokenizer = _load_model_and_tokenizer(model_path_or_model, tokenizer)
        if device is None:  # a model given in memory stays where it is; a loaded one runs on the CPU
            device = next(model.parameters()).device if isinstance(model_path_or_model, nn.Module) else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.media_lookup = media_lookup
        stop = {self.tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)}
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        self.stop_token_ids = frozenset(int(i) for i in stop if i is not None and i >= 0)
        self._header_ids = [
            self.tokenizer.convert_tokens_to_ids(IM_START),
            *self.tokenizer.encode("assistant\n", add_special_tokens=False),
        ]

    def __repr__(self) -> str:
        return f"LocalGenerator(vocab={len(self.tokenizer)}, device={self.device})"

    def encode_prompt(self, messages: Sequence[Mapping]) -> Features:
        """The prompt's model inputs: the conversation (media expanded) + `<|im_start|>assistant\\n`."""
        if any(isinstance(m, Mapping) and m.get("role") == "text" for m in messages):
            raise ValueError("generation takes a chat (system/user/assistant messages), not a 'text' sample")
        features = encode_sample(
            list(messages), self.tokenizer, self.media_lookup,
            spatial_merge_size=self.model.config.vision_config.spatial_merge_size,
        )  # fmt: skip
        start = int(features.position_ids.max()) + 1 if len(features) else 0
        header = torch.tensor(self._header_ids, dtype=torch.long)
        header_positions = torch.arange(start, start + len(header)).expand(3, -1)
        features.input_ids = torch.cat([features.input_ids, header])
        features.labels = torch.cat([features.labels, torch.full_like(header, -100)])
        features.position_ids = torch.cat([features.position_ids, header_positions], dim=1)
        return features

    def num_prompt_tokens(self, messages: Sequence[Mapping]) -> int:
        return len(self.encode_prompt(messages))

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
        results: list[list[Completion] | Exception] = []
        per_chunk = max(1, MAX_DECODE_ROWS // n)
        with self._sampling():
            for start in range(0, len(messages_batch), per_chunk):
                chunk = messages_batch[start : start + per_chunk]
                prefilled: list[tuple[int, _Prefill]] = []
                outcomes: list[list[Completion] | Exception | None] = [None] * len(chunk)
                for k, messages in enumerate(chunk):
                    # A conversation the model cannot take (media not pre-tokenised, a prompt too long, a bad
                    # role) fails alone; the others of the batch are still sampled.
                    try:
                        request_seed = (
                            secrets.randbits(63) if seed is None else conversation_seed(seed, messages)
                        )
                        prompt = self.encode_prompt(messages)
                        prefilled.append((k, self._prefill(prompt, max_new_tokens, request_seed)))
                    except (ValueError, KeyError, OSError) as error:
                        outcomes[k] = error
                sampled = self._decode([p for _, p in prefilled], n, max_new_tokens, float(temperature))
                for (k, _), rows in zip(prefilled, sampled):
                    outcomes[k] = [self._completion(i, lp, f, logprobs) for i, lp, f in zip(*rows)]
                results.extend(outcomes)
        return gather_results(results)

    def generate_one(
        self,
        messages: list[dict],
        *,
        n: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        logprobs: bool = True,
    ) -> list[Completion]:
        """One request, `seed` used as given (what a server does with a request's seed): `generate` for a
        batch equals `generate_one` of each conversation with `conversation_seed(seed, messages)`."""
        check_generate_args(n, max_new_tokens, temperature, seed)
        request_seed = seed if seed is not None else secrets.randbits(63)
        ids, row_logprobs, finish = self._sample(
            self.encode_prompt(messages), n, max_new_tokens, float(temperature), request_seed
        )
        return [self._completion(i, lp, f, logprobs) for i, lp, f in zip(ids, row_logprobs, finish)]

    def generate_from_features(
        self,
        prompt: Features,
        *,
        n: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        logprobs: bool = True,
    ) -> list[Completion]:
        """`generate_one` of a prompt already encoded (a token-id request: `keyeflow.model.rollout_protocol`);
        the same prompt Features and seed give the same completions."""
        check_generate_args(n, max_new_tokens, temperature, seed)
        request_seed = seed if seed is not None else secrets.randbits(63)
        ids, row_logprobs, finish = self._sample(prompt, n, max_new_tokens, float(temperature), request_seed)
        return [self._completion(i, lp, f, logprobs) for i, lp, f in zip(ids, row_logprobs, finish)]

    def _completion(
        self, ids: list[int], logprobs: list[float], finish: str, with_logprobs: bool
    ) -> Completion:
        pieces = token_pieces(self.tokenizer, ids)
        text = "".join(pieces)
        if not with_logprobs:
            return Completion(text=text, finish_reason=finish, token_ids=list(ids))
        offsets, cursor = [], 0
        for piece in pieces:
            offsets.append(cursor)
            cursor += len(piece)
        return Completion(text, list(logprobs), pieces, offsets, finish, list(ids))

    @contextmanager
    def _sampling(self) -> Iterator[None]:
        """Eval mode (no dropout) and inference mode while sampling; a model lent by a trainer gets its mode
        back."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _sample(
        self, prompt: Features, n: int, max_new_tokens: int, temperature: float, seed: int
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """Token ids, their logprobs and finish reasons of `n` completions of one prompt."""
        with self._sampling():
            return self._decode(
                [self._prefill(prompt, max_new_tokens, seed)], n, max_new_tokens, temperature
            )[0]

    def _prefill(self, prompt: Features, max_new_tokens: int, seed: int) -> _Prefill:
        """Run one prompt through the LLM (batch 1): embeddings with the vision features scattered in, causal
        attention on the model's attention path (per-segment kernels on "packed", no [L, L] mask), 3D
        positions. ValueError when the completion would run past the model's positions."""
        model, device = self.model, self.device
        length = len(prompt)
        max_positions = model.config.text_config.max_position_embeddings
        last_position = int(prompt.position_ids.max()) + max_new_tokens
        if last_position >= max_positions:
            raise ValueError(
                f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) "
                f"reach position {last_position}, "
                f"past the model's max_position_embeddings {max_positions}"
            )
        input_ids = prompt.input_ids[None].to(device)
        embeds = model.get_input_embeddings()(input_ids)
        cfg = model.config
        is_vision = (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
        if bool(is_vision.any()):
            vision = model.get_vision_embeddings(prompt.pixel_values.to(device), prompt.grid_thw.to(device))
            embeds = embeds.masked_scatter(is_vision[..., None], vision.to(embeds.dtype))
        mask = model.attention_mask_for(torch.zeros(1, length, dtype=torch.long, device=device), embeds.dtype)
        cache = DynamicCache(config=cfg.text_config)
        hidden = model.language_model(
            inputs_embeds=embeds, position_ids=prompt.position_ids[:, None].to(device),
            attention_mask={"full_attention": mask}, past_key_values=cache, use_cache=True,
        ).last_hidden_state  # fmt: skip
        logits = model.lm_head(hidden[:, -1]).float()
        return _Prefill(logits, cache, length, int(prompt.position_ids.max()) + 1, seed)

    def _decode(
        self, prompts: Sequence[_Prefill], n: int, max_new_tokens: int, temperature: float
    ) -> list[tuple[list[list[int]], list[list[float]], list[str]]]:
        """The `n` completions of every prefilled prompt, decoded together: row r = c·n + j is completion j of
        prompt c. Each row keeps its own random stream (seeded from its prompt's seed and j) and its own next
        3D position (its prompt's largest + 1, then one more a step), so a row's tokens are those of its
        prompt decoded alone. The rows share one KV cache, every prompt left-padded to the longest; a boolean
        mask over the cached keys hides the padding (the decode steps' attention is transformers' SDPA on
        both attention paths: one query per row against the cache)."""
        if not prompts:
            return []
        model, device = self.model, self.device
        num_rows = len(prompts) * n
        width = max(p.length for p in prompts)
        if len(prompts) == 1:  # one prompt: its own cache, shared by its n rows, nothing to hide
            cache = prompts[0].cache
            if n > 1:
                cache.batch_repeat_interleave(n)
            key_mask = None
        else:
            cache = DynamicCache(config=model.config.text_config)
            for index, layer in enumerate(prompts[0].cache.layers):
                keys, values = (
                    torch.cat([
                        F.pad(getattr(p.cache.layers[index], part), (0, 0, width - p.length, 0))
                        .repeat_interleave(n, dim=0)
                        for p in prompts
                    ])
                    for part in ("keys", "values")
                )  # fmt: skip
                cache.update(keys, values, index)
            key_mask = torch.ones(num_rows, width + max_new_tokens, dtype=torch.bool, device=device)
            for c, p in enumerate(prompts):
                key_mask[c * n : (c + 1) * n, : width - p.length] = False
        logits = torch.cat([p.logits.expand(n, -1) for p in prompts])
        first_position = torch.tensor([p.next_position for p in prompts], device=device).repeat_interleave(n)
        generators = [torch.Generator().manual_seed(_row_seed(p.seed, j)) for p in prompts for j in range(n)]

        ids: list[list[int]] = [[] for _ in range(num_rows)]
        token_logprobs: list[list[float]] = [[] for _ in range(num_rows)]
        finish = ["length"] * num_rows
        active = list(range(num_rows))  # rows still generating, in cache/batch order
        for step in range(max_new_tokens):
            logp = F.log_softmax(logits, dim=-1)
            if temperature == 0:
                chosen = logits.argmax(dim=-1).cpu()
            else:
                probs = F.softmax(logits / temperature, dim=-1).cpu()
                chosen = torch.cat(
                    [
                        torch.multinomial(probs[k], 1, generator=generators[row])
                        for k, row in enumerate(active)
                    ]
                )
            chosen_logp = logp.gather(1, chosen.to(device)[:, None])[:, 0].cpu().tolist()
            keep = []
            for k, row in enumerate(active):
                token = int(chosen[k])
                ids[row].append(token)
                token_logprobs[row].append(chosen_logp[k])
                if token in self.stop_token_ids:
                    finish[row] = "stop"
                else:
                    keep.append(k)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                cache.batch_select_indices(torch.tensor(keep, device=device))
                chosen = chosen[keep]
                active = [active[k] for k in keep]
            rows = torch.tensor(active, device=device)
            step_embeds = model.get_input_embeddings()(chosen.to(device)[:, None])
            positions = (first_position[rows] + step)[None, :, None].expand(3, -1, -1)
            mask = None if key_mask is None else key_mask[rows, None, None, : width + step + 1]
            hidden = model.language_model(
                inputs_embeds=step_embeds, position_ids=positions, attention_mask={"full_attention": mask},
                past_key_values=cache, use_cache=True,
            ).last_hidden_state  # fmt: skip
            logits = model.lm_head(hidden[:, -1]).float()
        return [
            (ids[c * n : (c + 1) * n], token_logprobs[c * n : (c + 1) * n], finish[c * n : (c + 1) * n])
            for c in range(len(prompts))
        ]


# ---------------------------------------------------------------------------------------------- server


class GenerationServerError(RuntimeError):
    """A request to an OpenAI-compatible server failed; `status` is the HTTP status (None: no response)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _is_transient(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _server_message(response: httpx.Response) -> str:
    """The server's error message (OpenAI `{"error": {"message"}}`, FastAPI `{"detail"}`) or its body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500].strip() or response.reason_phrase
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return str(body)[:500]


class OpenAICompatibleGenerator:
    """Completions from an OpenAI-compatible chat server (vLLM, SGLang, `keyeflow.model.serving`).

    `base_url` is the API root including `/v1`, as for the OpenAI client (`http://127.0.0.1:8000/v1`);
    `model` the served model name. The key is read from the environment variable `api_key_env` when a
    request is made (no variable set: no Authorization header, as local servers need none). Messages are
    sent as given, so media must be in the server's format (`image_url`/`video_url` parts); our internal
    `image`/`video` parts, which point into our tables, are refused with a ValueError. Up to
    `max_concurrency` conversations are in flight at once (a vLLM server batches them); results keep the
    batch order. Each request is tried `1 + max_retries` times at most, waiting `backoff_s`·2^attempt
    (at most 30 s) or the server's `Retry-After` between tries.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 600.0,
        max_retries: int = 4,
        *,
        backoff_s: float = 0.5,
        max_concurrency: int = 8,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model (the served model name) is required")
        if timeout <= 0 or max_retries < 0 or backoff_s < 0 or max_concurrency < 1:
            raise ValueError(
                f"need timeout > 0, max_retries >= 0, backoff_s >= 0, max_concurrency >= 1; got {timeout}, "
                f"{max_retries}, {backoff_s}, {max_concurrency}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_concurrency = int(max_concurrency)

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatibleGenerator(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

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
        for i, messages in enumerate(messages_batch):
            for message in messages:
                content = message.get("content") if isinstance(message, Mapping) else None
                if isinstance(content, Sequence) and not isinstance(content, str):
                    for part in content:
                        if isinstance(part, Mapping) and part.get("type") in ("image", "video"):
                            raise ValueError(
                                f"conversation {i}: an internal {part['type']!r} part "
                                "cannot be sent to a server; "
                                "give it as an OpenAI 'image_url'/'video_url' part"
                            )
        payloads = []
        for messages in messages_batch:
            payload = {
                "model": self.model, "messages": messages, "n": n, "max_tokens": max_new_tokens,
                "temperature": float(temperature), "logprobs": bool(logprobs),
            }  # fmt: skip
            if logprobs:
                payload["top_logprobs"] = 0
            if seed is not None:
                payload["seed"] = conversation_seed(seed, messages)
            payloads.append(payload)

        def one(payload: dict) -> list[Completion] | GenerationServerError:
            try:
                return self._parse(self._post(client, payload), n, logprobs)
            except GenerationServerError as error:
                return error

        with httpx.Client(timeout=self.timeout) as client:
            if len(payloads) == 1 or self.max_concurrency == 1:
                results = [one(p) for p in payloads]
            else:
                with ThreadPoolExecutor(min(self.max_concurrency, len(payloads))) as pool:
                    results = list(pool.map(one, payloads))
        return gather_results(results)

    def _post(self, client: httpx.Client, payload: dict) -> dict:
        attempt = 0
        while True:
            wait = None
            try:
                response = client.post(self.url, json=payload, headers=self._headers())
            except httpx.TransportError as error:  # refused, reset, timed out: the server may come back
                problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                status = None
            except httpx.HTTPError as error:  # an undecodable body, a redirect loop: the same on every try
                raise GenerationServerError(f"POST {self.url}: {type(error).__name__}: {error}") from error
            else:
                status = response.status_code
                if status < 300:
                    try:
                        body = response.json()
                    except ValueError as error:
                        raise GenerationServerError(
                            f"POST {self.url}: status {status} but the body is not JSON: "
                            f"{response.text[:200]!r}",
                            status,
                        ) from error
                    return body
                problem = f"HTTP {status}: {_server_message(response)}"
                if not _is_transient(status):
                    raise GenerationServerError(f"POST {self.url} failed with {problem}", status)
                retry_after = response.headers.get("retry-after", "")
                wait = min(float(retry_after), 60.0) if retry_after.replace(".", "", 1).isdigit() else None
            if attempt >= self.max_retries:
                raise GenerationServerError(
                    f"POST {self.url} failed after {attempt + 1} attempt(s); last error: {problem}", status
                )
            wait = wait if wait is not None else min(self.backoff_s * 2**attempt, 30.0)
            logger.warning(
                "POST %s: %s; retry %d/%d in %.1fs", self.url, problem, attempt + 1, self.max_retries, wait
            )
            time.sleep(wait)
            attempt += 1

    def _parse(self, body: object, n: int, logprobs: bool) -> list[Completion]:
        """The completions of a reply; `GenerationServerError` naming what is wrong with a malformed one."""

        def malformed(problem: str) -> GenerationServerError:
            return GenerationServerError(f"POST {self.url}: malformed response: {problem}")

        choices = body.get("choices") if isinstance(body, Mapping) else None
        if not isinstance(choices, list):
            raise malformed(f"no 'choices' list in {str(body)[:300]}")
        if not all(isinstance(c, Mapping) for c in choices):
            raise malformed("a choice is not an object")
        try:
            choices = sorted(choices, key=lambda c: int(c.get("index", 0)))
        except (TypeError, ValueError) as error:
            raise malformed(f"a choice index is not an integer ({error})") from error
        if len(choices) != n:
            raise GenerationServerError(
                f"POST {self.url}: asked for n={n} choices, the server returned {len(choices)}"
            )
        out = []
        for k, choice in enumerate(choices):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, Mapping) else None
            text = "" if text is None else text  # an empty completion comes back as null content
            if not isinstance(text, str):
                raise malformed(f"choice {k}: message.content is a {type(text).__name__}, not a string")
            finish = choice.get("finish_reason") or "stop"
            if not logprobs:
                out.append(Completion(text=text, finish_reason=str(finish)))
                continue
            logprobs_field = choice.get("logprobs")
            content = logprobs_field.get("content") if isinstance(logprobs_field, Mapping) else None
            if not isinstance(content, list):
                raise GenerationServerError(
                    f"POST {self.url}: logprobs were requested but choice {choice.get('index')} has no "
                    "logprobs.content (does the server support logprobs?)"
                )
            try:
                tokens = [str(entry["token"]) for entry in content]
                token_logprobs = [float(entry["logprob"]) for entry in content]
            except (KeyError, TypeError, ValueError) as error:
                raise malformed(
                    f"choice {k}: a logprobs.content entry lacks a token or a numeric logprob "
                    f"({type(error).__name__}: {error})"
                ) from error
            out.append(Completion(text, token_logprobs, tokens, offsets_of(text, tokens), str(finish)))
        return out
