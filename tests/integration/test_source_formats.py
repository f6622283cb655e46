"""The formats people hold, through ``samples-build``'s one path (media ingestion, bounds, quarantine): a
LLaVA-style JSON array with images and a video, gzip'd LLaVA JSONL, a WebDataset tar, a Parquet file and a
Hugging Face ``save_to_disk`` dataset with embedded image bytes, all written here as their tools write them.
Each good record lands in train_samples with the token count the processor gives for the same
conversation built by hand; each malformed one is quarantined with its record/line/sample/row and reason;
a rerun writes nothing. And the read is a stream: 100k-record sources never sit whole in memory."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from keyeflow.datasets import conversations, images, ingest, pretokenize, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.datasets.video import content_hash
from keyeflow.model import token_stream
from keyeflow.model.tokenizer import load_tokenizer

PAPER = resolve_config("paper")
IMAGE_CONFIG = ImageConfig(max_tokens=64)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (56, 56), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def turn(speaker: str, value: str) -> dict:
    return {"from": speaker, "value": value}


def user(*parts) -> dict:
    return {
        "role": "user",
        "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts],
    }


def image(path: Path) -> dict:
    return {"type": "image", "image": path}


def video(path: Path) -> dict:
    return {"type": "video", "video": path}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = out.getvalue()
    path.write_bytes(data if cut is None else data[:cut])


@pytest.fixture()
def sources(tmp_path) -> dict:
    """A source root holding one source of each format; returns the conversations each good record should
    become (built by hand, media parts naming the real file) and the reason of each bad one."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "pic_a.png").write_bytes(png((200, 30, 60), (112, 84)))
    (root / "pic_b.jpg").write_bytes(png((10, 200, 60), (90, 90), "JPEG"))
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-t", "1"]
        + ["-pix_fmt", "yuv420p", str(root / "clip.mp4")],
        check=True,
    )
    a, b, clip = root / "pic_a.png", root / "pic_b.jpg", root / "clip.mp4"
    good: dict[str, list[dict]] = {}
    bad: dict[str, str] = {}

    # LLaVA / ShareGPT JSON: one array, records on several lines each (as json.dump(indent=2) writes them)
    llava = [
        {
            "id": "a",
            "image": "pic_a.png",
            "conversations": [turn("human", "<image>\nWhat colour?"), turn("gpt", "Red.")],
        },
        {
            "id": "b",
            "images": ["pic_a.png", "pic_b.jpg"],
            "video": "clip.mp4",
            "conversations": [
                turn("human", "<image> and <image>: which is larger?\n<video>\nWhat moves?"),
                turn("gpt", "The second. Colour bars."),
                turn("human", "Sure?"),
                turn("gpt", "Yes."),
            ],
        },
        {
            "id": "c",
            "conversations": [turn("system", "Be brief."), turn("human", "Hi"), turn("gpt", "Hello.")],
        },
        {
            "id": "d",
            "image": "pic_a.png",
            "conversations": [turn("human", "No placeholder."), turn("gpt", "?")],
        },
        {
            "id": "e",
            "images": ["pic_a.png"],
            "conversations": [turn("human", "<image><image>?"), turn("gpt", "?")],
        },
        {"id": "f", "conversations": [turn("robot", "beep"), turn("gpt", "?")]},
        {
            "id": "g",
            "video": "missing.mp4",
            "conversations": [turn("human", "<video> what?"), turn("gpt", "?")],
        },
        {"id": "h", "conversations": [turn("human", "x"), {"from": "gpt", "value": 5}]},
    ]
    text = json.dumps(llava, indent=2)
    (root / "llava.json").write_text(text)
    starts = [text[: text.index(f'"id": "{r["id"]}"')].count("\n") for r in llava]  # the line of each "{"
    lj = root / "llava.json"
    good[f"{lj}#R1"] = [user(image(a), "What colour?"), answer("Red.")]
    good[f"{lj}#R2"] = [
        user(image(a), " and ", image(b), ": which is larger?", video(clip), "What moves?"),
        answer("The second. Colour bars."),
        user("Sure?"),
        answer("Yes."),
    ]
    good[f"{lj}#R3"] = [{"role": "system", "content": "Be brief."}, user("Hi"), answer("Hello.")]
    bad[f"{lj}#R4"] = (
        f"record 4 (line {starts[3]}): 0 <image> placeholder(s) in 'conversations' but 1 image(s) in 'image'"
    )
    bad[f"{lj}#R5"] = (
        f"record 5 (line {starts[4]}): 2 <image> placeholder(s) in 'conversations' but 1 image(s) in 'images'"
    )
    bad[f"{lj}#R6"] = (
        f"record 6 (line {starts[5]}): conversation turn 0: 'from' must be one of "
        "['assistant', 'gpt', 'human', 'system', 'user'], got 'robot'"
    )
    bad[f"{lj}#R7"] = f"video file 'missing.mp4' does not exist (looked at {root / 'missing.mp4'})"
    bad[f"{lj}#R8"] = f"record 8 (line {starts[7]}): conversation turn 1: 'value' must be a string, got int"
    # A broken array: a record that is not JSON, then the file ends inside the array.
    broken = root / "broken.json"
    broken.write_text(
        '[\n  {"conversations": [{"from": "human", "value": "Kept?"}, {"from": "gpt", "value": "Yes."}]},\n'
        '  {"conversations": [1 2]},\n  {"conversations": ['
    )
    good[f"{broken}#R1"] = [user("Kept?"), answer("Yes.")]
    bad[f"{broken}#R2"] = (
        "invalid JSON at record 2 (line 3): Expecting ',' delimiter (the record's line 1, column 22)"
    )
    bad[f"{broken}#R3"] = "truncated: the document ends inside record 3"

    # gzip'd LLaVA JSONL
    rows = [
        {"video": "clip.mp4", "conversations": [turn("human", "<video>\nDescribe."), turn("gpt", "Bars.")]},
        {"image": "pic_b.jpg", "conversations": [turn("human", "<video> then?"), turn("gpt", "?")]},
    ]
    packed = root / "llava.jsonl.gz"
    packed.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows)))
    good[f"{packed}#L1"] = [user(video(clip), "Describe."), answer("Bars.")]
    bad[f"{packed}#L2"] = "line 2: 0 <image> placeholder(s) in 'conversations' but 1 image(s) in 'image'"

    # WebDataset tar: key-grouped members, written in order
    spool_png = png((30, 30, 220))
    conversation = {"conversations": [turn("human", "<image>\n<image>\nSame?"), turn("gpt", "No.")]}
    shard = root / "shard-000.tar"
    write_tar(
        shard,
        [
            ("000.jpg", b.read_bytes()),
            ("000.txt", b"A green square."),
            ("001.png", spool_png),
            ("001.json", json.dumps({"caption": "A blue square.", "source": "webdata"}).encode()),
            ("002.json", json.dumps(conversation).encode()),
            ("002.0.png", a.read_bytes()),
            ("002.1.jpg", b.read_bytes()),
            ("003.mp4", clip.read_bytes()),
            ("003.txt", b"Colour bars moving."),
            ("004.txt", b"No picture."),
            ("005.jpg", b.read_bytes()),
            ("005.png", spool_png),
            ("006.png", spool_png),
            ("007.png", spool_png),
            ("007.txt", b"bad \x00 caption"),
            (
                "008.json",
                json.dumps({"conversations": [turn("human", "<image>?"), turn("gpt", "?")]}).encode(),
            ),
            ("008.0.png", spool_png),
            ("008.1.png", spool_png),
        ],
    )
    spooled = conversations.default_spool()
    blue = spooled._target(content_hash_bytes(spool_png), "x.png")
    good[f"{shard}#000"] = [user(image(b)), answer("A green square.")]
    good[f"{shard}#001"] = [user(image(blue)), answer("A blue square.")]
    good[f"{shard}#002"] = [user(image(a), image(b), "Same?"), answer("No.")]
    good[f"{shard}#003"] = [user(video(clip)), answer("Colour bars moving.")]
    bad[f"{shard}#004"] = (
        "sample 004: a caption sample needs exactly one image or video member, found 0 (members: ['txt'])"
    )
    bad[f"{shard}#005"] = (
        "sample 005: a caption sample needs exactly one image or video member, found 2 "
        "(members: ['005.jpg', '005.png'])"
    )
    bad[f"{shard}#006"] = "sample 006: no caption: no .txt member and no 'caption' in a .json member"
    bad[f"{shard}#007"] = "sample 007: NUL byte in its .txt member: binary data, not text"
    bad[f"{shard}#008"] = "sample 008: 1 <image> placeholder(s) in 'conversations' but 2 image(s) in 'images'"
    cut = root / "shard-001.tar"
    write_tar(
        cut,
        [("100.png", spool_png), ("100.txt", b"Kept before the cut."), ("101.mp4", clip.read_bytes())],
        cut=3000,
    )
    good[f"{cut}#100"] = [user(image(blue)), answer("Kept before the cut.")]
    bad[f"{cut}#100+1"] = "after sample 100: truncated or corrupt tar: unexpected end of data"

    # Parquet: an Image-like struct column (bytes + path), a LLaVA column, paths relative to the file
    olive, grey = png((120, 120, 20)), png((90, 90, 90))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": olive, "path": "olive.png"},
                    None,
                    {"bytes": None, "path": "pic_b.jpg"},
                    None,
                    {"bytes": b"not an image at all", "path": "junk.png"},
                    {"bytes": grey, "path": "grey.png"},
                ],
                struct,
            ),
            "caption": ["An olive square.", None, "A green square again.", None, "Junk.", ""],
            "conversations": [
                None,
                [turn("human", "<image> vs <image>"), turn("gpt", "Olive, then grey.")],
                None,
                [turn("human", "<image>"), turn("gpt", "?")],
                None,
                None,
            ],
            "images": pa.array(
                [
                    None,
                    [{"bytes": olive, "path": "olive.png"}, {"bytes": grey, "path": None}],
                    None,
                    [{"bytes": olive, "path": "o.png"}, {"bytes": grey, "path": "g.png"}],
                    None,
                    None,
                ],
                pa.list_(struct),
            ),
        }
    )
    parquet = root / "tables" / "pairs.parquet"
    parquet.parent.mkdir()
    (parquet.parent / "pic_b.jpg").write_bytes(b.read_bytes())
    pq.write_table(table, parquet, row_group_size=2)
    olive_file = spooled._target(content_hash_bytes(olive), "olive.png")
    grey_file = spooled._target(content_hash_bytes(grey), "")  # no name: stored without a suffix
    junk_file = spooled._target(content_hash_bytes(b"not an image at all"), "junk.png")
    good[f"{parquet}#row0"] = [user(image(olive_file)), answer("An olive square.")]
    good[f"{parquet}#row1"] = [user(image(olive_file), " vs ", image(grey_file)), answer("Olive, then grey.")]
    good[f"{parquet}#row2"] = [user(image(parquet.parent / "pic_b.jpg")), answer("A green square again.")]
    bad[f"{parquet}#row3"] = "row 3: 1 <image> placeholder(s) in 'conversations' but 2 image(s) in 'images'"
    bad[f"{parquet}#row4"] = "image junk.png has no pre-tokenised sample (quarantined: "  # a prefix
    bad[f"{parquet}#row5"] = (
        "row 5: a caption pair needs exactly one of 'image'/'video' and a non-empty 'caption'"
    )
    return {"root": root, "good": good, "bad": bad, "junk": junk_file}


def content_hash_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def ingest_media(root: Path) -> None:
    media = conversations.referenced_media([str(root)], str(root))
    ingest.ingest_shard(media["video"])
    pretokenize.pretokenize_shard(pretokenize.pending_videos(tables.ref("videos"), PAPER), PAPER)
    images.ingest_images_shard(media["image"], IMAGE_CONFIG)


def hand_count(tok, messages: list[dict]) -> int:
    """The processor's count for a conversation built by hand: media ids from the stored samples of the
    files its parts name."""
    image_rows = {r["sample_id"]: r for r in tables.open_table("image_samples").to_table().to_pylist()}
    video_rows = {r["sample_id"]: r for r in tables.open_table("video_samples").to_table().to_pylist()}

    def ids(part):
        digest = content_hash(str(part[part["type"]]))[0]
        if part["type"] == "image":
            return token_stream.image_ids(
                tok, image_rows[images.sample_id(digest, IMAGE_CONFIG)]["num_tokens"]
            )
        v = video_rows[pretokenize.sample_id(digest, PAPER)]
        return token_stream.video_ids(
            tok, v["frame_types"], v["timestamps"], v["slow_tokens"], v["fast_tokens"]
        )

    return len(token_stream.render_conversation(tok, messages, ids).input_ids)


def test_each_format_builds_exact_samples_and_quarantines_its_malformed_records(home, sources):
    root = sources["root"]
    ingest_media(root)
    report = conversations.build_train_samples([str(root)], str(root), PAPER, IMAGE_CONFIG)

    rows = {r["source_uri"]: r for r in tables.open_table("train_samples").to_table().to_pylist()}
    assert set(rows) == set(sources["good"])
    tok = load_tokenizer()
    for uri, messages in sources["good"].items():
        assert rows[uri]["num_tokens"] == hand_count(tok, messages), uri
        has_video = any(
            p["type"] == "video" for m in messages if isinstance(m["content"], list) for p in m["content"]
        )
        assert rows[uri]["modality"] == (
            "video" if has_video else "image" if rows[uri]["media_ids"] else "text"
        )
    assert rows[f"{root / 'shard-000.tar'}#001"]["source"] == "webdata"
    assert rows[f"{root / 'llava.json'}#R1"]["source"] == "llava"
    # the stored messages name embedded media by the name the source gave them
    stored = json.loads(rows[f"{root / 'tables' / 'pairs.parquet'}#row0"]["messages"])
    assert stored[0]["content"][0] == {"type": "image", "image": "olive.png"}

    reasons = {
        r["uri"]: r["reason"]
        for r in tables.open_table("quarantine").to_table().to_pylist()
        if r["stage"] == conversations.STAGE
    }
    junk = reasons.pop(f"{root / 'tables' / 'pairs.parquet'}#row4")
    expected = dict(sources["bad"])
    assert junk.startswith(expected.pop(f"{root / 'tables' / 'pairs.parquet'}#row4")), junk
    assert reasons == expected
    # the junk bytes went through image ingestion and were refused there, under their spooled name
    image_reasons = {r["uri"]: r["reason"] for r in tables.open_table("quarantine").to_table().to_pylist()}
    assert str(sources["junk"]) in image_reasons
    assert report.num_written == len(sources["good"])

    versions = {name: tables.ref(name).version for name in ("train_samples", "quarantine")}
    again = conversations.build_train_samples([str(root)], str(root), PAPER, IMAGE_CONFIG)
    assert again.num_written == 0 and again.num_already_present == report.num_written
    assert {name: tables.ref(name).version for name in versions} == versions


def test_a_save_to_disk_dataset_with_image_bytes_builds_samples(home, tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "src"
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    pictures = [Image.new("RGB", (56, 84), c) for c in colours]
    data = datasets.Dataset.from_dict({"image": pictures, "text": ["Red.", "Green.", ""]})
    data = data.cast_column("image", datasets.Image())
    data.save_to_disk(str(root / "captions"))
    chat = datasets.Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
                ]
            ],
            "images": [[pictures[2]]],
        }
    ).cast_column("images", datasets.Sequence(datasets.Image()))
    chat.save_to_disk(str(root / "chat"))

    ingest_media(root)
    conversations.build_train_samples([str(root)], str(root), PAPER, IMAGE_CONFIG)

    rows = {r["source_uri"]: r for r in tables.open_table("train_samples").to_table().to_pylist()}
    spool = conversations.default_spool()
    stored = data.cast_column("image", datasets.Image(decode=False))["image"]  # what the Arrow file holds
    files = [spool._target(content_hash_bytes(x["bytes"]), x["path"] or "") for x in stored]
    tok = load_tokenizer()
    caps, conv = root / "captions", root / "chat"
    expected = {
        f"{caps}#row0": [user(image(files[0])), answer("Red.")],
        f"{caps}#row1": [user(image(files[1])), answer("Green.")],
        f"{conv}#row0": [
            user(image(files[2]), "Colour?"),
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        ],
    }
    assert set(rows) == set(expected)
    for uri, messages in expected.items():
        assert rows[uri]["num_tokens"] == hand_count(tok, messages), uri
    reasons = {r["uri"]: r["reason"] for r in tables.open_table("quarantine").to_table().to_pylist()}
    assert reasons[f"{caps}#row2"] == (
        "row 2: a caption pair needs exactly one of 'image'/'video' and a non-empty 'caption'"
    )


_STREAM_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from keyeflow.datasets import conversations

    path = Path(sys.argv[1])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bad = []
    records = sum(1 for _ in conversations.iter_records(path, bad))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(records, len(bad), grown * 1024)
    """
)


@pytest.mark.slow
def test_a_100k_record_source_is_read_as_a_stream(tmp_path):
    """100,000 LLaVA records (~60 MB of JSON) as one gzip'd JSON array, as Parquet and as JSONL: reading
    each through samples-build's reader raises the process's peak RSS by far less than the source holds
    (loading it whole would take several times its size as Python objects)."""
    n = 100_000
    records = [
        json.dumps(
            {
                "id": i,
                "conversations": [
                    turn("human", f"Question {i}? " + "context " * 60),
                    turn("gpt", f"{i + 1}."),
                ],
            }
        )
        for i in range(n)
    ]
    size = sum(map(len, records))
    assert size > 50 << 20
    array = tmp_path / "big.json.gz"
    with gzip.open(array, "wt", compresslevel=1) as out:
        out.write("[\n" + ",\n".join(records) + "\n]\n")
    lines = tmp_path / "big.jsonl"
    lines.write_text("\n".join(records) + "\n")
    parquet = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([json.loads(r) for r in records]), parquet, row_group_size=5000)
    del records
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for source in (array, lines, parquet):
        out = subprocess.run(
            [sys.executable, "-c", _STREAM_SCRIPT, str(source)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        count, bad, grown = map(int, out)
        assert (count, bad) == (n, 0), source
        assert grown < size // 6, (source.name, grown, size)
