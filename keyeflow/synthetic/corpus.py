"""A sample corpus of conversations, captions and plain text, written on the spot from seeded templates.

Nothing is shipped and nothing is downloaded: every sentence comes from templates and word lists (package
data in ``assets/*.json``, read by ``vocabulary.load``) filled by seeded draws, so tests, demos and the tiny
end-to-end run have chat data, caption pairs and plain text that point at the sample clips
(``videos.generate_videos``) and pictures (``images.generate_images``). Generation is deterministic: the
same seed, media and ``dest`` give byte-identical files (each conversation, caption or document draws from
its own ``random.Random`` seeded by a string, which Python hashes the same way on every run). It takes well
under a second.

The sample clips and pictures are known by name: their conversations say what the code that made them
states they show (``videos.describe_video``, ``images.describe_image``: shot times, colours, boxes in
[0,1000) computed from the drawing coordinates, the text drawn on them). Media under other names get
generic, still well-formed conversations.

Good outputs, under ``dest`` (keys of the returned dict in brackets):

===========================  =================================================================================
path [key]                   contents
===========================  =================================================================================
conversations.jsonl          chat rows ``{"id", "source", "task", "messages"}`` in the Keye/Qwen format: user
[conversations]              content is a list of ``{"type": "video"|"image", ...}`` and ``{"type": "text"}``
                             parts, assistant content a string. Per video: caption, temporal QA answered with
                             ``<|clip_time_start|>[t1, t2]<|clip_time_end|>`` (seconds), counting, a dense
                             "what changes" caption, a ``/think`` question answered
                             ``<think>…</think><answer>…</answer>`` and a ``/no_think`` one. Per image:
                             caption, OCR, grounding (phrase to ``<|object_ref_start|>…<|object_ref_end|>
                             <|box_start|>[[x1,y1,x2,y2]]<|box_end|>``), all boxes or region description,
                             VQA (some in thinking mode) and a two-round conversation. Plus two-image
                             interleaved rows and a few system messages. Answers run from one word to ~350.
captions.jsonl [captions]    ``{"image"|"video": path, "caption": text, "source": "captions-synth"}``: three
                             captions per image (short, medium, long), two per video
text/ [text_dir]             plain-text documents, 100 per source folder: ``encyclopedia-synth/`` (articles
                             on invented towns, species and crafts), ``math-synth/`` (worked problems whose
                             numbers are computed), ``dialogue-synth/`` (two-person conversations); 80-900
                             words each, about 600 KB in all
===========================  =================================================================================

Media paths are relative to the directory of the file that names them (``os.path.relpath``), so media may
live beside ``dest`` (``dest/../videos``); an ingestion resolves them against that directory and keeps them
inside its source root.

Bad inputs, under ``dest/bad`` (keys prefixed ``bad_``; ``BAD_DEFECTS`` lists the defective lines, all other
lines are valid rows whose media exist):

=================  ==============================  ===========================================================
key                file                            defect an ingestion must quarantine, with its reason
=================  ==============================  ===========================================================
bad_broken_line    bad/broken_line.jsonl           line 3 of 5 is cut off mid-string: not valid JSON
bad_invalid_utf8   bad/invalid_utf8.jsonl          line 2 of 3 holds bytes that are not UTF-8
bad_missing_media  bad/missing_media.jsonl         line 1 names ``videos/does_not_exist.mp4``; line 2 valid
bad_outside_root   bad/outside_root.jsonl          line 1 climbs out with ``../`` to ``/etc/passwd``, line 2
                                                   names the absolute ``/etc/hostname``; line 3 valid
bad_bad_schema     bad/bad_schema.jsonl            valid JSON, wrong shape: no ``messages`` (line 1), unknown
                                                   role (2), content a number (3), content an object (4);
                                                   line 5 valid
bad_bad_text       bad/text/ (a folder)            ``bad-text-synth/invalid_utf8.txt`` (a byte that is not
                                                   UTF-8) and ``bad-text-synth/empty.txt`` (0 bytes)
=================  ==============================  ===========================================================

Run ``python -m keyeflow.synthetic.corpus DEST VIDEO_DIR IMAGE_DIR`` to write the corpus for the media
found (top level only) in VIDEO_DIR and IMAGE_DIR.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import string
import sys
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path

from keyeflow.synthetic import vocabulary
from keyeflow.synthetic.images import ImageScene, Question, Region, describe_image
from keyeflow.synthetic.videos import Shot, VideoScene, describe_video

__all__ = [
    "BAD_DEFECTS",
    "IMAGE_SUFFIXES",
    "TEXT_SOURCES",
    "VIDEO_SUFFIXES",
    "generate_corpus",
    "main",
]

TEXT_SOURCES = ("encyclopedia-synth", "math-synth", "dialogue-synth")
DOCS_PER_SOURCE = 100
MIN_DOC_WORDS, MAX_DOC_WORDS = 80, 900
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# What is wrong with each bad file: {key: {line number (JSONL) or file name (text): defect}}. Every JSONL line
# not listed is a valid row.
BAD_DEFECTS: dict[str, dict[int | str, str]] = {
    "broken_line": {3: "not valid JSON (the line stops inside a string)"},
    "invalid_utf8": {2: "invalid UTF-8 bytes"},
    "missing_media": {1: "media file does not exist"},
    "outside_root": {1: "relative path escapes the source root", 2: "absolute path outside the source root"},
    "bad_schema": {
        1: "no 'messages' key",
        2: "unknown role",
        3: "content is a number",
        4: "content is an object",
    },
    "bad_text": {
        "bad-text-synth/invalid_utf8.txt": "invalid UTF-8",
        "bad-text-synth/empty.txt": "empty file",
    },
}


# ------------------------------------------------------------------------------------------------ utilities


def _rng(seed: int, *keys: object) -> random.Random:
    """An independent generator per item: adding or dropping one item leaves every other item unchanged."""
    return random.Random(":".join(str(k) for k in (seed, *keys)))


def _words(text: str) -> int:
    return len(text.split())


def _grow(rng: random.Random, core: Iterable[str], pool: Iterable[str], target: int) -> str:
    """The core sentences in order, then pool sentences in a seeded order, until about `target` words."""
    extra = list(dict.fromkeys(pool))
    rng.shuffle(extra)
    out: list[str] = []
    count = 0
    for sentence in [*core, *extra]:
        if count >= target:
            break
        out.append(sentence)
        count += _words(sentence)
    return " ".join(out)


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeio])")
_ALTERNATIVES = re.compile(r"\[([^\[\]|]*(?:\|[^\[\]|]*)+)\]")


class _Slots(string.Formatter):
    """str.format where a field is a fixed value if given, else a fresh draw from a named word pool.

    `{adj}` and `{adj2}` in one sentence draw different words from the pool "adj"; `[one|other]` in a
    template picks one of the alternatives.
    """

    def __init__(self, rng: random.Random, fixed: dict[str, object], pools: dict[str, tuple]):
        self.rng, self.fixed, self.pools = rng, fixed, pools
        self._drawn: dict[str, set] = {}

    def get_value(self, key, args, kwargs):
        if key in self.fixed:
            value = self.fixed[key]
            return value(self.rng) if callable(value) else value
        base = key.rstrip("0123456789")
        if base in self.pools:
            drawn = self._drawn.setdefault(base, set())
            choices = [w for w in self.pools[base] if w not in drawn] or list(self.pools[base])
            word = self.rng.choice(choices)
            drawn.add(word)
            return word
        raise KeyError(key)

    def fill(self, template: str) -> str:
        self._drawn = {}
        template = _ALTERNATIVES.sub(lambda m: self.rng.choice(m.group(1).split("|")), template)
        text = _A_BEFORE_VOWEL.sub(r"\1n ", self.format(template))  # "a astronomer" -> "an astronomer"
        return text[0].upper() + text[1:]


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.1f}"


def _clip_time(start: float, end: float) -> str:
    return f"<|clip_time_start|>[{_fmt_time(start)}, {_fmt_time(end)}]<|clip_time_end|>"


def _box(phrase: str, box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = box
    return f"<|object_ref_start|>{phrase}<|object_ref_end|><|box_start|>[[{x1},{y1},{x2},{y2}]]<|box_end|>"


def _norm_box(box_px: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box on a width×height picture to integers in [0, 1000)."""
    width, height = size

    def scale(value: float, extent: int) -> int:
        return max(0, min(999, int(value * 1000 / extent)))

    x1, y1, x2, y2 = box_px
    return scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height)


def _number_word(n: int) -> str:
    names = (
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
    )
    return names[n] if 0 <= n < len(names) else str(n)


# -------------------------------------------------------------------------------- media of unknown content
# Sample media are described by the code that makes them (describe_video, describe_image); for any other
# name, a guess from its size and a seeded layout, so every media file still gets well-formed rows.

_MEDIA_PHRASES = vocabulary.load("media_phrases")
_COLOURS = _MEDIA_PHRASES["colours"]
_SHAPE_NAMES = _MEDIA_PHRASES["shape_names"]


def _generic_image(name: str, rng: random.Random) -> ImageScene:
    found = re.search(r"(\d{2,5})x(\d{2,5})", name)
    size = (int(found.group(1)), int(found.group(2))) if found else (1000, 1000)
    width, height = size
    regions = []
    for _ in range(rng.randint(2, 3)):
        phrase = f"the {rng.choice(_COLOURS)} {rng.choice(_SHAPE_NAMES)}"
        x1, y1 = rng.uniform(0, 0.6) * width, rng.uniform(0, 0.6) * height
        x2, y2 = x1 + rng.uniform(0.15, 0.4) * width, y1 + rng.uniform(0.15, 0.4) * height
        regions.append(Region(phrase, (x1, y1, x2, y2)))
    return ImageScene(
        size,
        f"a picture about {width} by {height} pixels",
        (
            f"The picture is {width} pixels wide and {height} pixels tall.",
            "Its content is not catalogued, so only its layout is described.",
        ),
        tuple(regions),
        questions=(
            Question(
                "Is the picture wider than it is tall?",
                "Yes" if width > height else "No",
                f"It measures {width} by {height} pixels.",
            ),
        ),
    )


def _generic_video(name: str, rng: random.Random) -> VideoScene:
    found = re.search(r"(\d{2,5})x(\d{2,5})", name)
    size = (int(found.group(1)), int(found.group(2))) if found else (640, 360)
    fps_found = re.search(r"(\d{1,3})fps", name)
    fps = int(fps_found.group(1)) if fps_found else 25
    cuts = sorted(rng.sample(range(1, 6), rng.randint(1, 2)))
    bounds = [0, *cuts, 6]
    shots = tuple(
        Shot(
            a,
            b,
            f"a {rng.choice(_COLOURS)} {rng.choice(('scene', 'pattern', 'backdrop'))}",
            rng.choice(("the view stays steady", "the content drifts slowly")),
        )
        for a, b in itertools.pairwise(bounds)
    )
    return VideoScene(6, fps, size, shots)


# --------------------------------------------------------------------------------------- sentence sources

_VIDEO_POOL = _MEDIA_PHRASES["video_sentences"]
_VIDEO_SLOTS = _MEDIA_PHRASES["video_slots"]  # {slot: words} for the {slot} fields above

_IMAGE_POOL = _MEDIA_PHRASES["image_sentences"]
_IMAGE_SLOTS = _MEDIA_PHRASES["image_slots"]

_SYSTEM_PROMPTS = _MEDIA_PHRASES["system_prompts"]


def _pool(rng: random.Random, templates: tuple[str, ...], slots: dict, fixed: dict) -> list[str]:
    formatter = _Slots(rng, fixed, slots)
    return [formatter.fill(t) for t in templates]


def _proportion(size: tuple[int, int]) -> str:
    width, height = size
    if width > 2 * height:
        return "very wide, like a panorama"
    if height > 2 * width:
        return "very tall and narrow"
    if width > height:
        return "landscape"
    if height > width:
        return "portrait"
    return "square"


# -------------------------------------------------------------------------------------- video conversations


def _video_facts(scene: VideoScene) -> list[str]:
    width, height = scene.size
    facts = [
        (
            f"The clip lasts about {scene.seconds:g} seconds at {scene.fps} frames per second, "
            f"roughly {int(scene.seconds * scene.fps)} frames in all."
        ),
        f"Each frame is {width} by {height} pixels, a {_proportion(scene.size)} format.",
    ]
    for shot in scene.shots:
        facts.append(
            f"From {_fmt_time(shot.start)} s to {_fmt_time(shot.end)} s it shows {shot.what}; {shot.motion}."
        )
    for prev, nxt in zip(scene.shots, scene.shots[1:]):
        facts.append(f"At {_fmt_time(nxt.start)} s the picture cuts straight from {prev.what} to {nxt.what}.")
    facts.append(f"The sound track carries {scene.audio}." if scene.audio else "The clip has no sound track.")
    return facts


def _video_pool(rng: random.Random, scene: VideoScene) -> list[str]:
    return _pool(rng, _VIDEO_POOL, _VIDEO_SLOTS, {"samples": int(scene.seconds * 2)})


def _video_conversations(seed: int, name: str, rel: str) -> list[tuple[str, str, list[dict]]]:
    """(source, task, messages) for one video: six conversations of different kinds."""
    rng = _rng(seed, "video", name)
    scene = describe_video(name) or _generic_video(name, rng)
    part = {"type": "video", "video": rel}
    facts = _video_facts(scene)
    shots = scene.shots
    out: list[tuple[str, str, list[dict]]] = []

    def user(text: str) -> dict:
        return {"role": "user", "content": [dict(part), {"type": "text", "text": text}]}

    def answer(text: str) -> dict:
        return {"role": "assistant", "content": text}

    # 1. caption
    ask = rng.choice(
        (
            "Describe this video in detail.",
            "What happens in this clip?",
            "Write a thorough description of the video.",
            "Give a detailed caption for this clip.",
        )
    )
    body = _grow(
        rng,
        [
            f"The video shows {shots[0].what}"
            + (
                f", followed by {len(shots) - 1} more {'shot' if len(shots) == 2 else 'shots'}."
                if len(shots) > 1
                else ", in a single continuous shot."
            ),
            *facts,
        ],
        _video_pool(rng, scene),
        rng.randint(60, 400),
    )
    out.append(("video-caption-synth", "caption", [user(ask), answer(body)]))

    # 2. temporal grounding
    shot = rng.choice(shots)
    ask = rng.choice(
        (
            f"During which seconds does the video show {shot.what}? Answer with a time span.",
            f"Find the time span in which {shot.what} is on screen.",
            f"When does {shot.what} appear? Give start and end times in seconds.",
        )
    )
    lead = f"{_clip_time(shot.start, shot.end)}"
    why = [
        (
            f"{shot.what[0].upper() + shot.what[1:]} is on screen from {_fmt_time(shot.start)} s to "
            f"{_fmt_time(shot.end)} s."
        )
    ]
    if len(shots) > 1:
        why.append(
            f"The clip contains {len(shots)} shots in total, and this is shot number {shots.index(shot) + 1}."
        )
    else:
        why.append("It is the only shot, so it fills the whole clip.")
    body = lead + " " + _grow(rng, why, facts, rng.randint(20, 120))
    out.append(("video-qa-synth", "temporal", [user(ask), answer(body)]))

    # 3. counting
    cuts = len(shots) - 1
    ask = rng.choice(
        (
            "How many hard cuts does the video contain?",
            "Count the scene changes in this clip.",
            "How many times does the picture switch abruptly to something else?",
        )
    )
    reasons = [
        (
            f"There {'is' if cuts == 1 else 'are'} {_number_word(cuts)} "
            f"{'cut' if cuts == 1 else 'cuts'}, so the clip consists of {_number_word(len(shots))} "
            f"{'shot' if len(shots) == 1 else 'shots'}."
        )
    ]
    reasons += [
        f"The cut at {_fmt_time(b.start)} s leads from {a.what} to {b.what}."
        for a, b in itertools.pairwise(shots)
    ]
    if not cuts:
        reasons.append("Any change in the picture happens gradually inside the one shot.")
    body = f"{cuts}. " + _grow(rng, reasons, _video_pool(rng, scene), rng.randint(20, 150))
    out.append(("video-qa-synth", "vqa", [user(ask), answer(body)]))

    # 4. what changes over time
    ask = rng.choice(
        (
            "Describe how the video changes over time.",
            "What changes from the start to the end?",
            "Walk me through the clip from beginning to end.",
        )
    )
    steps = []
    for k, s in enumerate(shots):
        opener = (
            "It opens with"
            if k == 0
            else rng.choice(("Next comes", "Then the clip switches to", "After that we see"))
        )
        steps.append(f"{opener} {s.what} ({_fmt_time(s.start)}-{_fmt_time(s.end)} s); {s.motion}.")
    steps.append(f"The clip ends at {scene.seconds:g} s on {shots[-1].what}.")
    body = _grow(rng, steps, [*facts, *_video_pool(rng, scene)], rng.randint(40, 300))
    out.append(("video-caption-synth", "caption", [user(ask), answer(body)]))

    # 5. thinking mode
    if len(shots) > 1:
        k = rng.randrange(len(shots) - 1)
        a, b = shots[k], shots[k + 1]
        ask = f"Which scene comes directly after {a.what}, and when does it start and end? /think"
        think = [f"I need the shot that follows {a.what}.", "Listing the shots in order:"]
        think += [
            f"shot {i + 1} runs from {_fmt_time(s.start)} s to {_fmt_time(s.end)} s and shows {s.what}."
            for i, s in enumerate(shots)
        ]
        think += [
            f"{a.what[0].upper() + a.what[1:]} is shot {k + 1}, so the answer is shot {k + 2}.",
            f"That shot starts at {_fmt_time(b.start)} s and ends at {_fmt_time(b.end)} s.",
            "Checking the cut: the change is abrupt, with no fade, so the boundary is sharp.",
        ]
        final = f"{b.what[0].upper() + b.what[1:]}, {_clip_time(b.start, b.end)}."
    else:
        s = shots[0]
        ask = "Is this one continuous shot, or is it edited from several? Explain your reasoning. /think"
        think = [
            "To tell whether there are cuts, I compare each moment of the clip with the moment before.",
            f"Throughout the clip the picture shows {s.what}.",
            f"The only change is that {s.motion}, which is a gradual change, not a jump.",
            "A cut would replace the whole picture between two frames, and that never happens here.",
        ]
        final = (
            f"It is one continuous shot lasting {scene.seconds:g} seconds: {_clip_time(0, scene.seconds)}."
        )
    reasoning = _grow(rng, think, [*facts, *_video_pool(rng, scene)], rng.randint(60, 360))
    body = f"<think>{reasoning}</think><answer>{final}</answer>"
    out.append(("video-reasoning-synth", "vqa", [user(ask), answer(body)]))

    # 6. /no_think
    question, short = rng.choice(
        (
            ("How long is the video, in seconds?", f"About {scene.seconds:g} seconds."),
            (
                "Is the video in portrait or landscape format?",
                "Portrait." if scene.size[1] > scene.size[0] else "Landscape.",
            ),
            ("Does the clip have sound?", f"Yes: {scene.audio}." if scene.audio else "No, it is silent."),
        )
    )
    body = _grow(rng, [short], facts, rng.randint(20, 200))
    out.append(("video-qa-synth", "vqa", [user(f"{question} /no_think"), answer(body)]))
    return out


def _video_captions(seed: int, name: str) -> list[str]:
    rng = _rng(seed, "video-caption", name)
    scene = describe_video(name) or _generic_video(name, rng)
    parts = [s.what for s in scene.shots]
    short = parts[0] if len(parts) == 1 else ", then ".join(parts[:3])
    short = short[0].upper() + short[1:] + "."
    long = _grow(rng, _video_facts(scene), _video_pool(rng, scene), rng.randint(50, 140))
    return [short, long]


# -------------------------------------------------------------------------------------- image conversations


def _image_facts(scene: ImageScene) -> list[str]:
    width, height = scene.size
    facts = [
        f"It shows {scene.summary}.",
        *scene.details,
        f"The picture is {width} pixels wide and {height} pixels tall ({_proportion(scene.size)}).",
    ]
    if scene.text:
        facts.append(f"Readable text includes \u201c{scene.text[0]}\u201d.")
    else:
        facts.append("There is no readable text in it.")
    return facts


def _image_pool(rng: random.Random, scene: ImageScene) -> list[str]:
    return _pool(rng, _IMAGE_POOL, _IMAGE_SLOTS, {"proportion": _proportion(scene.size)})


def _image_scene(seed: int, name: str) -> ImageScene:
    return describe_image(name) or _generic_image(name, _rng(seed, "image-generic", name))


def _image_conversations(seed: int, name: str, rel: str) -> list[tuple[str, str, list[dict]]]:
    rng = _rng(seed, "image", name)
    scene = _image_scene(seed, name)
    part = {"type": "image", "image": rel}
    facts = _image_facts(scene)
    boxes = [(phrase, _norm_box(px, scene.size)) for phrase, px in scene.regions]
    out: list[tuple[str, str, list[dict]]] = []

    def user(text: str) -> dict:
        return {"role": "user", "content": [dict(part), {"type": "text", "text": text}]}

    def answer(text: str) -> dict:
        return {"role": "assistant", "content": text}

    # 1. caption
    ask = rng.choice(
        (
            "Describe this image in detail.",
            "What does this picture show?",
            "Write a detailed caption for the image.",
            "Describe everything you can see.",
        )
    )
    out.append(
        (
            "image-caption-synth",
            "caption",
            [user(ask), answer(_grow(rng, facts, _image_pool(rng, scene), rng.randint(40, 400)))],
        )
    )

    # 2. OCR
    if scene.text:
        if len(scene.text) > 20:  # a long page: read from the top, a varying number of lines
            lines = scene.text[: rng.randint(3, 40)]
            ask = f"Read the first {len(lines)} lines of text in the image, from the top."
        else:
            lines = scene.text
            ask = rng.choice(
                (
                    "Read all the text in the image.",
                    "Transcribe every piece of text you can see.",
                    "What text appears in this picture? Copy it exactly.",
                )
            )
        body = "\n".join(lines)
    else:
        ask = rng.choice(
            ("Is there any text in this image? If so, read it.", "Transcribe any text in the image.")
        )
        body = _grow(rng, ["There is no text in this image.", *scene.details], [], rng.randint(20, 80))
    out.append(("image-ocr-synth", "ocr", [user(ask), answer(body)]))

    # 3. grounding: phrase to box
    phrase, box = rng.choice(boxes)
    ask = rng.choice(
        (
            f"Locate {phrase} in the image.",
            f"Where is {phrase}? Give its bounding box.",
            f"Find {phrase} and output its box.",
        )
    )
    extra = ["The box is given as x1, y1, x2, y2 on a 0 to 999 scale of the picture's width and height."]
    body = _box(phrase, box)
    if rng.random() < 0.5:
        body += " " + _grow(rng, extra, [], rng.randint(10, 40))
    out.append(("image-grounding-synth", "grounding", [user(ask), answer(body)]))

    # 4. grounding: every object, or box to phrase
    if len(boxes) > 1 and rng.random() < 0.5:
        ask = "Detect all the distinct objects in the image and give a box for each."
        body = "\n".join(_box(p, b) for p, b in boxes)
    else:
        phrase, box = rng.choice(boxes)
        x1, y1, x2, y2 = box
        ask = f"What is inside the region <|box_start|>[[{x1},{y1},{x2},{y2}]]<|box_end|>?"
        body = _grow(rng, [f"That region contains {phrase}."], facts, rng.randint(20, 100))
    out.append(("image-grounding-synth", "grounding", [user(ask), answer(body)]))

    # 5. VQA, thinking mode for some pictures
    question, short, why = rng.choice(scene.questions)
    if rng.random() < 0.4:
        reasoning = _grow(
            rng,
            [f"The question is: {question}", why, "Let me check that against the picture.", *scene.details],
            facts,
            rng.randint(40, 300),
        )
        body = f"<think>{reasoning}</think><answer>{short}</answer>"
        out.append(("image-reasoning-synth", "vqa", [user(f"{question} /think"), answer(body)]))
    else:
        body = _grow(rng, [short + ("" if short.endswith(".") else "."), why], facts, rng.randint(20, 250))
        suffix = " /no_think" if rng.random() < 0.3 else ""
        out.append(("image-vqa-synth", "vqa", [user(question + suffix), answer(body)]))

    # 6. two-round conversation
    first_q = rng.choice(
        ("What kind of picture is this?", "Summarise this image briefly.", "What is the main subject here?")
    )
    first_a = _grow(rng, [f"It is {scene.summary}."], scene.details, rng.randint(15, 120))
    phrase, box = rng.choice(boxes)
    second_q = rng.choice(
        (f"And where exactly is {phrase}?", f"Can you point out {phrase}?", f"Show me where {phrase} is.")
    )
    second_a = _box(phrase, box) + " " + _grow(rng, [], _image_pool(rng, scene), rng.randint(10, 80))
    out.append(
        (
            "image-chat-synth",
            "conversation",
            [user(first_q), answer(first_a), {"role": "user", "content": second_q}, answer(second_a.strip())],
        )
    )
    return out


def _image_captions(seed: int, name: str) -> list[str]:
    rng = _rng(seed, "image-caption", name)
    scene = _image_scene(seed, name)
    short = scene.summary[0].upper() + scene.summary[1:] + "."
    medium = _grow(rng, [short, *scene.details[:2]], [], rng.randint(20, 40))
    long = _grow(rng, _image_facts(scene), _image_pool(rng, scene), rng.randint(60, 140))
    return [short, medium, long]


def _pair_conversation(seed: int, a: tuple[str, str], b: tuple[str, str]) -> tuple[str, str, list[dict]]:
    rng = _rng(seed, "pair", a[0], b[0])
    scene_a, scene_b = _image_scene(seed, a[0]), _image_scene(seed, b[0])
    question = rng.choice(
        (
            "What is different between the two pictures?",
            "Compare the two images.",
            "Which of the two pictures contains readable text, and what do they show?",
        )
    )
    content = [
        {"type": "text", "text": "Picture 1:"},
        {"type": "image", "image": a[1]},
        {"type": "text", "text": "Picture 2:"},
        {"type": "image", "image": b[1]},
        {"type": "text", "text": question},
    ]

    def text_note(scene: ImageScene, label: str) -> str:
        return (
            f"{label} contains text, starting with \u201c{scene.text[0]}\u201d."
            if scene.text
            else f"{label} has no text."
        )

    core = [
        f"Picture 1 shows {scene_a.summary}, while picture 2 shows {scene_b.summary}.",
        text_note(scene_a, "Picture 1"),
        text_note(scene_b, "Picture 2"),
        f"Picture 1 is {_proportion(scene_a.size)} and picture 2 is {_proportion(scene_b.size)}.",
    ]
    body = _grow(rng, core, [*scene_a.details[:2], *scene_b.details[:2]], rng.randint(40, 250))
    return (
        "multi-image-synth",
        "interleaved",
        [{"role": "user", "content": content}, {"role": "assistant", "content": body}],
    )


# ------------------------------------------------------------------------------------------- text corpora

_ENCYCLOPEDIA_PHRASES = vocabulary.load("encyclopedia")
_SYLLABLES = _ENCYCLOPEDIA_PHRASES["syllables"]


def _name(rng: random.Random, syllables: int | None = None) -> str:
    n = syllables or rng.choice((2, 2, 3, 3, 4))
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


_TEXT_SLOTS = _ENCYCLOPEDIA_PHRASES["slots"]

_ETYMOLOGY = _ENCYCLOPEDIA_PHRASES["etymology"]

# {kind: {"title", "intro": templates, "sections": {heading: templates}, "lists": headings}}
_ENCYCLOPEDIA = _ENCYCLOPEDIA_PHRASES["articles"]

_TIMELINE = _ENCYCLOPEDIA_PHRASES["timeline"]
_ENCYCLOPEDIA_LINKS = _ENCYCLOPEDIA_PHRASES["links"]


def _person(rng: random.Random) -> str:
    return f"{_name(rng, 2)} {_name(rng, 3)}"


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _list_entry(rng: random.Random, slots: _Slots, kind: str, heading: str, years) -> str:
    if heading in ("Timeline", "Survey records"):
        return f"{next(years, 2024)}: {slots.fill(rng.choice(_TIMELINE[kind]))}."
    if heading == "Museum specimens":
        return (
            f"Specimen {rng.choice('ABCDEFGHKM')}-{rng.randint(100, 9999)}: "
            f"{rng.choice(('an adult male', 'an adult female', 'a juvenile'))} collected near "
            f"{rng.choice(_TEXT_SLOTS['feature'])} in {next(years, 2024)} by {_person(rng)}, "
            f"{rng.randint(5, 80)} cm long."
        )
    born = rng.randint(1500, 1930)
    return (
        f"{_person(rng)} ({born}–{born + rng.randint(30, 90)}), "
        f"{_article(rng.choice(_TEXT_SLOTS['profession']))} who "
        f"{slots.format(rng.choice(_TEXT_SLOTS['deed']))}."
    )


def _encyclopedia_doc(rng: random.Random, index: int, target: int) -> str:
    kind = ("town", "species", "craft")[index % 3]
    spec = _ENCYCLOPEDIA[kind]
    year1 = rng.randint(900, 1500)
    year2 = rng.randint(year1 + 20, 1750)
    year3 = rng.randint(year2 + 20, 1990)
    # Facts are drawn once per article, so a number mentioned twice agrees with itself.
    fixed: dict[str, object] = {
        "name": _name(rng),
        "region": _name(rng),
        "river": _name(rng, 2),
        "person": _person(rng),
        "other": _name(rng),
        "variant": _name(rng),
        "year1": year1,
        "year2": year2,
        "year3": year3,
        "century": f"{(year2 // 100) + 1}th",
        "pop_old": f"{rng.randint(300, 9000):,}",
        "elev": rng.randint(40, 1800),
        "bridges": rng.randint(2, 9),
        "area": f"{rng.uniform(4, 180):.1f}",
        "share": rng.randint(8, 45),
        "size": rng.randint(8, 70),
        "weight": rng.randint(12, 2400),
        "clutch": rng.randint(2, 7),
        "territory": rng.randint(1, 40),
        "population": f"{rng.randint(80, 20000):,}",
        "workshops": rng.randint(20, 140),
        "workshops2": rng.randint(3, 19),
        "days": rng.randint(2, 30),
        "steps": rng.randint(4, 12),
        "years": rng.randint(2, 7),
        "distance": rng.randint(6, 90),
        "small": rng.randint(2, 11),
        "weeks": rng.randint(3, 14),
        "weekday": rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")),
        "animal": rng.choice(_TEXT_SLOTS["animal"]),
        "trade": rng.choice(_TEXT_SLOTS["trade"]),
        "count": lambda r: f"{r.randint(20, 5000):,}",
    }
    slots = _Slots(rng, fixed, _TEXT_SLOTS)
    budget = MAX_DOC_WORDS - 15  # room for the closing links line

    title = slots.fill(spec["title"])
    paragraphs = [slots.fill(rng.choice(spec["intro"]))]
    count = _words(title) + _words(paragraphs[0])
    sections = [*spec["sections"].items(), ("Name", _ETYMOLOGY)]
    rng.shuffle(sections)
    for heading, templates in sections:
        if count >= target:
            break
        picks = rng.sample(templates, min(len(templates), rng.randint(3, 6)))
        sentences = [slots.fill(t) for t in picks]
        while sentences and count + 1 + sum(map(_words, sentences)) > budget:
            sentences.pop()
        if not sentences:
            break
        paragraphs.append(heading + "\n" + " ".join(sentences))
        count += _words(paragraphs[-1])

    # Past the prose, lists that can run long without repeating themselves.
    first = 1850 if kind == "species" else year1
    years = iter(sorted(rng.sample(range(first, 2024), 60)))
    seen: set[str] = set()
    for heading in spec["lists"]:
        entries: list[str] = []
        while count < target and len(entries) < 25:
            entry = _list_entry(rng, slots, kind, heading, years)
            if entry in seen:
                continue
            if count + _words(entry) + 2 > budget:
                break
            seen.add(entry)
            entries.append(entry)
            count += _words(entry)
        if entries:
            paragraphs.append(heading + "\n" + "\n".join(entries))
            count += _words(heading)
    paragraphs.append(slots.fill(rng.choice(_ENCYCLOPEDIA_LINKS)))
    return title + "\n\n" + "\n\n".join(paragraphs) + "\n"


# Each worked problem: (statement, solution steps, answer), the numbers computed here.
def _p_linear(r: random.Random) -> tuple[str, list[str], str]:
    x, a, b = r.randint(-12, 20), r.randint(2, 9), r.choice([v for v in range(-30, 31) if v])
    c = a * x + b
    return (
        f"Solve {a}x {'+' if b > 0 else '−'} {abs(b)} = {c} for x.",
        [
            f"{'Subtract' if b > 0 else 'Add'} {abs(b)} on both sides: {a}x = {c - b}.",
            f"Divide both sides by {a}: x = {c - b} / {a} = {x}.",
            (
                f"Check: {a} × {_par(x)} = {a * x}, and {a * x} {'+' if b > 0 else '−'} {abs(b)} = {c}, as "
                "required."
            ),
        ],
        f"x = {x}",
    )


def _p_discount(r: random.Random) -> tuple[str, list[str], str]:
    price, pct = r.randint(12, 480), r.choice((5, 10, 15, 20, 25, 30, 40))
    off = Fraction(price * pct, 100)
    final = price - off
    item = r.choice(("jacket", "kettle", "bicycle lamp", "pair of boots", "desk chair", "tent", "backpack"))
    return (
        f"A {item} costs {price} euros and is sold at {pct}% off. What is the sale price?",
        [
            f"The discount is {pct}% of {price}, that is {price} × {pct} / 100 = {float(off):.2f} euros.",
            f"Subtract it from the original price: {price} − {float(off):.2f} = {float(final):.2f}.",
        ],
        f"{float(final):.2f} euros",
    )


def _p_rectangle(r: random.Random) -> tuple[str, list[str], str]:
    w, h = r.randint(3, 40), r.randint(3, 40)
    thing = r.choice(("garden bed", "classroom floor", "poster", "field", "tablecloth", "balcony"))
    return (
        f"A rectangular {thing} measures {w} m by {h} m. Find its area and its perimeter.",
        [
            f"Area is length times width: {w} × {h} = {w * h} square metres.",
            f"Perimeter is twice the sum of the sides: 2 × ({w} + {h}) = {2 * (w + h)} metres.",
        ],
        f"area {w * h} m², perimeter {2 * (w + h)} m",
    )


def _p_average(r: random.Random) -> tuple[str, list[str], str]:
    values = [r.randint(40, 100) for _ in range(r.randint(4, 7))]
    total = sum(values)
    mean = Fraction(total, len(values))
    who = r.choice(("A student scored", "A runner logged", "A shop sold", "A weather station recorded"))
    unit = {
        "A student scored": "points in each test",
        "A runner logged": "minutes on each run",
        "A shop sold": "loaves on each day",
        "A weather station recorded": "millimetres of rain each week",
    }[who]
    return (
        f"{who} {', '.join(map(str, values))} {unit}. What is the mean?",
        [
            f"Add the values: {' + '.join(map(str, values))} = {total}.",
            f"Divide by the number of values, {len(values)}: {total} / {len(values)} = {float(mean):.2f}.",
        ],
        f"{float(mean):.2f}",
    )


def _p_series(r: random.Random) -> tuple[str, list[str], str]:
    a, d, n = r.randint(1, 15), r.randint(1, 9), r.randint(5, 30)
    last = a + (n - 1) * d
    total = n * (a + last) // 2
    return (
        f"Find the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...",
        [
            f"The common difference is {d}, so the {n}th term is {a} + ({n} − 1) × {d} = {last}.",
            f"The sum is n times the mean of the first and last terms: {n} × ({a} + {last}) / 2 = {total}.",
        ],
        f"{total}",
    )


def _decimal(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.2f}"


def _p_speed(r: random.Random) -> tuple[str, list[str], str]:
    speed, minutes = r.choice((30, 40, 45, 48, 60, 72, 80, 90)), r.choice((20, 30, 45, 50, 75, 90, 105, 150))
    hours = Fraction(minutes, 60)
    dist = speed * hours
    who = r.choice(("A train", "A cyclist", "A ferry", "A delivery van", "A bus"))
    return (
        f"{who} travels at a steady {speed} km/h for {minutes} minutes. How far does it go?",
        [
            f"Convert the time to hours: {minutes} / 60 = {hours} h.",
            f"Distance is speed times time: {speed} × {hours} = {_decimal(dist)} km."
            + ("" if dist.denominator == 1 else " (rounded to two decimals)"),
        ],
        f"{_decimal(dist)} km",
    )


def _p_interest(r: random.Random) -> tuple[str, list[str], str]:
    principal, rate, years = r.randint(5, 80) * 100, r.choice((2, 3, 4, 5, 6)), r.randint(2, 5)
    amount = principal
    steps = []
    for year in range(1, years + 1):
        new = round(amount * (1 + rate / 100), 2)
        steps.append(f"After year {year}: {amount:.2f} × {1 + rate / 100:.2f} = {new:.2f}.")
        amount = new
    return (
        (
            f"{principal} euros are invested at {rate}% interest compounded yearly. "
            f"How much is there after {years} years?"
        ),
        [
            "Each year the balance is multiplied by 1 plus the rate.",
            *steps,
            "Amounts are rounded to the cent each year, as a bank would.",
        ],
        f"{amount:.2f} euros",
    )


def _p_ratio(r: random.Random) -> tuple[str, list[str], str]:
    p, q = r.randint(1, 7), r.randint(1, 7)
    unit = r.randint(3, 40)
    total = (p + q) * unit
    names = r.sample(("Ana", "Bo", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun"), 2)
    return (
        f"{names[0]} and {names[1]} share {total} marbles in the ratio {p}:{q}. How many does each get?",
        [
            f"The ratio has {p} + {q} = {p + q} parts.",
            f"One part is {total} / {p + q} = {unit} marbles.",
            f"{names[0]} gets {p} × {unit} = {p * unit} and {names[1]} gets {q} × {unit} = {q * unit}.",
        ],
        f"{names[0]} {p * unit}, {names[1]} {q * unit}",
    )


def _p_pythagoras(r: random.Random) -> tuple[str, list[str], str]:
    a, b, c = r.choice(((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29)))
    k = r.randint(1, 6)
    a, b, c = a * k, b * k, c * k
    return (
        f"A ladder reaches {b} m up a wall and its foot stands {a} m from the wall. How long is it?",
        [
            "The wall, the ground and the ladder form a right triangle with the ladder as hypotenuse.",
            f"Square the two legs: {a}² = {a * a} and {b}² = {b * b}.",
            f"Add them: {a * a} + {b * b} = {c * c}, and the square root of {c * c} is {c}.",
        ],
        f"{c} m",
    )


def _p_fractions(r: random.Random) -> tuple[str, list[str], str]:
    x = y = Fraction(1)
    while x.denominator == 1 or y.denominator == 1:
        x, y = Fraction(r.randint(1, 9), r.randint(2, 12)), Fraction(r.randint(1, 9), r.randint(2, 12))
    lcm = x.denominator * y.denominator // math.gcd(x.denominator, y.denominator)
    nx, ny = x.numerator * (lcm // x.denominator), y.numerator * (lcm // y.denominator)
    total = x + y
    last = f"which simplifies to {total}" if total.denominator != lcm else "which is already in lowest terms"
    return (
        f"Compute {x} + {y} and simplify.",
        [
            f"The least common denominator is {lcm}.",
            f"Rewrite: {x} = {nx}/{lcm} and {y} = {ny}/{lcm}.",
            f"Add the numerators: {nx} + {ny} = {nx + ny}, giving {nx + ny}/{lcm}, {last}.",
        ],
        f"{total}",
    )


def _term(coefficient: int, variable: str, first: bool = False) -> str:
    """`3x`, `+ 3x`, `− 3x`, `x`: one term of a linear expression, written as people write it."""
    body = f"{abs(coefficient) if abs(coefficient) != 1 else ''}{variable}"
    if first:
        return body if coefficient > 0 else f"−{body}"
    return f"+ {body}" if coefficient > 0 else f"− {body}"


def _par(value: int) -> str:
    return f"({value})" if value < 0 else str(value)


def _p_system(r: random.Random) -> tuple[str, list[str], str]:
    x, y = r.randint(-9, 12), r.randint(-9, 12)
    a, b = r.randint(1, 6), r.randint(1, 6)
    c, d = r.randint(1, 6), r.randint(-6, -1)
    e, f = a * x + b * y, c * x + d * y
    det = a * d - b * c
    if det == 0:
        return _p_linear(r)
    return (
        (
            f"Solve the system {_term(a, 'x', True)} {_term(b, 'y')} = {e} and "
            f"{_term(c, 'x', True)} {_term(d, 'y')} = {f}."
        ),
        [
            (
                f"The determinant is {a} × {_par(d)} − {b} × {c} = {det}, which is not zero, so there is "
                "exactly one solution."
            ),
            f"By Cramer's rule, x = ({_par(e)} × {_par(d)} − {b} × {_par(f)}) / {_par(det)} = {x},",
            f"and y = ({a} × {_par(f)} − {_par(e)} × {c}) / {_par(det)} = {y}.",
            f"Check in the first equation: {a} × {_par(x)} + {b} × {_par(y)} = {e}.",
        ],
        f"x = {x}, y = {y}",
    )


def _p_probability(r: random.Random) -> tuple[str, list[str], str]:
    red, blue, green = r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)
    total = red + blue + green
    colour, count = r.choice((("red", red), ("blue", blue), ("green", green)))
    p = Fraction(count, total)
    return (
        (
            f"A bag holds {red} red, {blue} blue and {green} green marbles. One is drawn at random. "
            f"What is the probability that it is {colour}?"
        ),
        [
            f"There are {red} + {blue} + {green} = {total} marbles, each equally likely.",
            f"{count} of them are {colour}, so the probability is {count}/{total}"
            + (f", which simplifies to {p}." if p.denominator != total else "."),
        ],
        f"{p} (about {float(p):.3f})",
    )


def _p_gcd(r: random.Random) -> tuple[str, list[str], str]:
    g = r.randint(2, 12)
    a, b = g * r.randint(2, 15), g * r.randint(2, 15)
    gcd = math.gcd(a, b)
    lcm = a * b // gcd
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} × {y} + {x % y}.")
        x, y = y, x % y
    return (
        f"Find the greatest common divisor and the least common multiple of {a} and {b}.",
        [
            "Use the Euclidean algorithm.",
            *steps,
            f"The last non-zero remainder is {gcd}.",
            f"The least common multiple is {a} × {b} / {gcd} = {lcm}.",
        ],
        f"gcd {gcd}, lcm {lcm}",
    )


def _p_units(r: random.Random) -> tuple[str, list[str], str]:
    litres, cups = r.randint(2, 30), r.choice((150, 200, 250, 300))
    total_ml = litres * 1000
    full, rest = divmod(total_ml, cups)
    return (
        f"How many {cups} ml cups can be filled from {litres} litres of soup, and how much is left?",
        [
            f"Convert litres to millilitres: {litres} × 1000 = {total_ml} ml.",
            f"Divide by the cup size: {total_ml} / {cups} = {full} remainder {rest}.",
        ],
        f"{full} cups, {rest} ml left",
    )


_PROBLEMS: tuple[Callable[[random.Random], tuple[str, list[str], str]], ...] = (
    _p_linear,
    _p_discount,
    _p_rectangle,
    _p_average,
    _p_series,
    _p_speed,
    _p_interest,
    _p_ratio,
    _p_pythagoras,
    _p_fractions,
    _p_system,
    _p_probability,
    _p_gcd,
    _p_units,
)
_MATH_PHRASES = vocabulary.load("math")
_MATH_TITLES = _MATH_PHRASES["titles"]
_MATH_LEADS = _MATH_PHRASES["leads"]


def _math_doc(rng: random.Random, index: int, target: int) -> str:
    title = rng.choice(_MATH_TITLES).format(n=index + 1)
    blocks, count, number = [], _words(title), 1
    while count < target:
        statement, steps, result = rng.choice(_PROBLEMS)(rng)
        block = (
            f"Problem {number}. {statement}\n{rng.choice(_MATH_LEADS)} "
            + " ".join(steps)
            + f"\nAnswer: {result}."
        )
        if count + _words(block) > MAX_DOC_WORDS and count >= MIN_DOC_WORDS:
            break
        blocks.append(block)
        count += _words(block)
        number += 1
    return title + "\n\n" + "\n\n".join(blocks) + "\n"


_DIALOGUE_PHRASES = vocabulary.load("dialogue")
_DIALOGUE_TOPICS = _DIALOGUE_PHRASES["topics"]  # {topic: lines in order, two speakers taking turns}
_DIALOGUE_GENERIC = _DIALOGUE_PHRASES["replies"]  # said before a line now and then
_DIALOGUE_SLOTS = _DIALOGUE_PHRASES["slots"]
_FIRST_NAMES = _DIALOGUE_PHRASES["first_names"]


def _dialogue_doc(rng: random.Random, index: int, target: int) -> str:
    a, b, c = rng.sample(_FIRST_NAMES, 3)
    topics = list(_DIALOGUE_TOPICS)
    rng.shuffle(topics)
    fixed: dict[str, object] = {
        "time": lambda r: f"{r.randint(6, 21)}:{r.choice(('00', '15', '30', '45'))}",
        "time2": lambda r: f"{r.randint(6, 21)}:{r.choice(('05', '20', '35', '50'))}",
        "time3": lambda r: f"{r.randint(6, 21)}:{r.choice(('10', '25', '40', '55'))}",
        "num": lambda r: r.randint(12, 95),
        "num2": lambda r: r.randint(20, 90),
        "small": lambda r: r.randint(2, 9),
        "name": c,
        "plant2": lambda r: r.choice(_DIALOGUE_SLOTS["plant"]),
        # What a topic talks about stays the same within a document.
        "food": rng.choice(_DIALOGUE_SLOTS["food"]),
        "place": rng.choice(_DIALOGUE_SLOTS["place"]),
    }
    slots = _Slots(rng, fixed, _DIALOGUE_SLOTS)
    lines = [f"A conversation between {a} and {b}."]
    count = _words(lines[0])
    speaker = rng.choice((a, b))
    for topic in topics:
        if count >= target:
            break
        lines.append(f"\n[{a} and {b} talk about {topic}.]")
        count += _words(lines[-1])
        for number, template in enumerate(_DIALOGUE_TOPICS[topic]):
            if number and rng.random() < 0.12:
                continue
            text = slots.fill(template)
            if number and rng.random() < 0.2:
                text = rng.choice(_DIALOGUE_GENERIC) + " " + text
            line = f"{speaker}: {text}"
            if count + _words(line) > MAX_DOC_WORDS:
                break
            lines.append(line)
            count += _words(line)
            speaker = b if speaker == a else a
            if count >= target:
                break
    lines.append(f"{speaker}: {rng.choice(('See you then.', 'Talk soon.', 'Thanks, bye.', 'Until later.'))}")
    return "\n".join(lines) + "\n"


_TEXT_MAKERS: dict[str, Callable[[random.Random, int, int], str]] = {
    "encyclopedia-synth": _encyclopedia_doc,
    "math-synth": _math_doc,
    "dialogue-synth": _dialogue_doc,
}


def _doc_target(rng: random.Random) -> int:
    """Log-uniform between the limits: many short documents, a tail of long ones (mean about 340 words)."""
    return int(MIN_DOC_WORDS * (MAX_DOC_WORDS / MIN_DOC_WORDS) ** rng.random())


def _text_documents(seed: int) -> Iterable[tuple[str, str]]:
    """(relative path under text/, document) for every plain-text document."""
    for source in TEXT_SOURCES:
        stem = source.removesuffix("-synth")
        for index in range(DOCS_PER_SOURCE):
            rng = _rng(seed, "text", source, index)
            yield f"{source}/{stem}-{index:04d}.txt", _TEXT_MAKERS[source](rng, index, _doc_target(rng))


# ------------------------------------------------------------------------------------------------- writing


def _partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _write_bytes(path: Path, data: bytes, overwrite: bool) -> None:
    """Write atomically (a crash never leaves a half file under the final name); keep what exists."""
    if path.exists() and not overwrite:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(path)
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _jsonl(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _rel(media: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(media).absolute(), Path(base).absolute())).as_posix()


def _conversation_rows(seed: int, videos: list[Path], images: list[Path], base: Path) -> list[dict]:
    rows: list[dict] = []

    def add(prefix: str, items: list[tuple[str, str, list[dict]]]) -> None:
        for k, (source, task, messages) in enumerate(items):
            number = len(rows)
            if number % 9 == 4:  # a few system messages, spread over every kind of row
                prompt = _SYSTEM_PROMPTS[(number // 9) % len(_SYSTEM_PROMPTS)]
                messages = [{"role": "system", "content": prompt}, *messages]
            rows.append({"id": f"{prefix}-{k}", "source": source, "task": task, "messages": messages})

    for index, video in enumerate(videos):
        add(f"video-{index:03d}", _video_conversations(seed, Path(video).name, _rel(video, base)))
    for index, image in enumerate(images):
        add(f"image-{index:03d}", _image_conversations(seed, Path(image).name, _rel(image, base)))
    named = [(Path(p).name, _rel(p, base)) for p in images]
    for pair, start in enumerate(range(0, len(named) - 1, 3)):
        add(f"pair-{pair:03d}", [_pair_conversation(seed, named[start], named[start + 1])])
    return rows


def _caption_rows(seed: int, videos: list[Path], images: list[Path], base: Path) -> list[dict]:
    rows = []
    for image in images:
        for caption in _image_captions(seed, Path(image).name):
            rows.append({"image": _rel(image, base), "caption": caption, "source": "captions-synth"})
    for video in videos:
        for caption in _video_captions(seed, Path(video).name):
            rows.append({"video": _rel(video, base), "caption": caption, "source": "captions-synth"})
    return rows


def _simple(text_q: str, text_a: str, media: tuple[str, str] | None = None, row_id: str = "") -> dict:
    content: list[dict] = []
    if media:
        content.append({"type": media[0], media[0]: media[1]})
    content.append({"type": "text", "text": text_q})
    return {
        "id": row_id,
        "source": "bad-inputs-synth",
        "task": "vqa" if media else "conversation",
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": text_a}],
    }


def _bad_files(bad: Path, videos: list[Path], images: list[Path], overwrite: bool) -> dict[str, Path]:
    """The bad inputs (see BAD_DEFECTS); media paths relative to `bad`, as every JSONL names them."""
    video = ("video", _rel(videos[0], bad)) if videos else None
    image = ("image", _rel(images[0], bad)) if images else None
    some = video or image
    out: dict[str, Path] = {}

    def dump(row: dict) -> bytes:
        return json.dumps(row, ensure_ascii=False).encode("utf-8")

    lines = [
        dump(
            _simple(
                "What colour is the sky on a clear day?",
                "Blue, because air scatters short wavelengths of sunlight more than long ones.",
                row_id="broken-1",
            )
        ),
        dump(_simple("Describe the clip briefly.", "A short synthetic test clip.", video, "broken-2")),
        (
            b'{"id": "broken-3", "source": "bad-inputs-synth", "messages": [{"role": "user", "content": '
            b'"this line stops in the middle of a stri'
        ),
        dump(_simple("What is shown here?", "A synthetic test picture.", image, "broken-4")),
        dump(_simple("Name a prime number above ten.", "Eleven is the smallest one.", row_id="broken-5")),
    ]
    out["broken_line"] = bad / "broken_line.jsonl"
    _write_bytes(out["broken_line"], b"\n".join(lines) + b"\n", overwrite)

    # Line 2: a Latin-1 byte, a lead byte before ASCII, a lone continuation byte, a cut-off three-byte
    # sequence and an overlong encoding: none of them is UTF-8.
    invalid = (
        b'{"id": "utf8-2", "source": "bad-inputs-synth", "messages": [{"role": "user", "content": '
        b'"caf\xe9 and na\xc3ve \x80 \xe2\x82"}, {"role": "assistant", "content": "\xc0\xaf"}]}'
    )
    lines = [
        dump(_simple("Translate 'good morning' into French.", "Bonjour.", row_id="utf8-1")),
        invalid,
        dump(_simple("Write the word caf\u00e9 with its accent.", "caf\u00e9", row_id="utf8-3")),
    ]
    out["invalid_utf8"] = bad / "invalid_utf8.jsonl"
    _write_bytes(out["invalid_utf8"], b"\n".join(lines) + b"\n", overwrite)

    lines = [
        dump(
            _simple(
                "What happens in this clip?",
                "It cannot be described: the file is missing.",
                ("video", "videos/does_not_exist.mp4"),
                "missing-1",
            )
        ),
        dump(_simple("What happens in this clip?", "A short synthetic clip.", some, "missing-2")),
    ]
    out["missing_media"] = bad / "missing_media.jsonl"
    _write_bytes(out["missing_media"], b"\n".join(lines) + b"\n", overwrite)

    # Enough "../" to climb from bad/ to the filesystem root, wherever dest is: /etc/passwd in the end.
    climb = "../" * len(bad.absolute().parts) + "etc/passwd"
    lines = [
        dump(_simple("Read this file to me.", "No.", ("image", climb), "outside-1")),
        dump(_simple("What is in this picture?", "No.", ("image", "/etc/hostname"), "outside-2")),
        dump(_simple("What does this show?", "A small synthetic test sample.", some, "outside-3")),
    ]
    out["outside_root"] = bad / "outside_root.jsonl"
    _write_bytes(out["outside_root"], b"\n".join(lines) + b"\n", overwrite)

    lines = [
        dump(
            {
                "id": "schema-1",
                "source": "bad-inputs-synth",
                "conversation": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello."}],
            }
        ),
        dump(
            {
                "id": "schema-2",
                "source": "bad-inputs-synth",
                "messages": [
                    {"role": "narrator", "content": "Once upon a time."},
                    {"role": "assistant", "content": "The end."},
                ],
            }
        ),
        dump(
            {
                "id": "schema-3",
                "source": "bad-inputs-synth",
                "messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "Forty-two."}],
            }
        ),
        dump(
            {
                "id": "schema-4",
                "source": "bad-inputs-synth",
                "messages": [
                    {"role": "user", "content": {"text": "an object, not a list"}},
                    {"role": "assistant", "content": "Noted."},
                ],
            }
        ),
        dump(_simple("How many legs does a spider have?", "Eight.", row_id="schema-5")),
    ]
    out["bad_schema"] = bad / "bad_schema.jsonl"
    _write_bytes(out["bad_schema"], b"\n".join(lines) + b"\n", overwrite)

    text = bad / "text"
    _write_bytes(
        text / "bad-text-synth" / "invalid_utf8.txt",
        b"A plain paragraph that starts well.\n\nThen a stray byte \xff appears and the rest "
        b"cannot be decoded as UTF-8.\n",
        overwrite,
    )
    _write_bytes(text / "bad-text-synth" / "empty.txt", b"", overwrite)
    out["bad_text"] = text
    return out


def generate_corpus(
    dest: Path, videos: list[Path], images: list[Path], *, seed: int = 0, overwrite: bool = False
) -> dict[str, Path]:
    """Write conversations, captions, plain text and bad inputs into dest; return {key: path}.

    Keys: "conversations", "captions", "text_dir", and "bad_<name>" for each BAD_DEFECTS entry. Media
    paths in the files are relative to the directory of the file naming them. Existing files are kept
    unless overwrite, so calling this again is cheap; the same seed, media and dest give the same bytes.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    videos, images = [Path(v) for v in videos], [Path(i) for i in images]
    out: dict[str, Path] = {
        "conversations": dest / "conversations.jsonl",
        "captions": dest / "captions.jsonl",
        "text_dir": dest / "text",
    }
    if overwrite or not out["conversations"].exists():
        _write_bytes(out["conversations"], _jsonl(_conversation_rows(seed, videos, images, dest)), overwrite)
    if overwrite or not out["captions"].exists():
        _write_bytes(out["captions"], _jsonl(_caption_rows(seed, videos, images, dest)), overwrite)
    for relative, document in _text_documents(seed):
        path = out["text_dir"] / relative
        if overwrite or not path.exists():
            _write_bytes(path, document.encode("utf-8"), overwrite)
    for key, path in _bad_files(dest / "bad", videos, images, overwrite).items():
        out[f"bad_{key}"] = path
    return out


def _media_in(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyeflow.synthetic.corpus",
        description="Write sample conversations, captions, plain text and bad inputs to DEST, referring to "
        "the videos in VIDEO_DIR and the images in IMAGE_DIR.",
    )
    parser.add_argument("dest", type=Path)
    parser.add_argument("video_dir", type=Path)
    parser.add_argument("image_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rewrite files that exist")
    args = parser.parse_args(argv)
    videos = _media_in(args.video_dir, VIDEO_SUFFIXES)
    images = _media_in(args.image_dir, IMAGE_SUFFIXES)
    paths = generate_corpus(args.dest, videos, images, seed=args.seed, overwrite=args.overwrite)
    print(f"{len(videos)} videos, {len(images)} images")
    for key, path in paths.items():
        print(f"{_size(path):>9}  {path}  ({key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
