"""The data formats people already hold, read as streams of raw records for ``samples-build``.

Which format a source is follows from its name (compression suffixes ``.gz``/``.zst`` aside, which are
recognised by magic bytes when the file is opened) or, for a folder, from what it holds:

- ``*.jsonl``: one JSON record per line (Keye/Qwen ``messages``, caption pairs, LLaVA/ShareGPT
  ``conversations``), read by :mod:`keyeflow.datasets.conversations` itself;
- ``*.json``: a JSON array of such records (LLaVA's own files are one array of 100k+ records, hundreds of
  MB), cut into its elements by :func:`json_array_elements` without parsing the whole document;
- ``*.tar`` / ``*.tar.gz`` / ``*.tgz``: WebDataset shards, members grouped by key (``00042.jpg`` +
  ``00042.txt`` is one sample), read front to back with ``tarfile``'s stream mode;
- ``*.parquet``: read one batch of rows at a time (``ParquetFile.iter_batches``);
- a folder with ``state.json`` (a Hugging Face ``Dataset.save_to_disk``): its Arrow stream files, listed in
  ``state.json``, memory-mapped and read one record batch at a time with pyarrow (no ``datasets`` needed);
  the split folders of a ``DatasetDict`` are sources of their own;
- ``*.txt``: plain text.

Nothing here holds more than one record (a JSON element, a tar sample, a batch of table rows) at a time;
parsing, bounds and quarantine reasons are the caller's.

Media stored *inside* a source (a tar member, an image column's ``{"bytes": ..., "path": ...}``) are
written once to a :class:`MediaSpool`, a content-addressed folder under the data root, so that they go
through the same media ingestion (hashing, header checks, decoding, quarantine) as files named by path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"}
_COMPRESSION_SUFFIXES = (".gz", ".zst")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KINDS = {".jsonl": "jsonl", ".json": "json", ".txt": "txt", ".parquet": "parquet"}
HF_STATE = "state.json"
_HF_DICT = "dataset_dict.json"
_COPY_CHUNK = 1 << 20


def source_kind(path: Path) -> str | None:
    """``jsonl``, ``json``, ``txt``, ``tar``, ``parquet`` or ``hf`` (a ``save_to_disk`` folder); None when
    the name says none of them."""
    if path.is_dir():
        return "hf" if (path / HF_STATE).is_file() else None
    name = path.name.lower()
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return _KINDS.get(Path(name).suffix)


def source_stem(path: Path) -> str:
    """The name without its format and compression suffixes: the default ``source`` of its records."""
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    inner = name
    for suffix in _COMPRESSION_SUFFIXES:
        if inner.lower().endswith(suffix):
            inner = inner[: -len(suffix)]
    return Path(inner).stem if Path(inner).suffix.lower() in _KINDS else path.stem


def discover(folder: Path) -> list[Path]:
    """Every source under ``folder``, sorted: files of a known kind, and ``save_to_disk`` folders (whose
    own files, ``state.json``, ``dataset_info.json`` and the Arrow data, are not sources)."""
    found: list[Path] = []
    for current, dirs, files in os.walk(folder):
        here = Path(current)
        if HF_STATE in files:
            found.append(here)
            dirs.clear()
            continue
        dirs.sort()
        found += [here / f for f in files if f != _HF_DICT and source_kind(here / f) not in (None, "hf")]
    return sorted(p for p in found if p.is_dir() or p.is_file())


# ---------------------------------------------------------------------------------------------------------
# Media stored inside a source


class MediaSpool:
    """Media bytes found inside a source, each written once as ``<sha256[:2]>/<sha256><suffix>`` (the suffix
    is the one the source named, when it is a media suffix). The same bytes always land at the same path,
    so a rerun (or the flow's second pass, which counts the tokens) finds the file media ingestion saw."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _target(self, digest: str, name: str) -> Path:
        suffix = Path(name).suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES | VIDEO_SUFFIXES else ""
        return self.folder / digest[:2] / f"{digest}{suffix}"

    def put_bytes(self, data: bytes, name: str) -> Path:
        target = self._target(hashlib.sha256(data).hexdigest(), name)
        if not target.is_file():
            self._publish(target, lambda out: out.write(data))
        return target

    def put_stream(self, stream: BinaryIO, name: str) -> Path:
        """Copy ``stream`` in chunks (never whole in memory), hashing as it goes."""
        self.folder.mkdir(parents=True, exist_ok=True)
        scratch = self.folder / f".{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        try:
            with open(scratch, "wb") as out:
                while chunk := stream.read(_COPY_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            target = self._target(digest.hexdigest(), name)
            if target.is_file():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch, target)  # atomic: a reader never sees half a file
            return target
        finally:
            scratch.unlink(missing_ok=True)

    def _publish(self, target: Path, write) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.parent / f".{uuid.uuid4().hex}.part"
        try:
            with open(scratch, "wb") as out:
                write(out)
            os.replace(scratch, target)
        finally:
            scratch.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# JSON arrays


class BadStructure(ValueError):
    """The document around the records is broken (not an array, cut off): a file-level reason."""


@dataclass
class JsonElement:
    number: int  # 1-based position in the array
    line: int  # the line it starts on
    data: bytes | None  # None when it is longer than the limit (it was read on and dropped)
    size: int


_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*')
_STRUCTURE = re.compile(rb'["\[\]{},]')
_NOT_SPACE = re.compile(rb"\S")


def json_array_elements(stream: BinaryIO, limit: int, chunk_size: int = 1 << 20) -> Iterator[JsonElement]:
    """The elements of the JSON document ``stream`` holds, one at a time, as their bytes: an array's
    elements, or the document itself when it is one object. The scan keeps only the element in progress
    (one over ``limit`` bytes is scanned on and dropped, never held): brackets are counted outside strings
    to find where an element ends, nothing is parsed. A document that is neither, or that ends inside the
    array, raises :class:`BadStructure` after the elements before the break."""
    buf = bytearray()
    eof = False

    def fill() -> bool:
        nonlocal eof
        chunk = b"" if eof else stream.read(chunk_size)
        eof = not chunk
        buf.extend(chunk)
        return bool(chunk)

    line = 1  # the line buf[0] is on
    while not (m := _NOT_SPACE.search(buf)):
        if not fill():
            raise BadStructure("empty document: no records")
    line += buf.count(b"\n", 0, m.start())
    del buf[: m.start()]
    if buf[0] == ord("{"):  # one record, not an array of them
        while len(buf) <= limit and fill():
            pass
        data = bytes(buf).rstrip() if len(buf) <= limit else None
        size = len(buf) + sum(len(c) for c in iter(lambda: stream.read(chunk_size), b""))
        yield JsonElement(1, line, data, size)
        return
    if buf[0] != ord("["):
        raise BadStructure(f"not a JSON array or object: it starts with {bytes(buf[:20])!r}")
    del buf[:1]

    number, pos, in_string, dropped, started = 0, 0, False, 0, False
    closers = bytearray()  # the brackets open in the element, as the bytes that close them
    while True:
        if not started:  # between elements: skip blanks to the next value or the closing bracket
            m = _NOT_SPACE.search(buf)
            if not m:
                line += buf.count(b"\n")
                buf.clear()
                if not fill():
                    raise BadStructure(f"truncated: the array ends after record {number} without ']'")
                continue
            line += buf.count(b"\n", 0, m.start())
            del buf[: m.start()]
            if buf[0] == ord("]") and number == 0:
                return
            pos, dropped, started = 0, 0, True
            closers.clear()
        if in_string:
            end = _STRING_BODY.match(buf, pos).end()
            if end < len(buf) and buf[end] == ord('"'):
                pos, in_string = end + 1, False
            else:  # the string goes on past the buffer (perhaps after a lone backslash): read more
                pos = end
                if not fill():
                    raise BadStructure(f"truncated: the document ends inside record {number + 1}")
        else:
            m = _STRUCTURE.search(buf, pos)
            if not m:
                pos = len(buf)
                if not fill():
                    raise BadStructure(f"truncated: the document ends inside record {number + 1}")
            else:
                char, pos = buf[m.start()], m.end()
                if char == ord('"'):
                    in_string = True
                elif char in b"[{":
                    closers.append(ord("]") if char == ord("[") else ord("}"))
                elif closers and char in b"]}":
                    if closers.pop() != char:  # past this, where an element ends cannot be told
                        raise BadStructure(
                            f"record {number + 1}: mismatched brackets: the rest of the document cannot be "
                            "split into records"
                        )
                elif char == ord("}"):
                    raise BadStructure(f"record {number + 1}: mismatched brackets: '}}' closes nothing")
                elif not closers:  # a ',' or the array's ']' closes the element
                    number += 1
                    size = dropped + m.start()
                    data = bytes(buf[: m.start()]).rstrip() if not dropped and size <= limit else None
                    yield JsonElement(number, line, data, len(data) if data is not None else size)
                    line += buf.count(b"\n", 0, pos)
                    del buf[:pos]
                    started = False
                    if char == ord("]"):
                        while not _NOT_SPACE.search(buf):
                            buf.clear()
                            if not fill():
                                break
                        if _NOT_SPACE.search(buf):
                            raise BadStructure(f"data after the end of the array (after record {number})")
                        return
                    continue
        if pos > limit:  # over the limit: keep scanning, hold nothing of it
            line += buf.count(b"\n", 0, pos)
            dropped += pos
            del buf[:pos]
            pos = 0


# ---------------------------------------------------------------------------------------------------------
# WebDataset tar shards


@dataclass
class TarSample:
    """One WebDataset sample: the members sharing a key, in the order the shard holds them."""

    key: str
    media: list[tuple[str, Path, str]] = field(default_factory=list)  # (kind, spooled file, member name)
    texts: dict[str, bytes] = field(default_factory=dict)  # extension (txt, json, ...) -> bytes
    problems: list[str] = field(default_factory=list)


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is the path up to the first dot of the file name, the
    extension the rest (``a/b.seg.jpg`` -> ``a/b``, ``seg.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _media_kind(ext: str) -> str | None:
    suffix = "." + ext.rsplit(".", 1)[-1]
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def tar_samples(
    path: Path, spool: MediaSpool, max_text_bytes: int, max_media_bytes: int
) -> Iterator[TarSample]:
    """The shard's samples in order, one at a time. Media members are copied to ``spool`` as they stream
    by (a member's size is in its header, so one over ``max_media_bytes`` is skipped unread); text members
    (``.txt``, ``.json``, ...) over ``max_text_bytes`` are refused the same way. A sample's members must be
    adjacent, as WebDataset writes them. Stream errors (a truncated or corrupt shard) propagate, after the
    samples before them."""
    current: TarSample | None = None
    with tarfile.open(path, mode="r|*") as tar:
        for info in tar:
            if info.isdir():
                continue
            key, ext = _member_key(info.name)
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current = TarSample(key)
            if not info.isfile():
                current.problems.append(f"member {info.name!r} is not a regular file")
                continue
            kind = _media_kind(ext)
            limit = max_media_bytes if kind else max_text_bytes
            if info.size > limit:
                what = "max_embedded_media_bytes" if kind else "max_line_bytes"
                current.problems.append(
                    f"member {info.name!r}: over the bound {what}: {info.size:,} bytes "
                    f"(limit {limit:,} bytes)"
                )
                continue
            member = tar.extractfile(info)
            if kind:
                current.media.append((kind, spool.put_stream(member, info.name), info.name))
            elif ext in current.texts:
                current.problems.append(f"two members with extension .{ext}")
            else:
                current.texts[ext] = member.read()
    if current is not None:
        yield current


# ---------------------------------------------------------------------------------------------------------
# Tables: Parquet files and save_to_disk datasets


def parquet_batches(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The file's rows, ``batch_rows`` at a time (Parquet decodes a column chunk of a row group at once; a
    writer's row-group size bounds what one read holds)."""
    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)


def hf_data_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder, in the order ``state.json`` lists them."""
    state = json.loads((folder / HF_STATE).read_text(encoding="utf-8"))
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files:
        raise BadStructure(f"{HF_STATE} lists no _data_files")
    out = []
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise BadStructure(f"{HF_STATE}: bad _data_files entry {entry!r}"[:200])
        out.append(folder / name)
    return out


def hf_batches(folder: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The rows of a ``save_to_disk`` dataset: each Arrow stream file memory-mapped, read batch by batch
    (``datasets`` writes ~1,000-row batches), re-cut to at most ``batch_rows`` rows."""
    for file in hf_data_files(folder):
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                for offset in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(offset, batch_rows)
