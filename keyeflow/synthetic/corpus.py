"""A sample corpus of conversations, captions and plain text, written on the spot from seeded templates.

Nothing is shipped and nothing is downloaded: every sentence comes from templates in this file filled from
seeded vocabularies, so tests, demos and the tiny end-to-end run have chat data, caption pairs and plain
text that point at the sample clips (``videos.generate_videos``) and pictures
(``images.generate_images``). Generation is deterministic: the same seed, media and ``dest``
give byte-identical files (each conversation, caption or document draws from its own ``random.Random``
seeded by a string, which Python hashes the same way on every run). It takes well under a second.

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
    "bad_text": {"bad-text-synth/invalid_utf8.txt": "invalid UTF-8",
                 "bad-text-synth/empty.txt": "empty file"},
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
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve")
    return names[n] if 0 <= n < len(names) else str(n)


# -------------------------------------------------------------------------------- media of unknown content
# Sample media are described by the code that makes them (describe_video, describe_image); for any other
# name, a guess from its size and a seeded layout, so every media file still gets well-formed rows.

_COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "grey", "brown", "white",
            "black")
_SHAPE_NAMES = ("patch", "block", "band", "blob", "stripe", "square", "circle", "region")


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
        (f"The picture is {width} pixels wide and {height} pixels tall.",
         "Its content is not catalogued, so only its layout is described."),
        tuple(regions),
        questions=(Question("Is the picture wider than it is tall?", "Yes" if width > height else "No",
                            f"It measures {width} by {height} pixels."),),
    )


def _generic_video(name: str, rng: random.Random) -> VideoScene:
    found = re.search(r"(\d{2,5})x(\d{2,5})", name)
    size = (int(found.group(1)), int(found.group(2))) if found else (640, 360)
    fps_found = re.search(r"(\d{1,3})fps", name)
    fps = int(fps_found.group(1)) if fps_found else 25
    cuts = sorted(rng.sample(range(1, 6), rng.randint(1, 2)))
    bounds = [0, *cuts, 6]
    shots = tuple(
        Shot(a, b, f"a {rng.choice(_COLOURS)} {rng.choice(('scene', 'pattern', 'backdrop'))}",
             rng.choice(("the view stays steady", "the content drifts slowly")))
        for a, b in itertools.pairwise(bounds)
    )
    return VideoScene(6, fps, size, shots)


# --------------------------------------------------------------------------------------- sentence sources

_VIDEO_POOL = (
    "The framing never changes, so the camera behaves as if it were fixed on a tripod.",
    "Every picture is generated by software, which is why the edges look crisp and the colours saturated.",
    "There are no people, animals or vehicles anywhere in the footage.",
    "The lighting is perfectly even, without shadows, glare or reflections.",
    "Compression leaves faint {artifact} in places, which is normal for a clip this small.",
    "Someone cataloguing test footage would file this under {category}.",
    "The pacing feels {tempo}, with each part given a similar amount of time.",
    "Because the content is synthetic, there is no story to follow, only a sequence of visual states.",
    "Looking closely at the {edge} edge, the picture stays sharp right up to the border.",
    "A frame grabbed at random would already tell a viewer what kind of material this is.",
    "The colours remain stable from frame to frame, with no flicker in the flat areas.",
    "Nothing is written on screen apart from what belongs to the generated patterns themselves.",
    "Such clips are handy for checking that a decoder, a resizer and a frame sampler all agree.",
    "A frame sampler running at two frames per second would collect about {samples} frames from it.",
    "Similar consecutive frames could be encoded cheaply as fast frames, while changes call for slow ones.",
    "The clip contains no camera shake, focus pulls or exposure changes.",
    "The aspect ratio stays the same for the whole duration; there is no letterboxing.",
    "If one had to name the dominant impression, it would be {impression}.",
    "None of the content depends on sound to be understood.",
    "The material is short enough to be watched in full several times in under a minute.",
    "A careful viewer would notice that the transitions carry no fades or dissolves.",
    "Texture varies a lot between the calm parts and the busy parts of the clip.",
    "Played back at half speed, the clip would reveal no hidden frames or flashes.",
    "The picture fills the whole frame; there are no black borders at the sides or at the top.",
    "An editor would have little to trim, since the clip starts and ends on meaningful content.",
    "Anyone describing it over the phone could do so in a few sentences without losing much.",
    "The motion, where there is any, follows simple rules rather than the irregular paths of real objects.",
    "A thumbnail taken from the middle of the clip would represent it {fairly}.",
    "Brightness stays within a comfortable range; nothing is blown out or crushed to black by accident.",
    "The material would make a reasonable smoke test for a video pipeline before running on real footage.",
)
_VIDEO_SLOTS = {
    "artifact": ("blocking", "banding", "ringing around sharp edges", "smearing in busy regions"),
    "category": ("encoder test material", "synthetic calibration footage", "pattern sequences",
                 "procedurally generated clips"),
    "tempo": ("brisk", "even", "mechanical", "steady", "unhurried"),
    "fairly": ("fairly well", "only partly", "reasonably", "well enough for a catalogue"),
    "edge": ("left", "right", "top", "bottom"),
    "impression": ("order and regularity", "a technical demonstration", "a machine at work",
                   "clean geometry and flat colour"),
}

_IMAGE_POOL = (
    "The picture is drawn by software, so edges are clean and colours flat or smoothly blended.",
    "There are no people, animals or photographs of real places in it.",
    "The lighting is not physical: nothing casts a shadow.",
    "Its {edge} edge is plain and carries no frame or border decoration.",
    "Someone sorting a picture collection would file it under {category}.",
    "The composition is {composition}, which makes every element easy to pick out.",
    "At a glance the overall mood is {mood}.",
    "Nothing in the scene is blurred; the whole picture is equally in focus.",
    "The colours would survive a conversion to greyscale reasonably well because their brightness differs.",
    "A resizer that keeps the aspect ratio would leave the layout untouched.",
    "Such a picture is useful for checking colour handling, resizing and box coordinates.",
    "Its proportions are {proportion}.",
    "No watermark or signature is visible.",
    "The background carries no texture beyond what is described here.",
    "All the content sits inside the picture; nothing is cut off at the borders in a way that hides it.",
)
_IMAGE_SLOTS = {
    "edge": ("left", "right", "top", "bottom"),
    "category": ("synthetic test pictures", "diagram-like graphics", "calibration images",
                 "flat illustrations"),
    "composition": ("simple", "uncluttered", "orderly", "sparse"),
    "mood": ("clinical and tidy", "bright and technical", "plain and functional", "calm"),
}

_SYSTEM_PROMPTS = (
    "You are a careful visual assistant. Describe only what can be seen or heard in the media.",
    "You are a helpful assistant for video and image understanding. Be concise unless asked for detail.",
    "Answer questions about the attached media. When you give times, use seconds.",
    "You help people understand pictures and clips. Give boxes as integers between 0 and 999.",
)


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
        (f"The clip lasts about {scene.seconds:g} seconds at {scene.fps} frames per second, "
        f"roughly {int(scene.seconds * scene.fps)} frames in all."),
        f"Each frame is {width} by {height} pixels, a {_proportion(scene.size)} format.",
    ]
    for shot in scene.shots:
        facts.append(f"From {_fmt_time(shot.start)} s to {_fmt_time(shot.end)} s it shows {shot.what}; "
                     f"{shot.motion}.")
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
    ask = rng.choice(("Describe this video in detail.", "What happens in this clip?",
                      "Write a thorough description of the video.", "Give a detailed caption for this clip."))
    body = _grow(rng, [f"The video shows {shots[0].what}" + (
        f", followed by {len(shots) - 1} more {'shot' if len(shots) == 2 else 'shots'}." if len(shots) > 1
        else ", in a single continuous shot."), *facts], _video_pool(rng, scene), rng.randint(60, 400))
    out.append(("video-caption-synth", "caption", [user(ask), answer(body)]))

    # 2. temporal grounding
    shot = rng.choice(shots)
    ask = rng.choice((
        f"During which seconds does the video show {shot.what}? Answer with a time span.",
        f"Find the time span in which {shot.what} is on screen.",
        f"When does {shot.what} appear? Give start and end times in seconds.",
    ))
    lead = f"{_clip_time(shot.start, shot.end)}"
    why = [(f"{shot.what[0].upper() + shot.what[1:]} is on screen from {_fmt_time(shot.start)} s to "
           f"{_fmt_time(shot.end)} s.")]
    if len(shots) > 1:
        why.append(f"The clip contains {len(shots)} shots in total, and this is shot number "
                   f"{shots.index(shot) + 1}.")
    else:
        why.append("It is the only shot, so it fills the whole clip.")
    body = lead + " " + _grow(rng, why, facts, rng.randint(20, 120))
    out.append(("video-qa-synth", "temporal", [user(ask), answer(body)]))

    # 3. counting
    cuts = len(shots) - 1
    ask = rng.choice(("How many hard cuts does the video contain?", "Count the scene changes in this clip.",
                      "How many times does the picture switch abruptly to something else?"))
    reasons = [(f"There {'is' if cuts == 1 else 'are'} {_number_word(cuts)} "
               f"{'cut' if cuts == 1 else 'cuts'}, so the clip consists of {_number_word(len(shots))} "
               f"{'shot' if len(shots) == 1 else 'shots'}.")]
    reasons += [f"The cut at {_fmt_time(b.start)} s leads from {a.what} to {b.what}." for a,
                b in itertools.pairwise(shots)]
    if not cuts:
        reasons.append("Any change in the picture happens gradually inside the one shot.")
    body = f"{cuts}. " + _grow(rng, reasons, _video_pool(rng, scene), rng.randint(20, 150))
    out.append(("video-qa-synth", "vqa", [user(ask), answer(body)]))

    # 4. what changes over time
    ask = rng.choice(("Describe how the video changes over time.", "What changes from the start to the end?",
                      "Walk me through the clip from beginning to end."))
    steps = []
    for k, s in enumerate(shots):
        opener = "It opens with" if k == 0 else rng.choice(("Next comes", "Then the clip switches to",
                                                             "After that we see"))
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
        think += [f"shot {i + 1} runs from {_fmt_time(s.start)} s to {_fmt_time(s.end)} s and shows {s.what}."
                  for i, s in enumerate(shots)]
        think += [f"{a.what[0].upper() + a.what[1:]} is shot {k + 1}, so the answer is shot {k + 2}.",
                  f"That shot starts at {_fmt_time(b.start)} s and ends at {_fmt_time(b.end)} s.",
                  "Checking the cut: the change is abrupt, with no fade, so the boundary is sharp."]
        final = f"{b.what[0].upper() + b.what[1:]}, {_clip_time(b.start, b.end)}."
    else:
        s = shots[0]
        ask = "Is this one continuous shot, or is it edited from several? Explain your reasoning. /think"
        think = ["To tell whether there are cuts, I compare each moment of the clip with the moment before.",
                 f"Throughout the clip the picture shows {s.what}.",
                 f"The only change is that {s.motion}, which is a gradual change, not a jump.",
                 "A cut would replace the whole picture between two frames, and that never happens here."]
        final = (f"It is one continuous shot lasting {scene.seconds:g} seconds: "
                 f"{_clip_time(0, scene.seconds)}.")
    reasoning = _grow(rng, think, [*facts, *_video_pool(rng, scene)], rng.randint(60, 360))
    body = f"<think>{reasoning}</think><answer>{final}</answer>"
    out.append(("video-reasoning-synth", "vqa", [user(ask), answer(body)]))

    # 6. /no_think
    question, short = rng.choice((
        ("How long is the video, in seconds?", f"About {scene.seconds:g} seconds."),
        ("Is the video in portrait or landscape format?",
         "Portrait." if scene.size[1] > scene.size[0] else "Landscape."),
        ("Does the clip have sound?", f"Yes: {scene.audio}." if scene.audio else "No, it is silent."),
    ))
    body = _grow(rng, [short], facts, rng.randint(20, 200))
    out.append(("video-qa-synth", "vqa", [user(f"{question} /no_think"), answer(body)]))
    return out


def _video_captions(seed: int, name: str) -> list[str]:
    rng = _rng(seed, "video-caption", name)
    scene = describe_video(name) or _generic_video(name, rng)
    parts = [s.what for s in scene.shots]
    short = (parts[0] if len(parts) == 1 else ", then ".join(parts[:3]))
    short = short[0].upper() + short[1:] + "."
    long = _grow(rng, _video_facts(scene), _video_pool(rng, scene), rng.randint(50, 140))
    return [short, long]


# -------------------------------------------------------------------------------------- image conversations


def _image_facts(scene: ImageScene) -> list[str]:
    width, height = scene.size
    facts = [f"It shows {scene.summary}.", *scene.details,
             f"The picture is {width} pixels wide and {height} pixels tall ({_proportion(scene.size)})."]
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
    ask = rng.choice(("Describe this image in detail.", "What does this picture show?",
                      "Write a detailed caption for the image.", "Describe everything you can see."))
    out.append(("image-caption-synth", "caption",
                [user(ask), answer(_grow(rng, facts, _image_pool(rng, scene), rng.randint(40, 400)))]))

    # 2. OCR
    if scene.text:
        if len(scene.text) > 20:  # a long page: read from the top, a varying number of lines
            lines = scene.text[: rng.randint(3, 40)]
            ask = f"Read the first {len(lines)} lines of text in the image, from the top."
        else:
            lines = scene.text
            ask = rng.choice(("Read all the text in the image.",
                              "Transcribe every piece of text you can see.",
                              "What text appears in this picture? Copy it exactly."))
        body = "\n".join(lines)
    else:
        ask = rng.choice(("Is there any text in this image? If so, read it.",
                          "Transcribe any text in the image."))
        body = _grow(rng, ["There is no text in this image.", *scene.details], [], rng.randint(20, 80))
    out.append(("image-ocr-synth", "ocr", [user(ask), answer(body)]))

    # 3. grounding: phrase to box
    phrase, box = rng.choice(boxes)
    ask = rng.choice((f"Locate {phrase} in the image.", f"Where is {phrase}? Give its bounding box.",
                      f"Find {phrase} and output its box."))
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
        reasoning = _grow(rng, [f"The question is: {question}", why, "Let me check that against the picture.",
                                *scene.details], facts, rng.randint(40, 300))
        body = f"<think>{reasoning}</think><answer>{short}</answer>"
        out.append(("image-reasoning-synth", "vqa", [user(f"{question} /think"), answer(body)]))
    else:
        body = _grow(rng, [short + ("" if short.endswith(".") else "."), why], facts, rng.randint(20, 250))
        suffix = " /no_think" if rng.random() < 0.3 else ""
        out.append(("image-vqa-synth", "vqa", [user(question + suffix), answer(body)]))

    # 6. two-round conversation
    first_q = rng.choice(("What kind of picture is this?", "Summarise this image briefly.",
                          "What is the main subject here?"))
    first_a = _grow(rng, [f"It is {scene.summary}."], scene.details, rng.randint(15, 120))
    phrase, box = rng.choice(boxes)
    second_q = rng.choice((f"And where exactly is {phrase}?", f"Can you point out {phrase}?",
                           f"Show me where {phrase} is."))
    second_a = _box(phrase, box) + " " + _grow(rng, [], _image_pool(rng, scene), rng.randint(10, 80))
    out.append(("image-chat-synth", "conversation", [
        user(first_q), answer(first_a), {"role": "user", "content": second_q}, answer(second_a.strip())]))
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
    question = rng.choice(("What is different between the two pictures?", "Compare the two images.",
                           "Which of the two pictures contains readable text, and what do they show?"))
    content = [{"type": "text", "text": "Picture 1:"}, {"type": "image", "image": a[1]},
               {"type": "text", "text": "Picture 2:"}, {"type": "image", "image": b[1]},
               {"type": "text", "text": question}]

    def text_note(scene: ImageScene, label: str) -> str:
        return (f"{label} contains text, starting with \u201c{scene.text[0]}\u201d." if scene.text
                else f"{label} has no text.")

    core = [f"Picture 1 shows {scene_a.summary}, while picture 2 shows {scene_b.summary}.",
            text_note(scene_a, "Picture 1"), text_note(scene_b, "Picture 2"),
            f"Picture 1 is {_proportion(scene_a.size)} and picture 2 is {_proportion(scene_b.size)}."]
    body = _grow(rng, core, [*scene_a.details[:2], *scene_b.details[:2]], rng.randint(40, 250))
    return ("multi-image-synth", "interleaved", [{"role": "user", "content": content},
                                                 {"role": "assistant", "content": body}])


# ------------------------------------------------------------------------------------------- text corpora

_SYLLABLES = ("ka", "lor", "ven", "mi", "tash", "or", "bel", "dru", "an", "sel", "qui", "mar", "to", "zen",
              "ril", "fa", "gor", "nei", "plo", "ush", "ter", "vo", "lin", "ab", "cas", "hel", "ny", "sar",
              "ost", "pe", "ru", "dan", "im", "ko", "wes", "tal", "bri", "um", "eth", "go")


def _name(rng: random.Random, syllables: int | None = None) -> str:
    n = syllables or rng.choice((2, 2, 3, 3, 4))
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


_TEXT_SLOTS = {
    "adj": ("sturdy", "quiet", "remote", "prosperous", "modest", "windswept", "fertile", "crowded", "ancient",
            "coastal", "hilly", "marshy", "sheltered", "busy", "isolated", "well-kept", "weathered",
            "lively"),
    "trade": ("weaving", "fishing", "salt extraction", "glassmaking", "printing", "shipbuilding",
              "beekeeping",
              "pottery", "clockmaking", "dairy farming", "timber", "wool dyeing", "copper mining",
              "paper milling", "tea blending", "rope making", "tanning", "stone cutting"),
    "stone": ("granite", "limestone", "red brick", "slate", "basalt", "sandstone", "timber", "flint"),
    "material": ("oak", "iron", "copper", "cedar", "fired clay", "chestnut wood", "linen", "horn", "beeswax",
                 "birch bark", "willow rods", "tin", "felt"),
    "toolstuff": ("boxwood", "horn", "bone", "iron", "brass", "ash wood"),
    "colour": ("ochre", "slate grey", "pale green", "deep red", "amber", "indigo", "silver", "rust brown",
               "ivory", "teal", "mustard yellow", "charcoal"),
    "season": ("spring", "summer", "autumn", "winter"),
    "direction": ("north", "south", "east", "west", "northeast", "southwest", "northwest", "southeast"),
    "feature": ("low hills", "salt marshes", "a chain of lakes", "a narrow valley", "chalk cliffs",
                "terraced fields", "pine forest", "salt flats", "vineyards", "peat bogs", "sand dunes",
                "a broad floodplain", "orchards", "a rocky plateau"),
    "institution": ("a library", "a seminary", "a market hall", "an observatory", "a hospital",
                    "a guild house",
                    "a museum", "a botanical garden", "a music school", "a printing house", "an orphanage",
                    "a weather station", "a public bath", "a folk high school"),
    "disaster": ("a flood", "a fire", "an outbreak of fever", "a long drought", "a border dispute",
                 "a harsh winter", "an earthquake", "a failed harvest", "a collapse in grain prices",
                 "a landslide"),
    "profession": ("surveyor", "botanist", "merchant", "cartographer", "engineer", "teacher", "physician",
                   "composer", "potter", "astronomer", "printer", "archivist", "shipwright", "painter",
                   "mathematician", "bookbinder", "midwife", "architect"),
    "food": ("barley bread", "smoked trout", "plum dumplings", "lentil stew", "honey cakes",
             "pickled cabbage",
             "goat cheese", "roasted chestnuts", "buckwheat porridge", "apple cider", "walnut pastries"),
    "animal": ("heron", "otter", "harrier", "deer", "badger", "kingfisher", "lynx", "stork", "salamander",
               "dormouse", "warbler", "beetle", "moth", "newt", "bat", "finch"),
    "habitat": ("damp meadows", "rocky slopes", "slow rivers", "old beech woods", "reed beds",
                "alpine pastures",
                "coastal heath", "limestone caves", "hedgerows", "sunny scree"),
    "diet": ("seeds", "small insects", "snails", "berries", "fish", "worms", "leaf buds", "nectar",
             "spiders"),
    "body": ("a long curved bill", "pale striped flanks", "short rounded wings", "a forked tail",
             "a dark mask across the eyes", "bright orange feet", "a crest of stiff feathers",
             "a speckled back",
             "a white throat patch", "unusually long hind legs"),
    "quality": ("durability", "clear tone", "light weight", "resistance to damp", "low cost",
                "ease of repair",
                "precision", "warm colour", "fine finish"),
    "verb": ("expanded", "declined", "recovered", "changed hands", "grew rapidly", "stagnated",
             "was rebuilt", "was reorganised"),
    "trend": ("fell sharply", "recovered slowly", "stayed stable", "rose steadily", "nearly halved"),
    "meaning": ("ford", "clearing", "salt spring", "grey stone", "bend in the river", "high pasture",
                "meeting place", "willow", "watchtower", "black earth"),
    "language": ("Old Norse", "a local dialect", "Latin", "an older form of the regional language",
                 "the speech of early settlers"),
    "agent": ("the council", "a group of merchants", "the regional government", "local volunteers",
              "the parish", "a private foundation", "the guild", "a visiting engineer", "the university"),
    "action": ("opened", "restored", "closed", "funded", "surveyed", "rebuilt", "documented", "expanded",
               "moved", "modernised"),
    "site": ("the old mill", "the harbour wall", "the town archive", "the covered market", "the main bridge",
             "the quarry road", "the school on the hill", "the pumping station", "the east gate",
             "the granary"),
    "deed": ("mapped {feature} near the town", "founded {institution}", "wrote a history of the region",
             "designed the new bridge", "collected local songs", "improved the methods of {trade}",
             "taught at the village school for forty years", "catalogued the plants of {habitat}",
             "kept a daily weather diary", "campaigned for a railway connection"),
    "tool": ("a wooden mallet", "a bone folder", "a set of fine chisels", "a treadle wheel", "a brass gauge",
             "a hand loom", "a flat iron", "a hooked knife", "tongs", "a clay mould"),
    "style": ("a plain style with little ornament", "a style with dense geometric patterns",
              "a style favouring bright contrasting colours", "a style that imitates plant forms",
              "a style known for its thin, light pieces", "a heavy, robust style for everyday use"),
}

_ETYMOLOGY = (
    "The name {name} is [thought|said|believed] to come from a word in {language} meaning {meaning}.",
    "Older documents spell the name in several ways, [including|among them] {variant}.",
    "A popular story links the name to a {profession} called {variant}, but historians [doubt|question] it.",
)

_ENCYCLOPEDIA = {
    "town": {
        "title": "{name}",
        "intro": ("{name} is a {adj} town in the {direction} of {region}, [known|noted] for its {trade}.",
                  ("{name} is a [small|market] town in {region}, set among {feature} on the banks of the "
                  "{river}.")),
        "sections": {
            "History": (
                ("The first written mention of {name} dates from {year1}, when it was a village of {trade} "
                "families."),
                ("In {year2} the town [suffered|was struck by] {disaster}, and [about a third|nearly half] "
                 "of the houses had to be rebuilt."),
                "During the {century} century the town {verb}, and {trade} [shaped|dominated] its fortunes.",
                "A charter granted in {year2} [allowed|permitted] {name} to hold a weekly market.",
                "Records from {year3} count {pop_old} inhabitants, most of them working in {trade}.",
                "The old town walls of {stone} were pulled down in {year3} to make room for new streets.",
                "After {disaster} the council founded {institution} that [still exists|is still open] today.",
                "For a time the town belonged to the lords of {other}, who taxed its {trade} heavily.",
            ),
            "Geography": (
                ("The town lies at an elevation of {elev} metres, [surrounded by|between] {feature} and "
                "{feature2}."),
                "The {river} runs through the centre and is crossed by {bridges} bridges.",
                "Winters are [mild|cold|wet] and most rain falls in {season}.",
                "The municipality covers {area} square kilometres.",
                "To the {direction} the land rises towards {feature}.",
                "The nearest larger town, {other}, is {distance} kilometres away.",
                "[Several|Two|Three] hamlets belong to the municipality, the largest of them {variant}.",
            ),
            "Economy": (
                "Today about {share} percent of the workforce is employed in {trade}.",
                "A cooperative founded in {year3} still buys most of the {trade} produced in the area.",
                "Tourism has grown since the opening of {institution} near the main square.",
                "The town is also known for {food}, sold at the {season} fair.",
                "Besides {trade}, people earn a living from {trade2} and {trade3}.",
                "Unemployment stands at about {small} percent, [below|close to] the regional average.",
                "A weekly market is held every {weekday}.",
            ),
            "Culture": (
                ("Each {season} the town holds a festival [in honour of|for] its patron, with music and "
                 "{food}."),
                "The parish church, built of {stone}, has a tower painted {colour}.",
                "{person}, a {profession} born in {name}, is remembered with a statue in the square.",
                "Local dialect has its own words for the tools of {trade}.",
                "The town museum keeps a collection of {trade} tools and old maps of {region}.",
                "A choir founded in {year3} still rehearses in the old school building.",
            ),
            "Transport": (
                "A railway line reached {name} in {year3}, [linking it to|connecting it with] {other}.",
                "Buses run to {other} [every hour|twice an hour|every two hours].",
                "The old towpath along the {river} is now a cycle route.",
                "A ferry across the {river} operated until the first bridge opened.",
            ),
        },
        "lists": ("Timeline", "Notable people"),
    },
    "species": {
        "title": "{name} {animal}",
        "intro": ("The {name} {animal} is a species found in {habitat} of {region}.",
                  ("The {name} {animal} is a [small|shy|little-studied] animal of {habitat}, first described "
                   "in {year2}.")),
        "sections": {
            "Description": (
                "Adults measure about {size} centimetres and weigh around {weight} grams.",
                "It is [easily|readily] told apart from its relatives by {body} and {body2}.",
                "Its colouring is mostly {colour}, turning {colour2} in {season}.",
                "Young animals are duller and lack {body}.",
                "Males and females look alike, although males are [slightly|a little] larger.",
                "Individuals in the {direction} of the range tend to be darker.",
            ),
            "Habitat and range": (
                "It prefers {habitat}, usually below {elev} metres.",
                "Its range stretches from the {direction} of {region} to the valley of the {river}.",
                "Populations are densest near {feature}, where food is plentiful.",
                "In {season} some individuals move towards {habitat2}.",
                "It is absent from {feature}, [probably|perhaps] because the ground is too dry.",
            ),
            "Behaviour": (
                "It feeds mainly on {diet}, adding {diet2} when these are scarce.",
                "Pairs form in early {season} and raise {clutch} young a year.",
                "It is most active at [dawn and dusk|night|midday] and rests in dense cover otherwise.",
                "Its call is a short repeated note that carries a long way over open ground.",
                "Individuals defend territories of roughly {territory} hectares.",
                "Young animals leave their parents after about {weeks} weeks.",
            ),
            "Conservation": (
                "Surveys in {year3} estimated around {population} breeding pairs.",
                "Numbers {trend} after {disaster} damaged much of its habitat.",
                "Protection of {habitat} has helped local populations to recover.",
                "The species is monitored by volunteers who count it every {season}.",
                "Road traffic and drained wetlands are the [main|most serious] threats.",
            ),
            "Taxonomy": (
                "It was first described by the {profession} {person} in {year2}.",
                "Its closest relative is the {other} {animal}, from which it separated long ago.",
                "[Two|Three] subspecies are recognised, differing mainly in size.",
            ),
        },
        "lists": ("Survey records", "Museum specimens"),
    },
    "craft": {
        "title": "{name} {trade}",
        "intro": ("{name} {trade} is a traditional [technique|form] of {trade} from {region}.",
                  ("The {name} method is a style of {trade} that developed in {region} in the {century} "
                  "century.")),
        "sections": {
            "Origins": (
                "The technique is said to have been brought to {region} by a {profession} in {year1}.",
                "Early workshops clustered near the {river}, which supplied water and transport.",
                "A guild regulating the craft was formed in {year2} and set rules for apprentices.",
                "By {year3} more than {workshops} workshops were active.",
                "The oldest surviving piece, kept in {other}, dates from about {year2}.",
            ),
            "Materials and method": (
                "The craft relies on {material}, chosen for its {quality}.",
                "Work begins with careful preparation of the {material2}, which can take {days} days.",
                "A finished piece [typically|usually] passes through {steps} separate stages.",
                "Pieces are often finished in {colour}, a colour linked with the region.",
                "Apprentices spend about {years} years learning the basic steps.",
                "Makers judge the work by eye and by touch rather than with measuring tools.",
            ),
            "Tools": (
                "The most characteristic tool is {tool}, often handed down within a family.",
                "Besides {tool}, most workshops keep {tool2} and {tool3}.",
                "Tools were traditionally made by the makers themselves from {toolstuff}.",
            ),
            "Styles": (
                "Workshops in {name} developed {style}.",
                "Workshops near {other} preferred {style}.",
                "Collectors value old pieces for their {quality} and {quality2}.",
            ),
            "Decline and revival": (
                "Cheaper factory goods caused the craft to decline after {year3}.",
                "A revival began when {institution} started offering courses.",
                "Today about {workshops2} workshops continue the tradition.",
                "A yearly fair in {season} brings makers and buyers together.",
            ),
        },
        "lists": ("Timeline", "Notable makers"),
    },
}

_TIMELINE = {
    "town": ("{agent} {action} {site}", "{disaster} damaged {site}", "{agent} founded {institution}",
             "a new road to {other} was opened", "the population passed {count}",
             ("{site} was [sold|leased] to "
             "{agent}")),
    "craft": ("{agent} {action} the workshop street", "a price list for {trade} was fixed by the guild",
              "an exhibition of {trade} was held in {other}", "the first school for {trade} opened",
              "{count} pieces were exported to {other}", "a new kind of {material} came into use"),
    "species": ("a survey near {feature} counted {count} individuals",
                ("{agent} protected {count} hectares of "
                "{habitat}"), "a nesting site in {habitat} was [destroyed|lost] to building work",
                "{agent} began yearly counts", "the first photographs of the species were published"),
}
_ENCYCLOPEDIA_LINKS = ("See also: {other}; {region}; {trade}.",
                       "Related articles: {other}, history of {region}.")


def _person(rng: random.Random) -> str:
    return f"{_name(rng, 2)} {_name(rng, 3)}"


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _list_entry(rng: random.Random, slots: _Slots, kind: str, heading: str, years) -> str:
    if heading in ("Timeline", "Survey records"):
        return f"{next(years, 2024)}: {slots.fill(rng.choice(_TIMELINE[kind]))}."
    if heading == "Museum specimens":
        return (f"Specimen {rng.choice('ABCDEFGHKM')}-{rng.randint(100, 9999)}: "
                f"{rng.choice(('an adult male', 'an adult female', 'a juvenile'))} collected near "
                f"{rng.choice(_TEXT_SLOTS['feature'])} in {next(years, 2024)} by {_person(rng)}, "
                f"{rng.randint(5, 80)} cm long.")
    born = rng.randint(1500, 1930)
    return (f"{_person(rng)} ({born}–{born + rng.randint(30, 90)}), "
            f"{_article(rng.choice(_TEXT_SLOTS['profession']))} who "
            f"{slots.format(rng.choice(_TEXT_SLOTS['deed']))}.")


def _encyclopedia_doc(rng: random.Random, index: int, target: int) -> str:
    kind = ("town", "species", "craft")[index % 3]
    spec = _ENCYCLOPEDIA[kind]
    year1 = rng.randint(900, 1500)
    year2 = rng.randint(year1 + 20, 1750)
    year3 = rng.randint(year2 + 20, 1990)
    # Facts are drawn once per article, so a number mentioned twice agrees with itself.
    fixed: dict[str, object] = {
        "name": _name(rng), "region": _name(rng), "river": _name(rng, 2), "person": _person(rng),
        "other": _name(rng), "variant": _name(rng), "year1": year1, "year2": year2, "year3": year3,
        "century": f"{(year2 // 100) + 1}th", "pop_old": f"{rng.randint(300, 9000):,}",
        "elev": rng.randint(40, 1800), "bridges": rng.randint(2, 9), "area": f"{rng.uniform(4, 180):.1f}",
        "share": rng.randint(8, 45), "size": rng.randint(8, 70), "weight": rng.randint(12, 2400),
        "clutch": rng.randint(2, 7), "territory": rng.randint(1, 40),
        "population": f"{rng.randint(80, 20000):,}",
        "workshops": rng.randint(20, 140), "workshops2": rng.randint(3, 19), "days": rng.randint(2, 30),
        "steps": rng.randint(4, 12), "years": rng.randint(2, 7), "distance": rng.randint(6, 90),
        "small": rng.randint(2, 11), "weeks": rng.randint(3, 14),
        "weekday": rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")),
        "animal": rng.choice(_TEXT_SLOTS["animal"]), "trade": rng.choice(_TEXT_SLOTS["trade"]),
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
    return (f"Solve {a}x {'+' if b > 0 else '−'} {abs(b)} = {c} for x.",
            [f"{'Subtract' if b > 0 else 'Add'} {abs(b)} on both sides: {a}x = {c - b}.",
             f"Divide both sides by {a}: x = {c - b} / {a} = {x}.",
             (f"Check: {a} × {_par(x)} = {a * x}, and {a * x} {'+' if b > 0 else '−'} {abs(b)} = {c}, as "
             "required.")], f"x = {x}")


def _p_discount(r: random.Random) -> tuple[str, list[str], str]:
    price, pct = r.randint(12, 480), r.choice((5, 10, 15, 20, 25, 30, 40))
    off = Fraction(price * pct, 100)
    final = price - off
    item = r.choice(("jacket", "kettle", "bicycle lamp", "pair of boots", "desk chair", "tent", "backpack"))
    return (f"A {item} costs {price} euros and is sold at {pct}% off. What is the sale price?",
            [f"The discount is {pct}% of {price}, that is {price} × {pct} / 100 = {float(off):.2f} euros.",
             f"Subtract it from the original price: {price} − {float(off):.2f} = {float(final):.2f}."],
            f"{float(final):.2f} euros")


def _p_rectangle(r: random.Random) -> tuple[str, list[str], str]:
    w, h = r.randint(3, 40), r.randint(3, 40)
    thing = r.choice(("garden bed", "classroom floor", "poster", "field", "tablecloth", "balcony"))
    return (f"A rectangular {thing} measures {w} m by {h} m. Find its area and its perimeter.",
            [f"Area is length times width: {w} × {h} = {w * h} square metres.",
             f"Perimeter is twice the sum of the sides: 2 × ({w} + {h}) = {2 * (w + h)} metres."],
            f"area {w * h} m², perimeter {2 * (w + h)} m")


def _p_average(r: random.Random) -> tuple[str, list[str], str]:
    values = [r.randint(40, 100) for _ in range(r.randint(4, 7))]
    total = sum(values)
    mean = Fraction(total, len(values))
    who = r.choice(("A student scored", "A runner logged", "A shop sold", "A weather station recorded"))
    unit = {"A student scored": "points in each test", "A runner logged": "minutes on each run",
            "A shop sold": "loaves on each day",
            "A weather station recorded": "millimetres of rain each week"}[who]
    return (f"{who} {', '.join(map(str, values))} {unit}. What is the mean?",
            [f"Add the values: {' + '.join(map(str, values))} = {total}.",
             f"Divide by the number of values, {len(values)}: {total} / {len(values)} = {float(mean):.2f}."],
            f"{float(mean):.2f}")


def _p_series(r: random.Random) -> tuple[str, list[str], str]:
    a, d, n = r.randint(1, 15), r.randint(1, 9), r.randint(5, 30)
    last = a + (n - 1) * d
    total = n * (a + last) // 2
    return (f"Find the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...",
            [f"The common difference is {d}, so the {n}th term is {a} + ({n} − 1) × {d} = {last}.",
             f"The sum is n times the mean of the first and last terms: {n} × ({a} + {last}) / 2 = {total}."],
            f"{total}")


def _decimal(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.2f}"


def _p_speed(r: random.Random) -> tuple[str, list[str], str]:
    speed, minutes = r.choice((30, 40, 45, 48, 60, 72, 80, 90)), r.choice((20, 30, 45, 50, 75, 90, 105, 150))
    hours = Fraction(minutes, 60)
    dist = speed * hours
    who = r.choice(("A train", "A cyclist", "A ferry", "A delivery van", "A bus"))
    return (f"{who} travels at a steady {speed} km/h for {minutes} minutes. How far does it go?",
            [f"Convert the time to hours: {minutes} / 60 = {hours} h.",
             f"Distance is speed times time: {speed} × {hours} = {_decimal(dist)} km."
             + ("" if dist.denominator == 1 else " (rounded to two decimals)")],
            f"{_decimal(dist)} km")


def _p_interest(r: random.Random) -> tuple[str, list[str], str]:
    principal, rate, years = r.randint(5, 80) * 100, r.choice((2, 3, 4, 5, 6)), r.randint(2, 5)
    amount = principal
    steps = []
    for year in range(1, years + 1):
        new = round(amount * (1 + rate / 100), 2)
        steps.append(f"After year {year}: {amount:.2f} × {1 + rate / 100:.2f} = {new:.2f}.")
        amount = new
    return ((f"{principal} euros are invested at {rate}% interest compounded yearly. "
            f"How much is there after {years} years?"),
            ["Each year the balance is multiplied by 1 plus the rate.", *steps,
             "Amounts are rounded to the cent each year, as a bank would."], f"{amount:.2f} euros")


def _p_ratio(r: random.Random) -> tuple[str, list[str], str]:
    p, q = r.randint(1, 7), r.randint(1, 7)
    unit = r.randint(3, 40)
    total = (p + q) * unit
    names = r.sample(("Ana", "Bo", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun"), 2)
    return (f"{names[0]} and {names[1]} share {total} marbles in the ratio {p}:{q}. How many does each get?",
            [f"The ratio has {p} + {q} = {p + q} parts.",
             f"One part is {total} / {p + q} = {unit} marbles.",
             f"{names[0]} gets {p} × {unit} = {p * unit} and {names[1]} gets {q} × {unit} = {q * unit}."],
            f"{names[0]} {p * unit}, {names[1]} {q * unit}")


def _p_pythagoras(r: random.Random) -> tuple[str, list[str], str]:
    a, b, c = r.choice(((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29)))
    k = r.randint(1, 6)
    a, b, c = a * k, b * k, c * k
    return (f"A ladder reaches {b} m up a wall and its foot stands {a} m from the wall. How long is it?",
            ["The wall, the ground and the ladder form a right triangle with the ladder as hypotenuse.",
             f"Square the two legs: {a}² = {a * a} and {b}² = {b * b}.",
             f"Add them: {a * a} + {b * b} = {c * c}, and the square root of {c * c} is {c}."], f"{c} m")


def _p_fractions(r: random.Random) -> tuple[str, list[str], str]:
    x = y = Fraction(1)
    while x.denominator == 1 or y.denominator == 1:
        x, y = Fraction(r.randint(1, 9), r.randint(2, 12)), Fraction(r.randint(1, 9), r.randint(2, 12))
    lcm = x.denominator * y.denominator // math.gcd(x.denominator, y.denominator)
    nx, ny = x.numerator * (lcm // x.denominator), y.numerator * (lcm // y.denominator)
    total = x + y
    last = f"which simplifies to {total}" if total.denominator != lcm else "which is already in lowest terms"
    return (f"Compute {x} + {y} and simplify.",
            [f"The least common denominator is {lcm}.", f"Rewrite: {x} = {nx}/{lcm} and {y} = {ny}/{lcm}.",
             f"Add the numerators: {nx} + {ny} = {nx + ny}, giving {nx + ny}/{lcm}, {last}."], f"{total}")


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
    return ((f"Solve the system {_term(a, 'x', True)} {_term(b, 'y')} = {e} and "
            f"{_term(c, 'x', True)} {_term(d, 'y')} = {f}."),
            [(f"The determinant is {a} × {_par(d)} − {b} × {c} = {det}, which is not zero, so there is "
              "exactly one solution."),
             f"By Cramer's rule, x = ({_par(e)} × {_par(d)} − {b} × {_par(f)}) / {_par(det)} = {x},",
             f"and y = ({a} × {_par(f)} − {_par(e)} × {c}) / {_par(det)} = {y}.",
             f"Check in the first equation: {a} × {_par(x)} + {b} × {_par(y)} = {e}."], f"x = {x}, y = {y}")


def _p_probability(r: random.Random) -> tuple[str, list[str], str]:
    red, blue, green = r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)
    total = red + blue + green
    colour, count = r.choice((("red", red), ("blue", blue), ("green", green)))
    p = Fraction(count, total)
    return ((f"A bag holds {red} red, {blue} blue and {green} green marbles. One is drawn at random. "
            f"What is the probability that it is {colour}?"),
            [f"There are {red} + {blue} + {green} = {total} marbles, each equally likely.",
             f"{count} of them are {colour}, so the probability is {count}/{total}"
             + (f", which simplifies to {p}." if p.denominator != total else ".")],
            f"{p} (about {float(p):.3f})")


def _p_gcd(r: random.Random) -> tuple[str, list[str], str]:
    g = r.randint(2, 12)
    a, b = g * r.randint(2, 15), g * r.randint(2, 15)
    gcd = math.gcd(a, b)
    lcm = a * b // gcd
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} × {y} + {x % y}.")
        x, y = y, x % y
    return (f"Find the greatest common divisor and the least common multiple of {a} and {b}.",
            ["Use the Euclidean algorithm.", *steps, f"The last non-zero remainder is {gcd}.",
             f"The least common multiple is {a} × {b} / {gcd} = {lcm}."], f"gcd {gcd}, lcm {lcm}")


def _p_units(r: random.Random) -> tuple[str, list[str], str]:
    litres, cups = r.randint(2, 30), r.choice((150, 200, 250, 300))
    total_ml = litres * 1000
    full, rest = divmod(total_ml, cups)
    return (f"How many {cups} ml cups can be filled from {litres} litres of soup, and how much is left?",
            [f"Convert litres to millilitres: {litres} × 1000 = {total_ml} ml.",
             f"Divide by the cup size: {total_ml} / {cups} = {full} remainder {rest}."],
            f"{full} cups, {rest} ml left")


_PROBLEMS: tuple[Callable[[random.Random], tuple[str, list[str], str]], ...] = (
    _p_linear, _p_discount, _p_rectangle, _p_average, _p_series, _p_speed, _p_interest, _p_ratio,
    _p_pythagoras, _p_fractions, _p_system, _p_probability, _p_gcd, _p_units,
)
_MATH_TITLES = ("Worked problems, set {n}", "Practice sheet {n}: mixed exercises", "Homework solutions {n}",
                "Exercise collection {n} with full solutions", "Revision problems {n}")
_MATH_LEADS = ("Solution.", "Working:", "Step by step:", "How to solve it:")


def _math_doc(rng: random.Random, index: int, target: int) -> str:
    title = rng.choice(_MATH_TITLES).format(n=index + 1)
    blocks, count, number = [], _words(title), 1
    while count < target:
        statement, steps, result = rng.choice(_PROBLEMS)(rng)
        block = (f"Problem {number}. {statement}\n{rng.choice(_MATH_LEADS)} " + " ".join(steps)
                 + f"\nAnswer: {result}.")
        if count + _words(block) > MAX_DOC_WORDS and count >= MIN_DOC_WORDS:
            break
        blocks.append(block)
        count += _words(block)
        number += 1
    return title + "\n\n" + "\n\n".join(blocks) + "\n"


_DIALOGUE_TOPICS = {
    "a train journey": (
        "[Do you know|Any idea] when the next train to {place} leaves?",
        "There is one at {time}, but it stops [everywhere|at every village]. The express goes at {time2}.",
        "How long does the express take?",
        "About {num} minutes, [if nothing goes wrong at the junction|unless there are works on the line].",
        "Should we book seats, or is it usually quiet on a {day}?",
        "On a {day} it is often full after the first stop, so I would book.",
        "The ticket machine [only takes cards|does not give change], by the way.",
        "Platform {small} is at the far end, so let us leave a few minutes early.",
        "If we miss it, the next one is not until after {time3}.",
    ),
    "a garden": (
        "The {plant} by the fence looks [tired|a bit sad]. Did you water it this week?",
        "Only once, on {day}. The soil dries out fast on that side.",
        "Maybe we should move it somewhere with more [shade|shelter from the wind].",
        "We could put it next to the {plant2}; they like similar conditions.",
        "I counted {num} tomatoes ripening this morning.",
        "Then we [will need|ought] to pick them before the weekend, or the birds will get there first.",
        "The compost heap needs turning as well.",
        "I bought {small} bags of mulch. That should cover the [front beds|beds by the path].",
    ),
    "a software bug": (
        "The import job failed again last night around {time}.",
        "Same error as before, or something new?",
        "It says the file has an invalid line, line {num} I think.",
        "Then the parser should skip it and log the reason, not stop the whole run.",
        "Agreed. I will add a test with a broken line in the middle of the file.",
        "Can you also check what happens with an empty file?",
        "Good point. Last time an empty file produced a row with no content.",
        "Let us review the change together on {day} before we merge it.",
        "I will rerun the job on [yesterday's|last week's] data to make sure the counts match.",
    ),
    "cooking dinner": (
        "What should we make tonight? We still have {food} from yesterday.",
        "I could do a [soup|stir-fry|gratin] with the leftover vegetables and serve the {food} on the side.",
        "How long would that take?",
        "Around {num} minutes, most of it [simmering|in the oven].",
        "Do we have enough onions?",
        "There are {small} left, which is just enough.",
        "I will set the table and slice the bread.",
        "Remind me to buy more [rice|flour|olive oil] when we go shopping on {day}.",
    ),
    "moving house": (
        "The van is booked for {day} at {time}.",
        "How many boxes do we still need to pack?",
        "I think about {num}, mostly [books and kitchen things|clothes and records].",
        "Let us label every box with the room it goes to.",
        "The new flat is on the {floor} floor. Is there a lift?",
        "Yes, but it is small, so the sofa will have to go up the stairs.",
        "I asked {name} to help carry the heavy pieces.",
        "We should read the meters on the last day and take photos of them.",
    ),
    "a museum visit": (
        "The museum near {place} has a new exhibition on [old maps|early photography|clocks].",
        "Is it open on {day}s?",
        "Every day except public holidays, from ten until {time}.",
        "Tickets are {small} euros each, cheaper for students.",
        "I would like to see the room with the ship models too.",
        "Then we need at least {num} minutes there; it is a big room.",
        "Let us have lunch in the café afterwards.",
        "I read that the guided tour starts at {time2}.",
    ),
    "repairing a bicycle": (
        "My back tyre went flat again on the way to {place}.",
        "Did you find what punctured it?",
        "A small piece of [glass|wire|flint], stuck in the tread.",
        "Then patch the tube and run your fingers around the inside of the tyre before refitting it.",
        "The brakes also squeal when I stop quickly.",
        "That is usually dirt on the rims. Clean them and check the pads for wear.",
        "The chain could use some oil too; it has been {num} days since I cleaned it.",
        "Bring it over on {day} and we can go through everything.",
    ),
    "planning study time": (
        "The exam is in {num} days and I have not started on [statistics|organic chemistry|contract law].",
        "Split it up: one chapter an evening, and a practice test on {day}.",
        "Which chapter is the hardest, in your experience?",
        "The one near the end, most people say. Do lots of exercises on it.",
        "Should we study together in the library?",
        "Yes, the reading room opens at {time}. Let us meet there.",
        "I will bring my notes from the lectures we both missed.",
        "Let us take a break every hour, or nothing sticks.",
    ),
    "a broken washing machine": (
        "The washing machine stopped halfway through the cycle and the drum is full of water.",
        "Did it show an error code?",
        "It blinks E{small}, whatever that means.",
        "That is usually the pump filter. It is behind the small flap at the bottom.",
        "Should I put towels down first?",
        "Definitely, and a shallow tray. Quite a lot of water comes out.",
        "I found a coin and [a hair clip|two buttons|a sock] in the filter.",
        "Then run an empty cycle at {num} degrees to see if it drains properly now.",
    ),
    "choosing a laptop": (
        "I need a new laptop for work. Any [advice|suggestions]?",
        "What will you mostly use it for?",
        "Spreadsheets, video calls and a bit of photo editing.",
        "Then get at least {small} gigabytes more memory than you think you need.",
        "Is a bigger screen worth the extra weight?",
        "If you carry it every day, I would take the lighter one and use a monitor at the desk.",
        "The shop near {place} has a sale until {day}.",
        "I will go and try the keyboards; that matters more to me than the specifications.",
    ),
    "a hiking route": (
        "I found a route along the ridge, about {num} kilometres in total.",
        "How much climbing is there?",
        "Around {num2}0 metres up at the start, then mostly level.",
        "We should start early; the forecast says [storms|showers|strong wind] in the afternoon.",
        "Is there water along the way?",
        "One spring near the hut, but I would carry {small} litres each anyway.",
        "Let us take the bus at {time} to the trailhead.",
        "And the map, in case the phones lose signal up there.",
    ),
    "a band rehearsal": (
        "Can we move rehearsal to {day}? The room is taken on the usual evening.",
        "Fine with me. Did you finish the new arrangement?",
        "Almost. The bridge is still too long, about {small} bars too many.",
        "Let us try it both ways and record them.",
        "We should also decide the order of the set for the concert.",
        "Open with something fast and keep the slow one for the middle.",
        "I will bring the spare cables; one of mine [crackles|cuts out] now and then.",
        "We start at {time} sharp, please.",
    ),
}
_DIALOGUE_GENERIC = (
    "That sounds reasonable.", "I had not thought of that.", "Let me check and get back to you.",
    "Fine by me.", "Are you sure about that?", "Good, then that is settled.", "I can do that.",
    "Let us not forget about it this time.", "Honestly, I would rather do it earlier.", "Makes sense.",
    "I will write it down so we do not forget.", "Could you remind me tomorrow?",
    "Right, one thing at a time.",
)
_DIALOGUE_SLOTS = {
    "place": ("the coast", "the old town", "the university", "the central station", "the airport",
              "the lake"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "plant": ("rosemary", "lavender", "apple tree", "currant bush", "sunflower", "mint", "rose"),
    "food": ("rice", "roast chicken", "lentils", "potatoes", "pasta", "grilled fish"),
    "floor": ("second", "third", "fourth", "fifth"),
}
_FIRST_NAMES = ("Ana", "Ben", "Carla", "Dev", "Elif", "Finn", "Greta", "Hugo", "Iris", "Jonas", "Kemal",
                "Lena",
                "Mateo", "Nora", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wim",
                "Yara")


def _dialogue_doc(rng: random.Random, index: int, target: int) -> str:
    a, b, c = rng.sample(_FIRST_NAMES, 3)
    topics = list(_DIALOGUE_TOPICS)
    rng.shuffle(topics)
    fixed: dict[str, object] = {
        "time": lambda r: f"{r.randint(6, 21)}:{r.choice(('00', '15', '30', '45'))}",
        "time2": lambda r: f"{r.randint(6, 21)}:{r.choice(('05', '20', '35', '50'))}",
        "time3": lambda r: f"{r.randint(6, 21)}:{r.choice(('10', '25', '40', '55'))}",
        "num": lambda r: r.randint(12, 95), "num2": lambda r: r.randint(20, 90),
        "small": lambda r: r.randint(2, 9),
        "name": c,
        "plant2": lambda r: r.choice(_DIALOGUE_SLOTS["plant"]),
        # What a topic talks about stays the same within a document.
        "food": rng.choice(_DIALOGUE_SLOTS["food"]), "place": rng.choice(_DIALOGUE_SLOTS["place"]),
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
    return {"id": row_id, "source": "bad-inputs-synth", "task": "vqa" if media else "conversation",
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": text_a}]}


def _bad_files(bad: Path, videos: list[Path], images: list[Path], overwrite: bool) -> dict[str, Path]:
    """The bad inputs (see BAD_DEFECTS); media paths relative to `bad`, as every JSONL names them."""
    video = ("video", _rel(videos[0], bad)) if videos else None
    image = ("image", _rel(images[0], bad)) if images else None
    some = video or image
    out: dict[str, Path] = {}

    def dump(row: dict) -> bytes:
        return json.dumps(row, ensure_ascii=False).encode("utf-8")

    lines = [
        dump(_simple("What colour is the sky on a clear day?", "Blue, because air scatters short wavelengths "
                     "of sunlight more than long ones.", row_id="broken-1")),
        dump(_simple("Describe the clip briefly.", "A short synthetic test clip.", video, "broken-2")),
        (b'{"id": "broken-3", "source": "bad-inputs-synth", "messages": [{"role": "user", "content": '
         b'"this line stops in the middle of a stri'),
        dump(_simple("What is shown here?", "A synthetic test picture.", image, "broken-4")),
        dump(_simple("Name a prime number above ten.", "Eleven is the smallest one.", row_id="broken-5")),
    ]
    out["broken_line"] = bad / "broken_line.jsonl"
    _write_bytes(out["broken_line"], b"\n".join(lines) + b"\n", overwrite)

    # Line 2: a Latin-1 byte, a lead byte before ASCII, a lone continuation byte, a cut-off three-byte
    # sequence and an overlong encoding: none of them is UTF-8.
    invalid = (b'{"id": "utf8-2", "source": "bad-inputs-synth", "messages": [{"role": "user", "content": '
               b'"caf\xe9 and na\xc3ve \x80 \xe2\x82"}, {"role": "assistant", "content": "\xc0\xaf"}]}')
    lines = [
        dump(_simple("Translate 'good morning' into French.", "Bonjour.", row_id="utf8-1")),
        invalid,
        dump(_simple("Write the word caf\u00e9 with its accent.", "caf\u00e9", row_id="utf8-3")),
    ]
    out["invalid_utf8"] = bad / "invalid_utf8.jsonl"
    _write_bytes(out["invalid_utf8"], b"\n".join(lines) + b"\n", overwrite)

    lines = [
        dump(_simple("What happens in this clip?", "It cannot be described: the file is missing.",
                     ("video", "videos/does_not_exist.mp4"), "missing-1")),
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
        dump({"id": "schema-1", "source": "bad-inputs-synth",
              "conversation": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello."}]}),
        dump({"id": "schema-2", "source": "bad-inputs-synth",
              "messages": [{"role": "narrator", "content": "Once upon a time."},
                           {"role": "assistant", "content": "The end."}]}),
        dump({"id": "schema-3", "source": "bad-inputs-synth",
              "messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "Forty-two."}]}),
        dump({"id": "schema-4", "source": "bad-inputs-synth",
              "messages": [{"role": "user", "content": {"text": "an object, not a list"}},
                           {"role": "assistant", "content": "Noted."}]}),
        dump(_simple("How many legs does a spider have?", "Eight.", row_id="schema-5")),
    ]
    out["bad_schema"] = bad / "bad_schema.jsonl"
    _write_bytes(out["bad_schema"], b"\n".join(lines) + b"\n", overwrite)

    text = bad / "text"
    _write_bytes(text / "bad-text-synth" / "invalid_utf8.txt",
                 b"A plain paragraph that starts well.\n\nThen a stray byte \xff appears and the rest "
                 b"cannot be decoded as UTF-8.\n", overwrite)
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
    out: dict[str, Path] = {"conversations": dest / "conversations.jsonl",
                            "captions": dest / "captions.jsonl",
                            "text_dir": dest / "text"}
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
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


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
