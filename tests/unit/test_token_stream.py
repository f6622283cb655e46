"""The vision token layout and chat rendering, on literal inputs."""

from __future__ import annotations

import pytest

from keyeflow.model.token_stream import (
    IGNORE_INDEX,
    count_image_tokens,
    count_video_tokens,
    format_timestamp,
    image_ids,
    image_text,
    render_conversation,
    render_text,
    video_ids,
    video_text,
    vision_token_ids,
)
from keyeflow.model.tokenizer import build_tokenizer, load_tokenizer

VS, VE, VP, FR, FS, FE = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|frame|>",
    "<|fast_start|>",
    "<|fast_end|>",
)

FRAME_TYPES = [0, 1, 1, 0]
TIMESTAMPS = [0.0, 0.5, 1.0, 1.5]
EXPECTED_VIDEO_TEXT = (
    "<|vision_start|>"
    "<|frame|>0.0<|video_pad|><|video_pad|><|video_pad|><|video_pad|>"
    "<|frame|>0.5<|fast_start|><|video_pad|><|fast_end|>"
    "<|frame|>1.0<|fast_start|><|video_pad|><|fast_end|>"
    "<|frame|>1.5<|video_pad|><|video_pad|><|video_pad|><|video_pad|>"
    "<|vision_end|>"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory):
    """A tokenizer trained on other text: different ids for the same tokens."""
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("a small dog runs on the grass\nthe clock shows 12.5 seconds\n" * 3)
    return build_tokenizer(corpus, vocab_size=300)


def test_video_text_literal():
    assert video_text(FRAME_TYPES, TIMESTAMPS, 4, 1) == EXPECTED_VIDEO_TEXT


def test_video_ids_literal(tok):
    digits = {s: tok.encode(s, add_special_tokens=False) for s in ("0.0", "0.5", "1.0", "1.5")}
    vs, ve, vp, fr, fs, fe = tok.convert_tokens_to_ids([VS, VE, VP, FR, FS, FE])
    assert video_ids(tok, FRAME_TYPES, TIMESTAMPS, 4, 1) == [
        vs,
        fr, *digits["0.0"], vp, vp, vp, vp,
        fr, *digits["0.5"], fs, vp, fe,
        fr, *digits["1.0"], fs, vp, fe,
        fr, *digits["1.5"], vp, vp, vp, vp,
        ve,
    ]  # fmt: skip


@pytest.mark.parametrize("which", ["shipped", "other"])
def test_video_ids_equal_tokenised_text_and_count(tok, other_tok, which):
    t = tok if which == "shipped" else other_tok
    ids = video_ids(t, FRAME_TYPES, TIMESTAMPS, 4, 1)
    assert ids == t(EXPECTED_VIDEO_TEXT)["input_ids"]
    assert count_video_tokens(t, FRAME_TYPES, TIMESTAMPS, 4, 1) == len(ids) == 32


def test_ids_come_from_the_tokenizer(tok, other_tok):
    assert vision_token_ids(tok) != vision_token_ids(other_tok)
    assert video_ids(tok, FRAME_TYPES, TIMESTAMPS, 4, 1) != video_ids(
        other_tok, FRAME_TYPES, TIMESTAMPS, 4, 1
    )


def test_longer_video_with_repeated_and_long_timestamps(tok):
    types = [0, 1, 1, 1, 0, 1, 0, 0, 1, 1]
    stamps = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 59.5, 60.0, 125.0, 125.0]
    ids = video_ids(tok, types, stamps, 12, 3)
    assert ids == tok(video_text(types, stamps, 12, 3))["input_ids"]
    assert count_video_tokens(tok, types, stamps, 12, 3) == len(ids)
    assert ids.count(tok.convert_tokens_to_ids(VP)) == 4 * 12 + 6 * 3
    assert ids.count(tok.convert_tokens_to_ids(FR)) == 10


def test_timestamp_format_follows_keye():
    # format(t, ".1f"): one decimal, no unit, rounding of the binary value as Python does.
    assert [format_timestamp(t) for t in (0, 0.04, 1.25, 2.0, 61.0, 3599.96)] == [
        "0.0", "0.0", "1.2", "2.0", "61.0", "3600.0"
    ]  # fmt: skip
    assert video_text([0], [12.25], 1, 0) == f"{VS}{FR}12.2{VP}{VE}"


def test_all_slow_video_needs_no_fast_tokens(tok):
    assert video_text([0, 0], [0.0, 0.5], 2, 0) == f"{VS}{FR}0.0{VP}{VP}{FR}0.5{VP}{VP}{VE}"
    assert (
        count_video_tokens(tok, [0, 0], [0.0, 0.5], 2, 0)
        == len(video_ids(tok, [0, 0], [0.0, 0.5], 2, 0))
        == 14
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (([0, 1], [0.0], 4, 1), "2 frame types but 1 timestamps"),
        (([0, 2], [0.0, 0.5], 4, 1), "frame types must be"),
        (([], [], 4, 1), "at least one frame"),
        (([0, 1], [0.0, 0.5], 0, 1), "slow_tokens"),
        (([0, 1], [0.0, 0.5], 4, 0), "fast_tokens"),
        (([0], [-0.5], 4, 1), "timestamp"),
        (([0], [float("nan")], 4, 1), "timestamp"),
    ],
)
def test_invalid_video_raises(tok, args, message):
    with pytest.raises(ValueError, match=message):
        video_text(*args)
    with pytest.raises(ValueError, match=message):
        video_ids(tok, *args)
    with pytest.raises(ValueError, match=message):
        count_video_tokens(tok, *args)


def test_image_stream(tok):
    assert image_text(3) == "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>"
    ids = image_ids(tok, 3)
    assert ids == tok(image_text(3))["input_ids"]
    assert count_image_tokens(3) == len(ids) == 5
    with pytest.raises(ValueError, match="positive integer"):
        image_ids(tok, 0)


# ------------------------------------------------------------------------------------------- conversations

IMAGE_TOKENS = 3
VIDEO = ([0, 1], [0.0, 0.5], 2, 1)

TWO_TURNS = {
    "messages": [
        {"role": "system", "content": "You are a careful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "file:///data/kitchen.png"},
                {"type": "video", "video": "file:///data/door.mp4"},
                {"type": "text", "text": "When does the door open? "},
                {"type": "text", "text": "/think"},
            ],
        },
        {"role": "assistant", "content": "<think>It opens in frame 2.</think><answer>At 0.5 s.</answer>"},
        {"role": "user", "content": "And the kitchen? /no_think"},
        {"role": "assistant", "content": "<think>\n\n</think><answer>It is empty.</answer>"},
    ]
}
ASSISTANT_CONTENTS = [
    "<think>It opens in frame 2.</think><answer>At 0.5 s.</answer>",
    "<think>\n\n</think><answer>It is empty.</answer>",
]


def _media(tok):
    def resolve(part: dict) -> list[int]:
        if part["type"] == "image":
            assert part["image"] == "file:///data/kitchen.png"
            return image_ids(tok, IMAGE_TOKENS)
        assert part["video"] == "file:///data/door.mp4"
        return video_ids(tok, *VIDEO)

    return resolve


def _trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_two_turn_conversation_with_image_and_video(tok):
    rendered = render_conversation(tok, TWO_TURNS, _media(tok))
    expected_text = (
        "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
        "<|im_start|>user\n" + image_text(IMAGE_TOKENS) + video_text(*VIDEO)
        + "When does the door open? /think<|im_end|>\n"
        "<|im_start|>assistant\n" + ASSISTANT_CONTENTS[0] + "<|im_end|>\n"
        "<|im_start|>user\nAnd the kitchen? /no_think<|im_end|>\n"
        "<|im_start|>assistant\n" + ASSISTANT_CONTENTS[1] + "<|im_end|>\n"
    )  # fmt: skip
    assert tok.decode(rendered.input_ids) == expected_text
    assert rendered.input_ids == tok(expected_text)["input_ids"]
    # The chat template says the same, once its one-pad media placeholders are expanded.
    templated = tok.apply_chat_template(TWO_TURNS["messages"], tokenize=False)
    templated = templated.replace(f"{VS}<|image_pad|>{VE}", image_text(IMAGE_TOKENS), 1)
    templated = templated.replace(f"{VS}{VP}{VE}", video_text(*VIDEO), 1)
    assert templated == expected_text

    # Labels: exactly each assistant content and its closing <|im_end|>, nothing else.
    spans = _trained_spans(rendered.labels)
    assert [tok.decode(rendered.input_ids[a:b]) for a, b in spans] == [
        c + "<|im_end|>" for c in ASSISTANT_CONTENTS
    ]
    for a, b in spans:
        assert rendered.labels[a:b] == rendered.input_ids[a:b]
        header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        assert rendered.input_ids[a - len(header) : a] == header
    num_media = count_image_tokens(IMAGE_TOKENS) + count_video_tokens(tok, *VIDEO)
    assert rendered.num_vision_tokens == num_media == 5 + 15
    assert (
        rendered.num_text_tokens + rendered.num_vision_tokens
        == len(rendered.input_ids)
        == len(rendered.labels)
    )


def test_text_only_conversation_and_generation_prompt(tok):
    messages = [
        {"role": "user", "content": "What is 6 * 7? /no_think"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 6 * 8?"},
    ]
    rendered = render_conversation(tok, messages, add_generation_prompt=True)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nAnd 6 * 8?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.input_ids == tok(text)["input_ids"]
    trained = [i for i in rendered.labels if i != IGNORE_INDEX]
    assert trained == tok.encode("42<|im_end|>", add_special_tokens=False)
    assert rendered.num_vision_tokens == 0 and rendered.num_text_tokens == len(rendered.input_ids)


def test_conversation_without_assistant_trains_nothing(tok):
    rendered = render_conversation(tok, [{"role": "user", "content": "hello"}])
    assert set(rendered.labels) == {IGNORE_INDEX}
    assert tok.decode(rendered.input_ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
    )


# Keye's chat template, case by case. Each expected string is written out from the template Keye's
# processor ships (Kwai-Keye/Keye `keye-vl-8b-preview/chat_template.json`; transformers' Keye docs print the
# same for the multi-turn case): a default system turn when the first message is not a system one, one
# placeholder per media part, `/think` and `/no_think` left in the user text as typed (the Keye-VL-1.5 model
# card's switch).
KEYE_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE_SLOT, VIDEO_SLOT = f"{VS}<|image_pad|>{VE}", f"{VS}{VP}{VE}"
IMAGE, VIDEO_PART = {"type": "image"}, {"type": "video"}


def _say(role: str, *parts) -> dict:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {
        "role": role,
        "content": content[0]["text"] if len(parts) == 1 and isinstance(parts[0], str) else content,
    }


KEYE_CASES = [
    pytest.param(
        [_say("user", "Hello.")],
        True,
        KEYE_SYSTEM + "<|im_start|>user\nHello.<|im_end|>\n<|im_start|>assistant\n",
        id="no-system-gets-the-default",
    ),
    pytest.param(
        [_say("system", "Answer briefly."), _say("user", "Hello.")],
        True,
        (
            "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHello.<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        id="own-system-replaces-the-default",
    ),
    pytest.param(
        [_say("user", IMAGE, "Describe this image./think")],
        True,
        KEYE_SYSTEM
        + f"<|im_start|>user\n{IMAGE_SLOT}Describe this image./think<|im_end|>\n<|im_start|>assistant\n",
        id="image-think",
    ),
    pytest.param(
        [_say("user", VIDEO_PART, "Describe this video./no_think"), _say("assistant", "A door opens.")],
        False,
        (
            KEYE_SYSTEM + f"<|im_start|>user\n{VIDEO_SLOT}Describe this video./no_think<|im_end|>\n"
            "<|im_start|>assistant\nA door opens.<|im_end|>\n"
        ),
        id="video-no-think-answered",
    ),
    pytest.param(
        [
            _say("user", IMAGE, "Hello, how are you?"),
            _say("assistant", "I'm doing well, thank you for asking. How can I assist you today?"),
            _say(
                "user",
                "Can you describe these images and video?",
                IMAGE,
                IMAGE,
                VIDEO_PART,
                "These are from my vacation.",
            ),
            _say(
                "assistant",
                "I'd be happy to describe the images and video for you. "
                "Could you please provide more context about your vacation?",
            ),
            _say("user", "It was a trip to the mountains. Can you see the details in the images and video?"),
        ],
        True,
        (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>Hello, how are you?<|im_end|>\n"
            "<|im_start|>assistant\nI'm doing well, thank you for asking. How can I assist you today?"
            "<|im_end|>\n<|im_start|>user\n"
            "Can you describe these images and video?<|vision_start|><|image_pad|><|vision_end|>"
            "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
            "These are from my vacation.<|im_end|>\n<|im_start|>assistant\nI'd be happy to describe the "
            "images and video for you. Could you please provide more context about your vacation?<|im_end|>\n"
            "<|im_start|>user\nIt was a trip to the mountains. Can you see the details in the images and "
            "video?<|im_end|>\n<|im_start|>assistant\n"
        ),
        id="transformers-docs-multi-turn",
    ),
]


@pytest.mark.parametrize("messages, generation_prompt, keye_text", KEYE_CASES)
def test_rendering_equals_keyes_chat_template(tok, messages, generation_prompt, keye_text):
    # Our chat template gives Keye's text ...
    assert (
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        == keye_text
    )
    # ... and render_conversation its tokens (media placeholders as the single-pad slots the template writes).
    slots = {"image": image_ids(tok, 1), "video": tok.encode(VIDEO_SLOT, add_special_tokens=False)}
    rendered = render_conversation(
        tok, messages, lambda part: slots[part["type"]], add_generation_prompt=generation_prompt
    )
    assert tok.decode(rendered.input_ids) == keye_text
    assert rendered.input_ids == tok(keye_text)["input_ids"]
    # The default system turn is context, never trained.
    system_len = len(tok(KEYE_SYSTEM)["input_ids"])
    if keye_text.startswith(KEYE_SYSTEM):
        assert set(rendered.labels[:system_len]) == {IGNORE_INDEX}


def test_media_part_needs_a_callback(tok):
    with pytest.raises(ValueError, match="image part found but no media callback"):
        render_conversation(tok, TWO_TURNS)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "robot", "content": "hi"}], "role must be one of"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}], "part type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "string 'text'"),
        ([], "non-empty"),
        ({"conversations": []}, "'messages'"),
    ],
)
def test_invalid_conversation_raises(tok, messages, message):
    with pytest.raises(ValueError, match=message):
        render_conversation(tok, messages, _media(tok))


def test_wrong_types_raise_type_error(tok):
    with pytest.raises(TypeError, match="content must be"):
        render_conversation(tok, [{"role": "user", "content": None}])
    with pytest.raises(TypeError, match="must be a mapping"):
        render_conversation(tok, ["hello"])


def test_render_text(tok):
    rendered = render_text(tok, "The train leaves at 08:15.")
    assert rendered.input_ids[-1] == tok.eos_token_id
    assert rendered.input_ids.count(tok.eos_token_id) == 1
    assert tok.decode(rendered.input_ids) == "The train leaves at 08:15.<|im_end|>"
    assert rendered.labels == rendered.input_ids
    assert (rendered.num_text_tokens, rendered.num_vision_tokens) == (len(rendered.input_ids), 0)
