"""Every reader survives hostile input, record by record, on real files written here: deep nesting, multi-MB
lines, NUL bytes, invalid UTF-8, wrong types, unknown roles, gzip/zstd under plain names, truncated files,
empty files, media references that escape the source root or do not exist, records over a bound. Each bad
record is quarantined with its ``file#Lline`` and a reason; the good records of the same file and batch land
with exact token counts; a rerun neither duplicates nor drops."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from keyeflow.datasets import conversations, images, ingest, tables
from keyeflow.datasets.conversations import SampleConfig
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.model import token_stream
from keyeflow.model.tokenizer import load_tokenizer

PAPER = resolve_config("paper")
IMAGE_CONFIG = ImageConfig(max_tokens=64)
# Small count bounds so that a few lines cross them; the line size and depth bounds keep their defaults,
# crossed by real 9 MiB and 100,000-deep lines.
CONFIG = SampleConfig(
    max_messages=4, max_images_per_record=2, max_videos_per_record=1, max_text_file_bytes=4096
)
KEYEFLOW = str(Path(sys.executable).parent / "keyeflow")


def chat(question: str, answer: str, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        **extra,
    }


def line(row: object) -> bytes:
    return json.dumps(row).encode() + b"\n"


def nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def quarantined(stage: str = conversations.STAGE) -> dict[str, str]:
    rows = tables.open_table("quarantine").to_table().to_pylist()
    found = {r["uri"]: r["reason"] for r in rows if r["stage"] == stage}
    assert len(found) == sum(r["stage"] == stage for r in rows), "one quarantine row per input and stage"
    return found


def samples() -> dict[str, dict]:
    rows = tables.open_table("train_samples").to_table().to_pylist()
    by_uri = {r["source_uri"]: r for r in rows}
    assert len(by_uri) == len(rows), "one sample per source line"
    return by_uri


def conversation_tokens(tok, messages: list[dict], image_tokens: int = 0) -> int:
    return len(
        token_stream.render_conversation(
            tok, messages, lambda part: token_stream.image_ids(tok, image_tokens)
        ).input_ids
    )


@pytest.fixture()
def hostile_corpus(tmp_path) -> dict:
    """A source root whose files mix every hostile kind with good records; returns what each should become."""
    root = tmp_path / "src"
    root.mkdir()
    Image.new("RGB", (112, 84), (200, 30, 60)).save(root / "pic.png")
    Image.new("RGB", (90, 90), (10, 200, 60)).save(tmp_path / "outside.png")
    (root / "escape.png").symlink_to(tmp_path / "outside.png")  # inside the root by name, not by target

    image_part = {"type": "image", "image": "pic.png"}
    good_a = chat("What colour is the sky on a clear day?", "Blue, because of Rayleigh scattering.")
    good_b = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Name a prime number."}]},
            {"role": "assistant", "content": "Seven."},
        ],
        "source": "primes",
        "task": "qa",
    }
    good_depth_64 = chat("Is this nested just enough?", "Yes, 64 levels.", meta=nested(63))
    good_image = {
        "messages": [
            {"role": "user", "content": [image_part, {"type": "text", "text": "Describe the picture."}]},
            {"role": "assistant", "content": "A flat red rectangle."},
        ]
    }
    lines = [
        line(good_a),  # L1
        b"[" * 100_000 + b"]" * 100_000 + b"\n",  # L2: crashed samples-build with RecursionError
        line(chat("x" * (9 << 20), "too long")),  # L3: 9 MiB, over max_line_bytes
        b'{"messages": [\x00]}\n',  # L4: a raw NUL byte
        b'{"messages": "\xff\xfe"}\n',  # L5: invalid UTF-8
        line({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "ok"}]}),  # L6
        line({"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "ok"}]}),
        line({"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}]}),  # L8
        line(chat("a\u0000b", "NUL inside a string")),  # L9: the \u0000 escape
        b'{"messages": ' + b"9" * 5000 + b"}\n",  # L10: an integer Python refuses to convert
        line(good_b),  # L11
        line({"messages": [*good_a["messages"]] * 3}),  # L12: 6 messages, over max_messages 4
        line(good_depth_64),  # L13: exactly max_json_depth
        line(chat("One level too deep?", "Yes.", meta=nested(64))),  # L14
        line(chat("Whose source?", "Nobody's.", source={"a": 1})),  # L15
        line({"image": "../outside.png", "caption": "escapes by ../"}),  # L16
        line({"image": "nope.png", "caption": "does not exist"}),  # L17
        line({"image": "escape.png", "caption": "escapes by a symlink"}),  # L18
        line(good_image),  # L19
        line(  # L20: three images, over max_images_per_record 2
            {
                "messages": [
                    {"role": "user", "content": [image_part, image_part, image_part]},
                    {"role": "assistant", "content": "Three of the same."},
                ]
            }
        ),
        line(  # L21: two videos, over max_videos_per_record 1 (refused before any file is looked at)
            {
                "messages": [
                    {"role": "user", "content": [{"type": "video", "video": f"v{i}.mp4"} for i in (1, 2)]},
                    {"role": "assistant", "content": "Two clips."},
                ]
            }
        ),
        line([1, 2, 3]),  # L22: not an object
        b'{"messages": [{"role": "user", "con',  # L23: cut off, no newline
    ]
    (root / "chat.jsonl").write_bytes(b"".join(lines))

    good_d, good_e = chat("Gzip one?", "Read as text."), chat("Gzip two?", "Also read.")
    (root / "packed.jsonl").write_bytes(gzip.compress(line(good_d) + line(good_e)))
    good_f = chat("Zstandard?", "Decompressed by its magic bytes.")
    with pa.output_stream(str(root / "zpacked.jsonl"), compression="zstd") as out:
        out.write(line(good_f))
    good_g, good_h = chat("Before the cut, first?", "Kept."), chat("Before the cut, second?", "Kept too.")
    tail = line({"noise": os.urandom(150_000).hex()})  # incompressible: the cut falls inside it
    packed = gzip.compress(line(good_g) + line(good_h) + tail)
    (root / "cut.jsonl").write_bytes(packed[: len(packed) - 60_000])
    (root / "empty.jsonl").write_bytes(b"")
    (root / "blank.jsonl").write_bytes(b"\n  \n\r\n")

    docs = root / "docs"
    docs.mkdir()
    doc = "Plain text documents are cut into chunks at paragraph breaks.\n\nThis one has two paragraphs."
    (docs / "doc.txt").write_text(doc)
    doc_gz = "A compressed document under a plain name is read as the text it holds, not refused."
    (docs / "packed.txt").write_bytes(gzip.compress(doc_gz.encode()))
    (docs / "nul.txt").write_bytes(b"text then \x00 binary")
    (docs / "big.txt").write_text("word " * 1000)  # 5,000 bytes, over max_text_file_bytes 4096
    with pa.output_stream(str(docs / "zcut.txt"), compression="zstd") as out:
        out.write(os.urandom(20_000).hex().encode())
    (docs / "zcut.txt").write_bytes((docs / "zcut.txt").read_bytes()[:-5000])

    c, d = root / "chat.jsonl", docs
    bad = {
        f"{c}#L2": "line 2: over the bound max_json_depth: nesting depth 100,000 (limit 64)",
        f"{c}#L3": f"line 3: over the bound max_line_bytes: {len(lines[2]) - 1:,} bytes "
        "(limit 8,388,608 bytes)",
        f"{c}#L4": "line 4: NUL byte at column 15: binary data, not a JSON line",
        f"{c}#L5": "invalid UTF-8 at line 5, byte 14 of the line",
        f"{c}#L6": "line 6: message 0: content must be a string or a list of parts, got int",
        f"{c}#L7": "line 7: message 0: role must be one of ['assistant', 'system', 'user'], got ['user']",
        f"{c}#L8": "line 8: message 0: role must be one of ['assistant', 'system', 'user'], got 'tool'",
        f"{c}#L9": "line 9: NUL character (\\u0000) in a string: binary data, not text",
        f"{c}#L10": "invalid JSON at line 10: Exceeds the limit (4300 digits) for integer string conversion: "
        "value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit",
        f"{c}#L12": "line 12: over the bound max_messages: 6 messages (limit 4)",
        f"{c}#L14": "line 14: over the bound max_json_depth: nesting depth 65 (limit 64)",
        f"{c}#L15": "line 15: 'source' must be a string, got dict",
        f"{c}#L16": f"image path '../outside.png' is outside the source root {root}",
        f"{c}#L17": f"image file 'nope.png' does not exist (looked at {root / 'nope.png'})",
        f"{c}#L18": f"image path 'escape.png' is outside the source root {root}",
        f"{c}#L20": "line 20: over the bound max_images_per_record: 3 images (limit 2)",
        f"{c}#L21": "line 21: over the bound max_videos_per_record: 2 videos (limit 1)",
        f"{c}#L22": "line 22: expected a JSON object, got list",
        f"{c}#L23": "line 23: truncated: the last line has no newline and is not valid JSON "
        "(Unterminated string starting at, column 32)",
        f"{root / 'cut.jsonl'}#L3": "after line 2: truncated or corrupt gzip data: Compressed file ended "
        "before the end-of-stream marker was reached",
        str(root / "empty.jsonl"): "empty file: no records",
        str(root / "blank.jsonl"): "empty file: no records",
        str(d / "nul.txt"): "NUL byte at offset 10: binary data, not text",
        str(d / "big.txt"): "over the bound max_text_file_bytes: 5,000 bytes (limit 4,096 bytes)",
    }
    good = {
        f"{c}#L1": good_a,
        f"{c}#L11": good_b,
        f"{c}#L13": good_depth_64,
        f"{c}#L19": good_image,
        f"{root / 'packed.jsonl'}#L1": good_d,
        f"{root / 'packed.jsonl'}#L2": good_e,
        f"{root / 'zpacked.jsonl'}#L1": good_f,
        f"{root / 'cut.jsonl'}#L1": good_g,
        f"{root / 'cut.jsonl'}#L2": good_h,
        f"{d / 'doc.txt'}#chunk0": doc,
        f"{d / 'packed.txt'}#chunk0": doc_gz,
    }
    return {"root": root, "bad": bad, "good": good, "zcut": str(d / "zcut.txt")}


def test_each_hostile_record_is_quarantined_and_the_good_ones_land_with_exact_tokens(home, hostile_corpus):
    root = hostile_corpus["root"]
    media = conversations.referenced_media([str(root)], str(root), CONFIG)
    assert media == {"video": [], "image": [str(root / "pic.png")]}
    images.ingest_images_shard(media["image"], IMAGE_CONFIG)
    (image_tokens,) = tables.open_table("image_samples").to_table().column("num_tokens").to_pylist()

    report = conversations.build_train_samples([str(root)], str(root), PAPER, IMAGE_CONFIG, CONFIG)

    reasons = quarantined()
    zcut = reasons.pop(hostile_corpus["zcut"])
    assert zcut.startswith("truncated or corrupt zstd data:"), zcut
    assert reasons == hostile_corpus["bad"]
    tok = load_tokenizer()
    landed = samples()
    assert set(landed) == set(hostile_corpus["good"])
    for uri, content in hostile_corpus["good"].items():
        row = landed[uri]
        if isinstance(content, str):
            expected = len(token_stream.render_text(tok, content).input_ids)
        else:
            expected = conversation_tokens(tok, content["messages"], image_tokens)
        assert row["num_tokens"] == expected, uri
    assert landed[f"{root / 'chat.jsonl'}#L19"]["num_vision_tokens"] == token_stream.count_image_tokens(
        image_tokens
    )
    assert landed[f"{root / 'chat.jsonl'}#L11"]["source"] == "primes"
    assert report.num_written == len(hostile_corpus["good"])
    assert report.num_quarantined == len(hostile_corpus["bad"]) + 1

    # A rerun finds every row and every reason already there: nothing written twice, nothing lost.
    versions = {name: tables.ref(name).version for name in ("train_samples", "quarantine")}
    again = conversations.build_train_samples([str(root)], str(root), PAPER, IMAGE_CONFIG, CONFIG)
    assert again.num_written == 0 and again.num_already_present == report.num_written
    assert again.quarantined == report.quarantined
    assert {name: tables.ref(name).version for name in versions} == versions
    assert samples().keys() == landed.keys()


def test_bounds_are_named_settings_with_defaults_and_checked():
    config = SampleConfig()
    assert (config.max_line_bytes, config.max_json_depth, config.max_messages) == (8 << 20, 64, 1024)
    assert (config.max_images_per_record, config.max_videos_per_record) == (64, 16)
    assert config.max_text_file_bytes == 64 << 20
    video = ingest.IngestConfig()
    assert (video.max_duration_s, video.max_frame_pixels) == (10_800.0, 7680 * 4320)
    with pytest.raises(ValueError, match="max_json_depth"):
        SampleConfig(max_json_depth=0)
    with pytest.raises(ValueError, match="max_duration_s"):
        ingest.IngestConfig(max_duration_s=0)
    # The bounds decide which records are taken, not their tokens: stored samples keep their keys.
    tok = load_tokenizer()
    assert conversations.samples_config_hash(tok, PAPER, ImageConfig(), config) == "b55de1aa43a2f459"
    assert conversations.samples_config_hash(
        tok, PAPER, ImageConfig(), SampleConfig(max_messages=2)
    ) == conversations.samples_config_hash(tok, PAPER, ImageConfig(), config)


def test_json_depth_ignores_brackets_inside_strings():
    assert conversations.json_depth(b'{"a": "[[[[", "b": [{"c": "\\"]]"}]}') == 3
    assert conversations.json_depth(b"[" * 5000) == 5000
    assert conversations.json_depth(b'"just a string"') == 0


def _clip(path: Path, size: str, seconds: float) -> Path:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}:rate=10"]
        + ["-t", str(seconds), "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path


def test_videos_over_a_bound_and_non_regular_files_are_quarantined(home, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    ok = _clip(folder / "ok.mp4", "64x48", 1)
    wide = _clip(folder / "wide.mp4", "96x64", 1)
    long = _clip(folder / "long.mp4", "64x48", 2)
    fifo = folder / "pipe.mp4"
    os.mkfifo(fifo)
    endless = folder / "endless.mp4"
    endless.symlink_to("/dev/zero")
    fifo_image = folder / "pipe.png"
    os.mkfifo(fifo_image)
    config = ingest.IngestConfig(max_duration_s=1.5, max_frame_pixels=5000)

    report = ingest.ingest_shard([str(p) for p in (ok, wide, long, fifo, endless)], config=config)
    image_report = images.ingest_images_shard([str(fifo_image)])

    assert report.num_ingested == 1
    assert tables.open_table("videos").to_table().column("uri").to_pylist() == [str(ok)]
    assert quarantined(ingest.STAGE) == {
        str(wide): "over the bound max_frame_pixels: 96x64 = 6,144 pixels per frame (limit 5,000)",
        str(long): "over the bound max_duration_s: 2.00 s (limit 1.5 s)",
        str(fifo): "not a regular file (a pipe, socket or device)",
        str(endless): "not a regular file (a pipe, socket or device)",
    }
    assert image_report.quarantined == {str(fifo_image): "not a regular file (a pipe, socket or device)"}


@pytest.mark.slow
def test_samples_build_cli_survives_a_deeply_nested_line(home, tmp_path):
    """The reported crash, through the real `keyeflow samples-build` process: one `[[[[…]]]]` line made it
    die with RecursionError and write nothing."""
    root = tmp_path / "src"
    root.mkdir()
    good = [chat("What is two plus two?", "Four."), chat("Spell cat backwards.", "tac")]
    (root / "chat.jsonl").write_bytes(
        line(good[0])
        + b"[" * 100_000
        + b"]" * 100_000
        + b"\n"
        + line(chat("y" * (9 << 20), "too long"))
        + line({"messages": [{"role": 7, "content": "hi"}, {"role": "assistant", "content": "ok"}]})
        + line({"video": "../../etc/passwd.mp4", "caption": "escapes"})
        + line(good[1])
    )
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        [KEYEFLOW, "samples-build", str(root), "--source-root", str(root)],
        env=env,
        capture_output=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    c = root / "chat.jsonl"
    reasons = quarantined()
    assert reasons[f"{c}#L2"] == "line 2: over the bound max_json_depth: nesting depth 100,000 (limit 64)"
    assert reasons[f"{c}#L3"].startswith("line 3: over the bound max_line_bytes: 9,437,")
    assert (
        reasons[f"{c}#L4"] == "line 4: message 0: role must be one of ['assistant', 'system', 'user'], got 7"
    )
    assert reasons[f"{c}#L5"] == f"video path '../../etc/passwd.mp4' is outside the source root {root}"
    assert len(reasons) == 4
    tok = load_tokenizer()
    landed = samples()
    assert {uri: row["num_tokens"] for uri, row in landed.items()} == {
        f"{c}#L1": conversation_tokens(tok, good[0]["messages"]),
        f"{c}#L6": conversation_tokens(tok, good[1]["messages"]),
    }
