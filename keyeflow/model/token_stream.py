"""The token layout of vision inputs and chat conversations. This is the one place that defines it: data
token counting (pre-tokenisation, mixture balancing) and the model's processor both build ids from here.

Layout (SPEC §2), checked against the released code:
- Image: `<|vision_start|>` N × `<|image_pad|>` `<|vision_end|>`.
- Video: one `<|vision_start|> … <|vision_end|>` pair around the WHOLE video; inside it, for every frame in
  order, `<|frame|>` + the timestamp as plain text in seconds with one decimal and no unit ("1.5"), then
  Slow: N × `<|video_pad|>`, or Fast: `<|fast_start|>` N × `<|video_pad|>` `<|fast_end|>`.
  Sources: (1) vLLM, vllm-project/vllm `vllm/model_executor/models/keye_vl1_5.py`,
  `KeyeVL1_5MultiModalProcessor._get_prompt_updates`: it replaces the prompt's single `<|video_pad|>` with,
  per frame, the ids of `<|frame|>{format(ts, ".1f")}` (+ `<|fast_start|>` for a fast frame), N ×
  video_pad, then `<|fast_end|>` for a fast frame; timestamps None → no timestamp text. (2) The Kwai Keye
  team's transformers processor (`KeyeVL1_5Processor.__call__`, "Copyright 2025 The Kwai Keye Team and
  The HuggingFace Inc. team") builds the same text: `frame_token + format(timestamp, ".1f")`, then the
  pads, fast frames wrapped in fast_start/fast_end. The vision_start/end come from the Qwen2-VL-style chat
  template, which writes `<|vision_start|><|video_pad|><|vision_end|>` once per video part.
  Frame types follow keye-vl-utils: 0 = Slow, 1 = Fast. Each frame is its own (t=1, h, w) grid, so N is
  h·w/4 of that frame's patch grid (the caller gives N; it knows the resize).
- Chat: Keye's template (Qwen style), `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, after a
  default `system` turn ("You are a helpful assistant.") when the first message is not a system one.

Ids are assembled directly (pads are never re-tokenised as text); only the short timestamp strings go
through the tokenizer, once per distinct string. Every special id comes from the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from keyeflow.model.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    FAST_END,
    FAST_START,
    FRAME,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    missing_vision_tokens,
)

SLOW, FAST = 0, 1  # frame types, as keye-vl-utils' `frame_types`
IGNORE_INDEX = -100  # label of tokens that are not trained (PyTorch cross-entropy's ignore_index)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class VisionTokenIds:
    """The ids of the vision tokens in one tokenizer."""

    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    frame: int
    fast_start: int
    fast_end: int


def vision_token_ids(tokenizer: PreTrainedTokenizerBase) -> VisionTokenIds:
    missing = missing_vision_tokens(tokenizer)
    if missing:
        raise ValueError(f"tokenizer lacks vision tokens as single ids: {', '.join(missing)}")
    ids = tokenizer.convert_tokens_to_ids(
        [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, FRAME, FAST_START, FAST_END]
    )
    return VisionTokenIds(*ids)


def format_timestamp(seconds: float) -> str:
    """A frame timestamp as the model reads it: seconds with one decimal, no unit (Keye:
    `format(t, ".1f")`)."""
    value = float(seconds)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"timestamp must be a finite number of seconds >= 0, got {seconds!r}")
    return format(value, ".1f")


# ---------------------------------------------------------------------------------------------- images


def _check_num_tokens(num_tokens: int, what: str) -> int:
    if isinstance(num_tokens, bool) or int(num_tokens) != num_tokens or num_tokens < 1:
        raise ValueError(f"{what} must be a positive integer, got {num_tokens!r}")
    return int(num_tokens)


def image_text(num_tokens: int) -> str:
    num_tokens = _check_num_tokens(num_tokens, "image num_tokens")
    return VISION_START + IMAGE_PAD * num_tokens + VISION_END


def image_ids(tokenizer: PreTrainedTokenizerBase, num_tokens: int) -> list[int]:
    num_tokens = _check_num_tokens(num_tokens, "image num_tokens")
    ids = vision_token_ids(tokenizer)
    return [ids.vision_start, *([ids.image_pad] * num_tokens), ids.vision_end]


def count_image_tokens(num_tokens: int) -> int:
    """len(image_ids(tokenizer, num_tokens)), whatever the tokenizer."""
    return _check_num_tokens(num_tokens, "image num_tokens") + 2


# ---------------------------------------------------------------------------------------------- videos


def _check_video(
    frame_types: Iterable[int], timestamps: Iterable[float], slow_tokens: int, fast_tokens: int
) -> tuple[list[int], list[str], int, int]:
    types = [int(t) for t in frame_types]
    stamps = [format_timestamp(t) for t in timestamps]
    if not types:
        raise ValueError("a video needs at least one frame")
    if len(types) != len(stamps):
        raise ValueError(f"{len(types)} frame types but {len(stamps)} timestamps")
    bad = sorted({t for t in types if t not in (SLOW, FAST)})
    if bad:
        raise ValueError(f"frame types must be {SLOW} (slow) or {FAST} (fast), got {bad}")
    slow_tokens = _check_num_tokens(slow_tokens, "slow_tokens")
    if FAST in types:
        fast_tokens = _check_num_tokens(fast_tokens, "fast_tokens")
    return types, stamps, slow_tokens, int(fast_tokens)


def video_text(
    frame_types: Iterable[int], timestamps: Iterable[float], slow_tokens: int, fast_tokens: int
) -> str:
    """The placeholder text of one video: every frame's `<|frame|>`, timestamp and pads, inside
    vision_start/end. `slow_tokens`/`fast_tokens` are LLM tokens per Slow/Fast frame (after 2×2 merge)."""
    types, stamps, slow_tokens, fast_tokens = _check_video(frame_types, timestamps, slow_tokens, fast_tokens)
    slow_block = VIDEO_PAD * slow_tokens
    fast_block = FAST_START + VIDEO_PAD * fast_tokens + FAST_END
    frames = (
        FRAME + stamp + (slow_block if kind == SLOW else fast_block) for kind, stamp in zip(types, stamps)
    )
    return VISION_START + "".join(frames) + VISION_END


def _timestamp_ids(tokenizer: PreTrainedTokenizerBase, stamps: list[str]) -> dict[str, list[int]]:
    # Each timestamp sits between two special tokens, so tokenising it alone gives the same ids as
    # tokenising it in context. One batched call for the distinct strings.
    distinct = sorted(set(stamps))
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"]
    return dict(zip(distinct, encoded))


def video_ids(
    tokenizer: PreTrainedTokenizerBase,
    frame_types: Iterable[int],
    timestamps: Iterable[float],
    slow_tokens: int,
    fast_tokens: int,
) -> list[int]:
    """Ids of `video_text(...)`, equal to tokenising that text, built without tokenising the pads."""
    types, stamps, slow_tokens, fast_tokens = _check_video(frame_types, timestamps, slow_tokens, fast_tokens)
    ids = vision_token_ids(tokenizer)
    stamp_ids = _timestamp_ids(tokenizer, stamps)
    slow_block = [ids.video_pad] * slow_tokens
    fast_block = [ids.fast_start, *([ids.video_pad] * fast_tokens), ids.fast_end]
    out = [ids.vision_start]
    for kind, stamp in zip(types, stamps):
        out.append(ids.frame)
        out.extend(stamp_ids[stamp])
        out.extend(slow_block if kind == SLOW else fast_block)
    out.append(ids.vision_end)
    return out


def count_video_tokens(
    tokenizer: PreTrainedTokenizerBase,
    frame_types: Iterable[int],
    timestamps: Iterable[float],
    slow_tokens: int,
    fast_tokens: int,
) -> int:
    """len(video_ids(...)) without building the list: pads are counted, only timestamps are tokenised."""
    types, stamps, slow_tokens, fast_tokens = _check_video(frame_types, timestamps, slow_tokens, fast_tokens)
    stamp_lengths = {stamp: len(ids) for stamp, ids in _timestamp_ids(tokenizer, stamps).items()}
    num_fast = sum(types)
    num_slow = len(types) - num_fast
    return (
        2  # vision_start, vision_end
        + len(types)  # one <|frame|> per frame
        + sum(stamp_lengths[s] for s in stamps)
        + num_slow * slow_tokens
        + num_fast * (fast_tokens + 2)  # fast_start, fast_end
    )


# ---------------------------------------------------------------------------------------------- conversations


@dataclass(frozen=True)
class RenderedConversation:
    """One training sample: `labels[i]` is `input_ids[i]` where it is trained, IGNORE_INDEX elsewhere.
    `num_vision_tokens` counts every id that came from a media item (wrappers, frame and timestamp tokens
    included); `num_text_tokens` the rest. They add up to `len(input_ids)`."""

    input_ids: list[int]
    labels: list[int]
    num_text_tokens: int
    num_vision_tokens: int


MediaIds = Callable[[dict], Sequence[int]]


def _content_parts(content: object, index: int) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence):
        raise TypeError(
            f"message {index}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"message {index}: a text part needs a string 'text'")
        elif kind not in ("image", "video"):
            raise ValueError(f"message {index}: part type must be 'text', 'image' or 'video', got {kind!r}")
        parts.append(part)
    return parts


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping] | Mapping,
    media: MediaIds | None = None,
    *,
    add_generation_prompt: bool = False,
) -> RenderedConversation:
    """Token ids and labels of a chat sample, `{"messages": [...]}` or the list of messages itself.

    Each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`, after Keye's default system turn
    (`DEFAULT_SYSTEM_PROMPT`, untrained) when the first message is not a system one; content is a string or
    a list of `{"type": "text", "text": ...}`, `{"type": "image", ...}`, `{"type": "video", ...}` parts.
    `media(part)` returns the ids of one image/video part (normally its pre-tokenised `image_ids`/
    `video_ids`). Only assistant turns are trained: their text content and closing `<|im_end|>` (media ids in
    an assistant turn are not). `/think` and `/no_think` stay in the user text as typed, as in Keye's
    template. The role header and each run of text
    are tokenised separately, so label boundaries are exact; this equals tokenising the chat-template text
    unless a content starts with whitespace that the pre-tokeniser would join to the header's newline.
    `add_generation_prompt` appends an untrained `<|im_start|>assistant\\n`.
    """
    if isinstance(messages, Mapping):
        if "messages" not in messages:
            raise ValueError("a conversation mapping needs a 'messages' list")
        messages = messages["messages"]
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} mappings")

    im_start, im_end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    newline = tokenizer.encode("\n", add_special_tokens=False)
    input_ids: list[int] = []
    labels: list[int] = []
    num_vision = 0

    def emit(ids: Sequence[int], trained: bool) -> None:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    def emit_header(role: str) -> None:
        emit([im_start, *tokenizer.encode(role + "\n", add_special_tokens=False)], trained=False)

    first = messages[0]
    if not (isinstance(first, Mapping) and first.get("role") == "system"):
        emit_header("system")
        emit([*tokenizer.encode(DEFAULT_SYSTEM_PROMPT, add_special_tokens=False), im_end, *newline], False)
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {index} must be a mapping with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index}: role must be one of {ROLES}, got {role!r}")
        trained = role == "assistant"
        emit_header(role)
        text_run: list[str] = []
        for part in _content_parts(message.get("content"), index) + [None]:
            if part is not None and part["type"] == "text":
                text_run.append(part["text"])
                continue
            if text_run:  # adjacent text parts join with no separator, as the chat template does
                emit(tokenizer.encode("".join(text_run), add_special_tokens=False), trained)
                text_run = []
            if part is None:
                break
            if media is None:
                raise ValueError(
                    f"message {index}: {part['type']} part found but no media callback was given"
                )
            ids = [int(i) for i in media(part)]
            emit(ids, trained=False)
            num_vision += len(ids)
        emit([im_end], trained)
        emit(newline, trained=False)

    if add_generation_prompt:
        emit_header("assistant")
    return RenderedConversation(input_ids, labels, len(input_ids) - num_vision, num_vision)


def render_text(tokenizer: PreTrainedTokenizerBase, text: str) -> RenderedConversation:
    """A plain-text corpus sample: its ids, then the tokenizer's eos; every token is trained."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token to end a text sample")
    ids = [*tokenizer.encode(text, add_special_tokens=False), eos]
    return RenderedConversation(ids, list(ids), len(ids), 0)
