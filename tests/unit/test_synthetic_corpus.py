"""The generated sample corpus has the shape, formats, sizes and defects its module docstring claims.

Media only need to exist here (nothing decodes them), so the fixture writes small dummy files under the
sample names, plus one unknown name of each kind to exercise the generic path.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from keyeflow.synthetic import corpus as synthetic_corpus

VIDEO_NAMES = [
    "cuts_640x360_h264_25fps.mp4",
    "static_then_motion_320x240_mpeg4_30fps.avi",
    "pan_1280x720_h264_30fps.mp4",
    "zoom_640x360_h264_60fps.mp4",
    "portrait_360x640_vp9_30fps.webm",
    "wide_840x360_mjpeg_24fps.mkv",
    "life_320x240_h264_12fps.mp4",
    "solid_colors_640x480_mpeg4_25fps.mp4",
    "holiday_clip.mp4",  # unknown: generic conversations
]
IMAGE_NAMES = [
    "gradient_1024x768.jpg",
    "shapes_800x600.png",
    "document_1240x1754.png",
    "bar_chart_900x600.webp",
    "line_chart_3000x600.jpg",
    "large_scene_4800x3600.jpg",
    "small_tall_60x400.png",
    "logo_rgba_512x512.png",
    "icons_palette_256x256.png",
    "exif_rotated_orient6.jpg",
    "grey16_640x480.png",
    "ui_screenshot_1280x800.webp",
    "cmyk_poster_600x800.jpg",
    "animated_200x200.gif",
    "bitmap_128x96.bmp",
    "scan_of_receipt.jpg",  # unknown
]
TASKS = {"caption", "ocr", "grounding", "vqa", "interleaved", "conversation", "temporal"}
CLIP_TIME = re.compile(r"<\|clip_time_start\|>\[(\d+\.\d), (\d+\.\d)\]<\|clip_time_end\|>")
BOX = re.compile(r"<\|box_start\|>\[\[(-?\d+),(-?\d+),(-?\d+),(-?\d+)\]\]<\|box_end\|>")
GROUNDED = re.compile(r"<\|object_ref_start\|>[^<]+<\|object_ref_end\|><\|box_start\|>")
THINK = re.compile(r"^<think>(.+)</think><answer>(.+)</answer>$", re.DOTALL)


def make_media(root: Path) -> tuple[list[Path], list[Path]]:
    videos = [root / "videos" / name for name in VIDEO_NAMES]
    images = [root / "images" / name for name in IMAGE_NAMES]
    for path in videos + images:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"dummy media: " + path.name.encode())
    return videos, images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_root")
    videos, images = make_media(root)
    start = time.monotonic()
    paths = synthetic_corpus.generate_corpus(root / "corpus", videos, images)
    return root, videos, images, paths, time.monotonic() - start


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def media_parts(row: dict) -> list[dict]:
    return [
        part
        for message in row["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] in ("image", "video")
    ]


def check_conversation(row: dict, base: Path) -> None:
    """A valid chat row: roles, content types, media that resolve from `base`, and a trained answer."""
    messages = row["messages"]
    assert isinstance(messages, list) and messages
    roles = [m["role"] for m in messages]
    assert set(roles) <= {"system", "user", "assistant"}
    assert "system" not in roles[1:], "a system message only comes first"
    turns = roles[1:] if roles[0] == "system" else roles
    assert turns[0] == "user" and turns[-1] == "assistant"
    assert all(a != b for a, b in itertools.pairwise(turns)), f"user and assistant alternate: {roles}"
    for message in messages:
        content = message["content"]
        if message["role"] in ("system", "assistant"):
            assert isinstance(content, str) and content.strip()
        elif isinstance(content, list):
            assert content
            for part in content:
                assert part["type"] in ("text", "image", "video")
                if part["type"] == "text":
                    assert isinstance(part["text"], str) and part["text"].strip()
        else:
            assert isinstance(content, str) and content.strip()
    for part in media_parts(row):
        value = part[part["type"]]
        assert isinstance(value, str) and not os.path.isabs(value)
        assert (base / value).is_file(), f"{value} does not resolve from {base}"


def test_generation_is_fast_and_returns_every_key(corpus):
    _, _, _, paths, seconds = corpus
    assert seconds < 3
    expected = {"conversations", "captions", "text_dir"} | {f"bad_{k}" for k in synthetic_corpus.BAD_DEFECTS}
    assert set(paths) == expected
    for key, path in paths.items():
        assert path.exists(), key


def test_conversations_follow_the_schema(corpus):
    _, videos, images, paths, _ = corpus
    rows = read_jsonl(paths["conversations"])
    assert len({row["id"] for row in rows}) == len(rows)
    # Ingestion names samples by content: every conversation must differ from every other.
    assert len({json.dumps(row["messages"], sort_keys=True) for row in rows}) == len(rows)
    base = paths["conversations"].parent
    for row in rows:
        assert set(row) == {"id", "source", "task", "messages"}
        assert row["task"] in TASKS and row["source"].endswith("-synth")
        check_conversation(row, base)
    assert {row["task"] for row in rows} == TASKS
    # Media paths are relative to dest and point at the media beside it.
    used = Counter((base / part[part["type"]]).resolve() for row in rows for part in media_parts(row))
    for path in videos + images:
        assert used[path.resolve()] >= 5, f"{path.name} has only {used[path.resolve()]} conversations"
    assert all(p[p["type"]].startswith("../") for row in rows for p in media_parts(row))


def test_conversation_kinds(corpus):
    _, videos, images, paths, _ = corpus
    rows = read_jsonl(paths["conversations"])
    sources = Counter(row["source"] for row in rows)
    for source in (
        "video-qa-synth",
        "video-caption-synth",
        "image-ocr-synth",
        "image-grounding-synth",
        "image-vqa-synth",
        "multi-image-synth",
    ):
        assert sources[source] >= 3, source
    two_images = [row for row in rows if sum(p["type"] == "image" for p in media_parts(row)) == 2]
    assert len(two_images) >= 3 and all(row["task"] == "interleaved" for row in two_images)
    assert sum(row["messages"][0]["role"] == "system" for row in rows) >= 3
    multi_turn = [row for row in rows if sum(m["role"] == "assistant" for m in row["messages"]) == 2]
    assert len(multi_turn) >= len(images)

    def user_text(row: dict) -> str:
        content = next(m for m in row["messages"] if m["role"] == "user")["content"]
        return "".join(p["text"] for p in content if p["type"] == "text")

    think = [row for row in rows if user_text(row).endswith("/think")]
    no_think = [row for row in rows if user_text(row).endswith("/no_think")]
    assert len(think) >= len(videos) and len(no_think) >= len(videos)
    for row in think:
        match = THINK.match(row["messages"][-1]["content"])
        assert match and match.group(1).strip() and match.group(2).strip()
    for row in rows:
        if row not in think:
            assert "<think>" not in row["messages"][-1]["content"]


def test_temporal_and_grounding_formats(corpus):
    _, _, _, paths, _ = corpus
    rows = read_jsonl(paths["conversations"])
    temporal = [row for row in rows if row["task"] == "temporal"]
    assert temporal
    for row in temporal:
        found = CLIP_TIME.findall(row["messages"][-1]["content"])
        assert found
        for start, end in found:
            assert 0 <= float(start) < float(end) <= 10
    # The cut clip's shots are two seconds each.
    spans = {
        span
        for row in rows
        if "cuts_640x360" in json.dumps(row)
        for span in CLIP_TIME.findall(row["messages"][-1]["content"])
    }
    assert spans <= {("0.0", "2.0"), ("2.0", "4.0"), ("4.0", "6.0"), ("6.0", "8.0")}

    grounding = [row for row in rows if row["task"] == "grounding"]
    assert len(grounding) >= 2 * len(IMAGE_NAMES)
    boxes = 0
    for row in rows:
        text = json.dumps(row["messages"], ensure_ascii=False)
        for box in BOX.findall(text):
            x1, y1, x2, y2 = map(int, box)
            assert 0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000, box
            boxes += 1
    assert boxes >= 2 * len(IMAGE_NAMES)
    assert all(
        GROUNDED.search(row["messages"][-1]["content"]) or "<|box_start|>" in json.dumps(row)
        for row in grounding
    )
    # Boxes come from the drawing coordinates: the shapes picture is 800x600 and its red rectangle is drawn
    # at (60,60)-(300,260); every box given for that picture is one of its drawn shapes.
    assert synthetic_corpus._norm_box((60, 60, 300, 260), (800, 600)) == (75, 100, 375, 433)
    drawn = {
        (75, 100, 375, 433),
        (450, 133, 775, 566),
        (150, 533, 600, 900),
        (650, 666, 950, 933),
        (712, 150, 937, 450),
    }
    shapes = [row for row in rows if "shapes_800x600.png" in json.dumps(row)]
    found = {tuple(map(int, box)) for row in shapes for box in BOX.findall(json.dumps(row["messages"]))}
    assert found and found <= drawn


def test_answer_lengths_vary_finely(corpus):
    _, _, _, paths, _ = corpus
    rows = read_jsonl(paths["conversations"])
    lengths = [len(m["content"].split()) for row in rows for m in row["messages"] if m["role"] == "assistant"]
    assert min(lengths) <= 20 and max(lengths) >= 300
    assert sum(20 <= n <= 400 for n in lengths) >= 0.7 * len(lengths)
    assert len(set(lengths)) >= 80


def test_captions(corpus):
    _, videos, images, paths, _ = corpus
    rows = read_jsonl(paths["captions"])
    base = paths["captions"].parent
    per_media: dict[str, list[str]] = {}
    for row in rows:
        kinds = [k for k in ("image", "video") if k in row]
        assert len(kinds) == 1 and row["source"] == "captions-synth"
        assert isinstance(row["caption"], str) and row["caption"].strip()
        assert (base / row[kinds[0]]).is_file()
        per_media.setdefault(row[kinds[0]], []).append(row["caption"])
    assert len(per_media) == len(videos) + len(images)
    for media, captions in per_media.items():
        wanted = 2 if media.startswith("../videos/") else 3
        assert len(captions) >= wanted, media
        assert len({len(c.split()) for c in captions}) == len(captions), f"{media}: captions of one length"


def test_text_corpora(corpus):
    _, _, _, paths, _ = corpus
    text_dir = paths["text_dir"]
    assert sorted(p.name for p in text_dir.iterdir()) == sorted(synthetic_corpus.TEXT_SOURCES)
    documents = sorted(text_dir.rglob("*.txt"))
    assert len(documents) == 3 * synthetic_corpus.DOCS_PER_SOURCE
    raw = [p.read_bytes() for p in documents]
    texts = [b.decode("utf-8") for b in raw]
    total = sum(map(len, raw))
    assert total >= 400_000, total
    for path, text in zip(documents, texts):
        assert 80 <= len(text.split()) <= 900, (path.name, len(text.split()))
    assert len(set(texts)) == len(texts)
    # Varied, not a template repeated: compresses no better than ~10:1, most sentences are distinct.
    joined = b"".join(raw)
    assert len(zlib.compress(joined, 9)) / len(joined) > 0.1
    sentences = [s for t in texts for s in re.split(r"(?<=[.?!])\s+", t) if s]
    assert len(set(sentences)) / len(sentences) > 0.6
    lengths = [len(t.split()) for t in texts]
    assert max(lengths) - min(lengths) > 600
    math_docs = [t for p, t in zip(documents, texts) if p.parent.name == "math-synth"]
    assert all("Answer:" in t and re.search(r"\d", t) for t in math_docs)


def test_math_problems_are_right():
    rng = synthetic_corpus._rng(0, "test-math")
    for _ in range(200):
        statement, _, answer = synthetic_corpus._p_linear(rng)
        a, sign, b, c = re.match(r"Solve (\d+)x ([+−]) (\d+) = (-?\d+) for x\.", statement).groups()
        x = int(answer.removeprefix("x = "))
        assert int(a) * x + (int(b) if sign == "+" else -int(b)) == int(c)
    for _ in range(200):
        statement, _, answer = synthetic_corpus._p_system(rng)
        if "system" not in statement:
            continue
        x, y = map(int, re.match(r"x = (-?\d+), y = (-?\d+)", answer).groups())
        equations = re.findall(r"(−?)(\d*)x ([+−]) (\d*)y = (-?\d+)", statement)
        assert len(equations) == 2, statement
        for sign_a, a, sign_b, b, rhs in equations:
            a = (-1 if sign_a else 1) * int(a or 1)
            b = (-1 if sign_b == "−" else 1) * int(b or 1)
            assert a * x + b * y == int(rhs), statement


def test_deterministic_and_keeps_existing_files(tmp_path):
    outputs = []
    for name in ("a", "b"):
        videos, images = make_media(tmp_path / name)
        dest = tmp_path / name / "corpus"
        synthetic_corpus.generate_corpus(dest, videos, images, seed=3)
        outputs.append({p.relative_to(dest): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1]

    dest = tmp_path / "a" / "corpus"
    conversations = dest / "conversations.jsonl"
    conversations.write_text("edited\n")
    videos, images = make_media(tmp_path / "a")
    synthetic_corpus.generate_corpus(dest, videos, images, seed=3)
    assert conversations.read_text() == "edited\n"
    synthetic_corpus.generate_corpus(dest, videos, images, seed=3, overwrite=True)
    assert conversations.read_bytes() == outputs[0][Path("conversations.jsonl")]

    other = tmp_path / "c" / "corpus"
    videos, images = make_media(tmp_path / "c")
    synthetic_corpus.generate_corpus(other, videos, images, seed=4)
    assert (other / "conversations.jsonl").read_bytes() != outputs[0][Path("conversations.jsonl")]
    assert not list(tmp_path.rglob("*.partial"))


def jsonl_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def check_good_lines(key: str, path: Path) -> list[bytes]:
    lines = jsonl_lines(path)
    bad_numbers = set(synthetic_corpus.BAD_DEFECTS[key])
    for number, line in enumerate(lines, start=1):
        if number not in bad_numbers:
            check_conversation(json.loads(line.decode("utf-8")), path.parent)
    return lines


def test_bad_broken_line(corpus):
    _, _, _, paths, _ = corpus
    lines = check_good_lines("broken_line", paths["bad_broken_line"])
    assert len(lines) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[2].decode("utf-8"))
    good = [json.loads(line) for i, line in enumerate(lines) if i != 2]
    assert sum(bool(media_parts(row)) for row in good) >= 1  # the good lines include media that resolve


def test_bad_invalid_utf8(corpus):
    _, _, _, paths, _ = corpus
    lines = check_good_lines("invalid_utf8", paths["bad_invalid_utf8"])
    assert len(lines) == 3
    with pytest.raises(UnicodeDecodeError):
        lines[1].decode("utf-8")
    json.loads(lines[1].decode("utf-8", errors="replace"))  # only the encoding is wrong, not the JSON
    with pytest.raises(UnicodeDecodeError):
        paths["bad_invalid_utf8"].read_bytes().decode("utf-8")


def test_bad_missing_media(corpus):
    _, _, _, paths, _ = corpus
    path = paths["bad_missing_media"]
    lines = check_good_lines("missing_media", path)
    assert len(lines) == 2
    (part,) = media_parts(json.loads(lines[0]))
    assert part["video"] == "videos/does_not_exist.mp4"
    assert not (path.parent / part["video"]).exists()


def test_bad_outside_root(corpus):
    root, _, _, paths, _ = corpus
    path = paths["bad_outside_root"]
    lines = check_good_lines("outside_root", path)
    assert len(lines) == 3
    (climb,) = media_parts(json.loads(lines[0]))
    assert climb["image"].startswith("../") and climb["image"].endswith("etc/passwd")
    resolved = Path(os.path.normpath(path.parent / climb["image"]))
    assert resolved == Path("/etc/passwd")
    assert not resolved.is_relative_to(root)
    (absolute,) = media_parts(json.loads(lines[1]))
    assert absolute["image"] == "/etc/hostname"
    # The valid line's media stays inside the common root of corpus and media.
    (inside,) = media_parts(json.loads(lines[2]))
    assert (path.parent / inside[inside["type"]]).resolve().is_relative_to(root.resolve())


def test_bad_schema(corpus):
    _, _, _, paths, _ = corpus
    lines = check_good_lines("bad_schema", paths["bad_bad_schema"])
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 5
    assert "messages" not in rows[0]
    assert rows[1]["messages"][0]["role"] not in ("system", "user", "assistant")
    assert isinstance(rows[2]["messages"][0]["content"], int)
    assert isinstance(rows[3]["messages"][0]["content"], dict)
    for row in rows[:4]:
        with pytest.raises((AssertionError, KeyError, TypeError)):
            check_conversation(row, paths["bad_bad_schema"].parent)


def test_bad_text(corpus):
    _, _, _, paths, _ = corpus
    folder = paths["bad_bad_text"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == sorted(synthetic_corpus.BAD_DEFECTS["bad_text"])
    invalid = folder / "bad-text-synth" / "invalid_utf8.txt"
    with pytest.raises(UnicodeDecodeError):
        invalid.read_bytes().decode("utf-8")
    assert invalid.read_bytes().decode("utf-8", errors="replace").strip()
    assert (folder / "bad-text-synth" / "empty.txt").stat().st_size == 0


def test_main_writes_for_media_folders(tmp_path, capsys):
    videos, images = make_media(tmp_path)
    (tmp_path / "videos" / ".hidden.partial.mp4").write_bytes(b"x")
    code = synthetic_corpus.main([str(tmp_path / "out"), str(tmp_path / "videos"), str(tmp_path / "images")])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{len(videos)} videos, {len(images)} images" in printed
    rows = read_jsonl(tmp_path / "out" / "conversations.jsonl")
    assert not any(".hidden" in json.dumps(row) for row in rows)
    assert (tmp_path / "out" / "bad" / "broken_line.jsonl").exists()
