"""Conversations, captions and plain text into ``train_samples``: one row per training sample with its exact
token count (text + vision) and its modality for mixing.

Inputs under a source root:
- ``*.jsonl`` with chat rows ``{"messages": [...], "source"?, "task"?}`` (the Keye/Qwen format, media as
  ``{"type": "video", "video": path}`` / ``{"type": "image", "image": path}`` parts), or caption pairs
  ``{"image"|"video": path, "caption": text, "source"?}``;
- ``*.txt`` plain-text documents (the folder name is the source), cut into chunks at paragraph breaks.

Media paths are relative to the file that names them and must stay inside the source root. Media are
ingested by the video and image paths beforehand (:func:`referenced_media` lists them); here a sample only
looks its media up by content hash, so a renamed copy of a clip reuses the clip's tokens. Every bad line,
file or reference is quarantined with its line number and reason; the rest goes through.

Hostile input is a record-level problem, never a batch failure. Files are streamed line by line (a line is
never held beyond ``max_line_bytes``); gzip and zstd data are recognised by their magic bytes whatever the
file is named, and a stream that breaks off (a truncated download) keeps the lines before the break. Each
record is bounded by :class:`SampleConfig`'s ``max_*`` settings (line size, nesting depth, messages, images
and videos per record, text file size); a record over a bound is quarantined with the bound's name and the
value found. NUL bytes, invalid UTF-8, wrong types, unknown roles, a last line cut off without its newline
and an empty file each get their own reason.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keyeflow.config import check_int, get_settings, invalid
from keyeflow.config import config_hash as hash_config
from keyeflow.datasets import images, pretokenize, source_formats, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.slowfast import SlowFastConfig
from keyeflow.datasets.source_formats import BadStructure, MediaSpool
from keyeflow.datasets.video import BadVideo, content_hash
from keyeflow.faults import kill_point
from keyeflow.model import token_stream
from keyeflow.model.tokenizer import DEFAULT_SYSTEM_PROMPT, load_tokenizer, tokenizer_version

STAGE = "ingest_samples"
# Source files by name (see keyeflow.datasets.source_formats): each may also be .gz or .zst compressed.
SOURCE_SUFFIXES = {".jsonl", ".json", ".txt", ".parquet", ".tar", ".tgz"}
_ROLES = {"system", "user", "assistant"}
DEFAULT_IMAGE_CONFIG = ImageConfig()  # frozen: one shared default for the builders' signatures
_COMMIT_ROWS = 5000
_TABLE_BATCH_ROWS = 64  # Parquet/Arrow rows turned into Python objects at a time (they may carry images)
_MEDIA_KINDS = ("image", "video")
_PART_TYPES = ("text", *_MEDIA_KINDS)
_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
# Samples are keyed on the settings that change a sample's tokens; the bounds below decide only whether a
# record is taken, so they stay out of the hash (raising one does not re-key the samples already stored).
_TOKEN_FIELDS = ("max_text_tokens", "min_text_tokens", "tokenizer_path")


@dataclass(frozen=True)
class SampleConfig:
    """How records become training samples (the media configs are passed beside it)."""

    max_text_tokens: int = 2048  # plain-text chunk size; longer paragraphs are split on sentences
    min_text_tokens: int = 8  # shorter chunks carry too little to train on and are dropped with a reason
    tokenizer_path: str | None = None  # a real checkpoint's tokenizer; None = the shipped one
    # What one record may cost. Over a bound, the record is quarantined with the bound's name and its value.
    max_line_bytes: int = 8 << 20  # one JSONL line; a longer one is skipped without being held in memory
    max_json_depth: int = 64  # nesting of [ and {; a chat row needs 4 (row, messages, message, parts)
    max_messages: int = 1024  # turns in one conversation
    max_images_per_record: int = 64  # image parts in one record (each up to ImageConfig.max_tokens)
    max_videos_per_record: int = 16  # video parts in one record (each up to the Slow-Fast token budget)
    max_text_file_bytes: int = 64 << 20  # one .txt document (decompressed), read whole to be chunked
    # one image or video stored inside a source (a tar member, a table's image bytes), copied to the spool
    max_embedded_media_bytes: int = 1 << 30

    def __post_init__(self):
        for name, minimum in (
            ("min_text_tokens", 1),
            ("max_text_tokens", 1),
            ("max_line_bytes", 1),
            ("max_json_depth", 1),
            ("max_messages", 2),  # a user turn and the assistant turn that is trained on
            ("max_images_per_record", 0),  # 0: text and video records only
            ("max_videos_per_record", 0),
            ("max_text_file_bytes", 1),
            ("max_embedded_media_bytes", 1),
        ):
            value = check_int("SampleConfig", name, getattr(self, name), minimum=minimum)
            object.__setattr__(self, name, value)
        if self.max_text_tokens <= self.min_text_tokens:
            raise invalid(
                "SampleConfig",
                "max_text_tokens",
                self.max_text_tokens,
                f"must be > min_text_tokens ({self.min_text_tokens})",
            )


class BadRecord(ValueError):
    pass


class BadLine(BadRecord):
    """A JSONL line that does not parse; its reason names the line."""


@dataclass
class Record:
    uri: str  # file#Lline for JSONL rows, #Rn for JSON array records, #key for tar samples, #rowN for tables
    source: str
    task: str
    messages: list[dict] | None = None
    text: str | None = None
    # Media stored inside the source, by the position of their part among the record's media parts: the
    # spooled file (the part itself names the member or the table's path, for the stored messages).
    embedded: dict[int, Path] = field(default_factory=dict)
    base: Path | None = None  # what relative media paths are relative to, if not the file's folder


@dataclass(frozen=True)
class Embedded:
    """A media file a source reader already copied to the spool, under the name the source gave it."""

    path: Path
    name: str


@dataclass
class SampleReport:
    num_records: int = 0
    num_written: int = 0
    num_already_present: int = 0
    num_quarantined: int = 0
    tokens_by_modality: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)


def discover_sources(paths: list[str]) -> list[Path]:
    """Source files and ``save_to_disk`` folders: a folder is searched (symlinked folders are not
    followed), a file is taken whatever its name (an unknown kind is read as JSONL)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir() and source_formats.source_kind(path) != "hf":
            found += source_formats.discover(path)
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def default_spool() -> MediaSpool:
    """Where media stored inside sources are copied: scratch under the data root (the copies are keyed by
    content, so deleting them costs only a re-copy)."""
    return MediaSpool(get_settings().work_dir / "embedded_media")


def over_bound(name: str, value: str, limit: int, unit: str = "") -> str:
    """The reason for a record over one of the bounds: the setting's name, the value found and the limit."""
    return f"over the bound {name}: {value} (limit {limit:,}{unit})"


def _open_source(path: Path) -> tuple[BinaryIO, str]:
    """A binary stream of the file's content, decompressed when its first bytes are gzip's or zstd's magic
    (a compressed file under a plain name reads as what it holds), and the compression found ("" if none)."""
    with open(path, "rb") as head:
        magic = head.read(4)
    if magic.startswith(_GZIP_MAGIC):
        return gzip.open(path, "rb"), "gzip"
    if magic == _ZSTD_MAGIC:
        return io.BufferedReader(pa.input_stream(str(path), compression="zstd")), "zstd"
    return open(path, "rb"), ""  # the caller closes it, as it does the other two


# What a compressed stream raises when it breaks off or is corrupt: gzip EOFError/BadGzipFile (an OSError)/
# zlib.error, Arrow's zstd OSError/ArrowInvalid (a ValueError); a plain file only an OSError.
_STREAM_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def _stream_error(exc: BaseException, compression: str) -> str:
    detail = (str(exc) or type(exc).__name__).splitlines()[0][:200]
    return f"truncated or corrupt {compression} data: {detail}" if compression else f"read error: {detail}"


def _lines(stream: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, the line with its newline or None when it is longer than ``limit`` bytes, its length
    without the newline). An overlong line is read on in chunks and dropped, never held whole."""
    number = 0
    while line := stream.readline(limit + 1):
        number += 1
        if len(line) <= limit or line.endswith(b"\n"):
            yield number, line, len(line.rstrip(b"\n"))
            continue
        size = len(line)
        while chunk := stream.readline(1 << 20):
            size += len(chunk)
            if chunk.endswith(b"\n"):
                size -= 1
                break
        yield number, None, size


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def json_depth(line: bytes) -> int:
    """How deeply ``[`` and ``{`` nest in a JSON text, found without parsing it: strings are cut out (a
    bracket inside one does not nest), then the running sum of +1/-1 per bracket is taken, all in C."""
    skeleton = _JSON_STRING.sub(b"", line).translate(None, delete=bytes(set(range(256)) - set(b"[]{}")))
    if not skeleton:
        return 0
    return int(np.cumsum(_BRACKET_STEP[np.frombuffer(skeleton, dtype=np.uint8)], dtype=np.int64).max())


def parse_line(line: bytes, number: int, config: SampleConfig) -> object:
    """One JSONL line as JSON, or BadLine saying why not.

    The nesting depth is bounded *before* ``json.loads``, not by catching RecursionError from it: how deep
    the decoder may go before RecursionError depends on how deep the caller's stack already is (a Prefect
    worker thread, a test runner), so the same line would pass in one place and fail in another; a
    structure that parsed just under the limit would still blow the stack later, in ``json.dumps`` or
    wherever it is walked; and a depth bound is a named, stated setting that a reason can cite."""
    return _parse_json(line, f"line {number}", config)


def _parse_json(data: bytes, where: str, config: SampleConfig, first_line: int | None = None) -> object:
    """``parse_line`` for a line (``first_line`` None) or for a record of a JSON document that starts on
    ``first_line`` of its file (positions are then given as lines of the file)."""
    unit = "line" if first_line is None else "record"
    if (nul := data.find(b"\x00")) >= 0:
        at = f"column {nul + 1}" if first_line is None else f"byte {nul}"
        raise BadLine(f"{where}: NUL byte at {at}: binary data, not a JSON {unit}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"invalid UTF-8 at {where}, byte {exc.start} of the {unit}") from None
    depth = json_depth(data)
    if depth > config.max_json_depth:
        reason = over_bound("max_json_depth", f"nesting depth {depth:,}", config.max_json_depth)
        raise BadLine(f"{where}: {reason}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if first_line is not None:
            at = f"the record's line {exc.lineno}, column {exc.colno}"
            raise BadLine(f"invalid JSON at {where}: {exc.msg} ({at})") from None
        if not data.endswith(b"\n"):
            raise BadLine(
                f"{where}: truncated: the last line has no newline and is not valid JSON ({exc.msg}, "
                f"column {exc.colno})"
            ) from None
        raise BadLine(f"invalid JSON at {where}: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer over Python's 4,300-digit conversion limit
        raise BadLine(f"invalid JSON at {where}: {str(exc).splitlines()[0][:200]}") from None


def _regular_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a source file, or None. A FIFO or device would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return None if stat.S_ISREG(mode) else "not a regular file"


def iter_records(
    path: Path,
    bad: list[tuple[str, str]],
    config: SampleConfig = SampleConfig(),
    spool: MediaSpool | None = None,
) -> Iterator[Record]:
    """Parse one source (file or ``save_to_disk`` folder) as a stream; every unusable record/file is
    appended to ``bad`` as (uri, reason). Media stored inside the source are copied to ``spool``."""
    kind = source_formats.source_kind(path) or "jsonl"
    spool = spool or default_spool()
    if kind == "hf":
        yield from _table_records(path, kind, bad, config, spool)
        return
    if why := _regular_file(path):
        bad.append((str(path), why))
        return
    if kind == "tar":
        yield from _tar_records(path, bad, config, spool)
        return
    if kind == "parquet":
        yield from _table_records(path, kind, bad, config, spool)
        return
    try:
        stream, compression = _open_source(path)
    except OSError as exc:
        bad.append((str(path), f"unreadable: {exc.strerror or exc}"))
        return
    with stream:
        if kind == "txt":
            record = _text_record(path, stream, compression, bad, config)
            if record is not None:
                yield record
            return
        if kind == "json":
            yield from _json_records(path, stream, compression, bad, config, spool)
            return
        number, found, stem = 0, False, source_formats.source_stem(path)
        lines = _lines(stream, config.max_line_bytes)
        while True:
            # Only the reading is guarded: a stream error is about the file, not about a record.
            try:
                number, line, size = next(lines)
            except StopIteration:
                break
            except _STREAM_ERRORS as exc:
                # The lines before the break went through; the break is recorded where the next line is.
                reason = f"after line {number}: {_stream_error(exc, compression)}"
                bad.append((f"{path}#L{number + 1}", reason))
                return
            found = found or line is None or bool(line.strip())
            uri = f"{path}#L{number}"
            if line is None:
                bound = over_bound("max_line_bytes", f"{size:,} bytes", config.max_line_bytes, " bytes")
                bad.append((uri, f"line {number}: {bound}"))
                continue
            if not line.strip():
                continue
            try:
                record = _record(parse_line(line, number, config), uri, stem, config, spool)
            except BadLine as exc:  # a parse error names the line itself
                bad.append((uri, str(exc)))
                continue
            except BadRecord as exc:
                bad.append((uri, f"line {number}: {exc}"))
                continue
            yield record
    if not found:
        bad.append((str(path), "empty file: no records" + (f" (after {compression})" if compression else "")))


def read_records(
    path: Path, bad: list[tuple[str, str]], config: SampleConfig = SampleConfig()
) -> list[Record]:
    """Parse one source file; every unusable line/file is appended to ``bad`` as (uri, reason)."""
    return list(iter_records(path, bad, config))


def _json_records(
    path: Path,
    stream: BinaryIO,
    compression: str,
    bad: list[tuple[str, str]],
    config: SampleConfig,
    spool: MediaSpool,
) -> Iterator[Record]:
    """The records of a JSON document (an array of them, LLaVA's layout, or one object), one element in
    memory at a time; reasons name the record's number and the line it starts on."""
    stem, number = source_formats.source_stem(path), 0
    try:
        for element in source_formats.json_array_elements(stream, config.max_line_bytes):
            number = element.number
            uri, where = f"{path}#R{number}", f"record {number} (line {element.line})"
            if element.data is None:
                bound = over_bound(
                    "max_line_bytes", f"{element.size:,} bytes", config.max_line_bytes, " bytes"
                )
                bad.append((uri, f"{where}: {bound}"))
                continue
            try:
                record = _record(
                    _parse_json(element.data, where, config, element.line), uri, stem, config, spool
                )
            except BadLine as exc:
                bad.append((uri, str(exc)))
                continue
            except BadRecord as exc:
                bad.append((uri, f"{where}: {exc}"))
                continue
            yield record
    except BadStructure as exc:
        bad.append((f"{path}#R{number + 1}" if number else str(path), str(exc)))
    except _STREAM_ERRORS as exc:
        bad.append((f"{path}#R{number + 1}", f"after record {number}: {_stream_error(exc, compression)}"))


def _tar_records(
    path: Path, bad: list[tuple[str, str]], config: SampleConfig, spool: MediaSpool
) -> Iterator[Record]:
    """The samples of a WebDataset shard, streamed: each key's media and caption/.json members make one
    record (``shard.tar#key``)."""
    stem, number, key = source_formats.source_stem(path), 0, None
    samples = source_formats.tar_samples(path, spool, config.max_line_bytes, config.max_embedded_media_bytes)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except (tarfile.TarError, *_STREAM_ERRORS) as exc:
            detail = (str(exc) or type(exc).__name__).splitlines()[0][:200]
            where = f"after sample {key}" if key is not None else "at the start"
            bad.append(
                (f"{path}#{key}+1" if key else str(path), f"{where}: truncated or corrupt tar: {detail}")
            )
            return
        number, key = number + 1, sample.key
        uri = f"{path}#{sample.key}"
        try:
            record = _record(_tar_row(sample, config), uri, stem, config, spool)
        except BadRecord as exc:
            bad.append((uri, f"sample {sample.key}: {exc}"))
            continue
        yield record
    if number == 0:
        bad.append((str(path), "empty shard: no samples"))


_CAPTION_MEMBERS = ("txt", "caption", "text")


def _tar_row(sample: source_formats.TarSample, config: SampleConfig) -> dict:
    """A WebDataset sample as a record row: a ``.json`` member holding a conversation (``messages`` or
    LLaVA ``conversations``) takes the sample's media in member order for the parts it does not name;
    otherwise the sample is a caption pair of its one media member and its ``.txt`` (or the ``.json``'s
    ``caption``/``text``)."""
    if sample.problems:
        raise BadRecord("; ".join(sample.problems))
    meta = None
    if "json" in sample.texts:
        try:
            meta = _parse_json(sample.texts["json"], "its .json member", config, 1)
        except BadLine as exc:
            raise BadRecord(str(exc)) from None
    media = {kind: [Embedded(p, name) for k, p, name in sample.media if k == kind] for kind in _MEDIA_KINDS}
    if isinstance(meta, dict) and ("messages" in meta or "conversations" in meta):
        for kind in _MEDIA_KINDS:
            if kind not in meta and f"{kind}s" not in meta and media[kind]:
                meta[f"{kind}s"] = media[kind]
        return meta
    caption = None
    for ext in _CAPTION_MEMBERS:
        if ext in sample.texts:
            data = sample.texts[ext]
            if b"\x00" in data:
                raise BadRecord(f"NUL byte in its .{ext} member: binary data, not text")
            try:
                caption = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRecord(f"invalid UTF-8 in its .{ext} member at byte {exc.start}") from None
            break
    if caption is None and isinstance(meta, dict):
        caption = meta.get("caption", meta.get("text"))
    found = [(kind, m) for kind in _MEDIA_KINDS for m in media[kind]]
    if len(found) != 1:
        raise BadRecord(
            f"a caption sample needs exactly one image or video member, found {len(found)} "
            f"(members: {sorted(sample.texts) + [m.name for _, m in found]})"[:300]
        )
    if caption is None:
        raise BadRecord("no caption: no .txt member and no 'caption' in a .json member")
    row = {found[0][0]: found[0][1], "caption": caption}
    if isinstance(meta, dict) and "source" in meta:
        row["source"] = meta["source"]
    return row


def _table_records(
    path: Path, kind: str, bad: list[tuple[str, str]], config: SampleConfig, spool: MediaSpool
) -> Iterator[Record]:
    """The rows of a Parquet file or a ``save_to_disk`` dataset, a batch at a time (``file#rowN``, N from
    0 as in pandas and ``datasets``). Image columns hold ``{"bytes", "path"}`` structs (``datasets``'
    Image feature), bytes or paths; paths are relative to the file (the dataset's folder)."""
    stem = path.name if kind == "hf" else source_formats.source_stem(path)
    base = path if kind == "hf" else path.parent
    number = 0
    try:
        batches = (
            source_formats.hf_batches(path, _TABLE_BATCH_ROWS)
            if kind == "hf"
            else source_formats.parquet_batches(path, _TABLE_BATCH_ROWS)
        )
        for batch in batches:
            for row in batch.to_pylist():
                uri = f"{path}#row{number}"
                try:
                    record = _record(_table_row(row, config), uri, stem, config, spool)
                except BadRecord as exc:
                    bad.append((uri, f"row {number}: {exc}"))
                else:
                    record.base = base
                    yield record
                number += 1
    except BadStructure as exc:
        bad.append((str(path), str(exc)))
        return
    except (pa.ArrowException, *_STREAM_ERRORS) as exc:
        what = "Parquet" if kind == "parquet" else "Arrow (save_to_disk)"
        detail = (str(exc) or type(exc).__name__).splitlines()[0][:200]
        where = f"after row {number - 1}: " if number else ""
        bad.append(
            (f"{path}#row{number}" if number else str(path), f"{where}unreadable {what} data: {detail}")
        )
        return
    if number == 0:
        bad.append((str(path), "empty table: no rows"))


def _table_row(row: dict, config: SampleConfig) -> dict:
    """A table row as a record row: bounded like a JSON line (its text and nesting, media bytes aside),
    null columns and null struct fields dropped (Arrow gives every part of a list of structs every field
    any part has), and ``text`` taken as the caption of an image/video row without one."""
    depth, size, stack = 0, 0, [(row, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, str):
            size += len(item.encode("utf-8", "surrogatepass"))
    if depth > config.max_json_depth:
        raise BadRecord(over_bound("max_json_depth", f"nesting depth {depth:,}", config.max_json_depth))
    if size > config.max_line_bytes:
        bound = over_bound("max_line_bytes", f"{size:,} bytes of text", config.max_line_bytes, " bytes")
        raise BadRecord(bound)
    out = {k: _drop_nulls(v) for k, v in row.items() if v is not None}
    if "caption" not in out and "text" in out and any(k in out for k in _MEDIA_KINDS):
        out["caption"] = out.pop("text")
    return out


def _drop_nulls(value: object) -> object:
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    if isinstance(value, dict) and not {"bytes", "path"} >= set(value):  # an image struct stays as it is
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value


def _text_record(
    path: Path, stream: BinaryIO, compression: str, bad: list[tuple[str, str]], config: SampleConfig
) -> Record | None:
    try:
        raw = stream.read(config.max_text_file_bytes + 1)
    except _STREAM_ERRORS as exc:
        bad.append((str(path), _stream_error(exc, compression)))
        return None
    if len(raw) > config.max_text_file_bytes:
        size = f"{path.stat().st_size:,} bytes" if not compression else f"more than that after {compression}"
        bad.append((str(path), over_bound("max_text_file_bytes", size, config.max_text_file_bytes, " bytes")))
        return None
    if (nul := raw.find(b"\x00")) >= 0:
        bad.append((str(path), f"NUL byte at offset {nul}: binary data, not text"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad.append((str(path), f"invalid UTF-8 at byte {exc.start}"))
        return None
    if not text.strip():
        bad.append((str(path), "empty text file"))
        return None
    return Record(uri=str(path), source=path.parent.name, task="text", text=text)


def _optional_string(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRecord(f"'{key}' must be a string, got {type(value).__name__}")
    return value or None


def _check_strings(value: object) -> None:
    """No NUL character in any key or string of the record (a ``\\u0000`` escape decodes to one). The
    depth is bounded before parsing, so walking with a stack is cheap and cannot run away."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise BadRecord("NUL character (\\u0000) in a string: binary data, not text")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_message(index: int, message: object) -> dict[str, int]:
    """Type checks of one message; returns how many parts of each media kind it holds."""
    if not isinstance(message, dict):
        raise BadRecord(f"message {index}: expected an object, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise BadRecord(f"message {index}: role must be one of {sorted(_ROLES)}, got {role!r}"[:300])
    content = message.get("content")
    if isinstance(content, str):
        return {}
    if not isinstance(content, list):
        raise BadRecord(
            f"message {index}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    counts = dict.fromkeys(_MEDIA_KINDS, 0)
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind not in _PART_TYPES:
            shown = kind if isinstance(part, dict) else type(part).__name__
            raise BadRecord(
                f"message {index}, part {number}: content must be a string or a list of parts "
                f"typed {list(_PART_TYPES)}, got {shown!r}"[:300]
            )
        if kind == "text" and not isinstance(part.get("text"), str):
            raise BadRecord(f"message {index}, part {number}: a text part needs a string 'text'")
        if kind in counts:
            if not _is_media_value(part.get(kind)):
                raise BadRecord(f"message {index}, part {number}: {kind} part has no path")
            counts[kind] += 1
    return counts


def _is_media_value(value: object) -> bool:
    """A path, bytes, a ``{"bytes", "path"}`` struct or a spooled file: what a media part may hold."""
    if isinstance(value, dict):
        return _is_media_value(value.get("bytes")) or _is_media_value(value.get("path"))
    return isinstance(value, Embedded) or (isinstance(value, str | bytes) and len(value) > 0)


def _record(
    row,
    uri: str,
    default_source: str,
    config: SampleConfig = SampleConfig(),
    spool: MediaSpool | None = None,
) -> Record:
    if not isinstance(row, dict):
        raise BadRecord(f"expected a JSON object, got {type(row).__name__}")
    _check_strings(row)
    source = _optional_string(row, "source") or default_source
    task = _optional_string(row, "task")
    if "conversations" in row and "messages" not in row:
        row = {**row, "messages": _llava_messages(row, config)}
    elif "messages" in row and any(f"{kind}s" in row for kind in _MEDIA_KINDS):
        row = {**row, "messages": _fill_media_parts(row)}
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("'messages' must be a non-empty list")
        if len(messages) > config.max_messages:
            raise BadRecord(over_bound("max_messages", f"{len(messages):,} messages", config.max_messages))
        media = dict.fromkeys(_MEDIA_KINDS, 0)
        for index, message in enumerate(messages):
            for kind, n in _check_message(index, message).items():
                media[kind] += n
        for kind, limit in (
            ("image", config.max_images_per_record),
            ("video", config.max_videos_per_record),
        ):
            if media[kind] > limit:
                raise BadRecord(over_bound(f"max_{kind}s_per_record", f"{media[kind]:,} {kind}s", limit))
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("no assistant turn: nothing to train on")
        messages, embedded = _materialise_media(messages, config, spool)
        return Record(
            uri=uri, source=source, task=task or "conversation", messages=messages, embedded=embedded
        )
    if "caption" in row:
        kinds = [k for k in _MEDIA_KINDS if k in row]
        if len(kinds) != 1 or not isinstance(row["caption"], str) or not row["caption"].strip():
            raise BadRecord("a caption pair needs exactly one of 'image'/'video' and a non-empty 'caption'")
        if not _is_media_value(row[kinds[0]]):
            raise BadRecord(f"caption pair: '{kinds[0]}' must be a path (a non-empty string)")
        limit = config.max_images_per_record if kinds[0] == "image" else config.max_videos_per_record
        if limit < 1:
            raise BadRecord(over_bound(f"max_{kinds[0]}s_per_record", f"1 {kinds[0]}", limit))
        media = {"type": kinds[0], kinds[0]: row[kinds[0]]}
        messages = [{"role": "user", "content": [media]}, {"role": "assistant", "content": row["caption"]}]
        messages, embedded = _materialise_media(messages, config, spool)
        return Record(uri=uri, source=source, task="caption", messages=messages, embedded=embedded)
    raise BadRecord("neither 'messages' nor a caption pair ('image'/'video' + 'caption')")


# LLaVA/ShareGPT speakers; ShareGPT dumps also use "human"/"gpt", chat exports "user"/"assistant".
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_PLACEHOLDER = re.compile(r"<(image|video)>")


def _listed_media(row: dict, kind: str) -> tuple[str, list]:
    """The media a row lists for ``kind`` (``image``/``images``, ``video``/``videos``) and the field."""
    fields = [name for name in (kind, f"{kind}s") if row.get(name) is not None]
    if len(fields) > 1:
        raise BadRecord(f"both '{kind}' and '{kind}s' are given")
    if not fields:
        return f"{kind}s", []
    value = row[fields[0]]
    return fields[0], (list(value) if isinstance(value, list | tuple) else [value])


def _check_listed(row: dict, kind: str, limit: int) -> tuple[str, list]:
    name, listed = _listed_media(row, kind)
    if len(listed) > limit:  # before anything is copied to the spool
        raise BadRecord(over_bound(f"max_{kind}s_per_record", f"{len(listed):,} {kind}s", limit))
    return name, listed


def _llava_messages(row: dict, config: SampleConfig) -> list[dict]:
    """LLaVA/ShareGPT ``conversations`` (``from``/``value`` turns, ``<image>``/``<video>`` placeholders in
    the text) as Keye messages: each placeholder becomes a media part taking the record's next image/video
    (``image``/``images``, ``video``/``videos``: one path or a list), in order; the text around it becomes
    text parts (the newline LLaVA puts between a placeholder and the question is dropped). Placeholders and
    listed media must agree in number, kind by kind."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise BadRecord("'conversations' must be a non-empty list")
    if len(turns) > config.max_messages:
        raise BadRecord(over_bound("max_messages", f"{len(turns):,} messages", config.max_messages))
    listed = {
        kind: _check_listed(row, kind, limit)
        for kind, limit in (("image", config.max_images_per_record), ("video", config.max_videos_per_record))
    }
    messages, used = [], dict.fromkeys(_MEDIA_KINDS, 0)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"conversation turn {i}: expected an object, got {type(turn).__name__}")
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or speaker.lower() not in _LLAVA_ROLES:
            raise BadRecord(
                f"conversation turn {i}: 'from' must be one of {sorted(_LLAVA_ROLES)}, got {speaker!r}"[:300]
            )
        if not isinstance(value, str):
            raise BadRecord(f"conversation turn {i}: 'value' must be a string, got {type(value).__name__}")
        pieces = _PLACEHOLDER.split(value)
        if len(pieces) == 1:
            content: str | list = value
        else:
            content = []
            for n, piece in enumerate(pieces):
                if n % 2:
                    kind = piece
                    _, media = listed[kind]
                    content.append(
                        {"type": kind, kind: media[used[kind]] if used[kind] < len(media) else None}
                    )
                    used[kind] += 1
                    continue
                if n > 0:
                    piece = piece.removeprefix("\n")
                if n < len(pieces) - 1:
                    piece = piece.removesuffix("\n")
                if piece.strip():
                    content.append({"type": "text", "text": piece})
        messages.append({"role": _LLAVA_ROLES[speaker.lower()], "content": content})
    for kind in _MEDIA_KINDS:
        name, media = listed[kind]
        if used[kind] != len(media):
            raise BadRecord(
                f"{used[kind]} <{kind}> placeholder(s) in 'conversations' but {len(media)} {kind}(s) "
                f"in '{name}'"
            )
    return messages


def _fill_media_parts(row: dict) -> list:
    """``messages`` whose media parts carry no path of their own (``{"type": "image"}``, as TRL and many
    Hugging Face datasets write them) take the row's ``images``/``videos`` in order; counts must agree."""
    messages = row["messages"]
    if not isinstance(messages, list):
        return messages
    for kind in _MEDIA_KINDS:
        name, media = _listed_media(row, kind)
        empty = [
            part
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), list)
            for part in m["content"]
            if isinstance(part, dict) and part.get("type") == kind and part.get(kind) is None
        ]
        if len(empty) != len(media):
            raise BadRecord(
                f"{len(empty)} {kind} part(s) without a path but {len(media)} {kind}(s) in '{name}'"
            )
        for part, value in zip(empty, media):
            part[kind] = value
    return messages


def _materialise_media(
    messages: list[dict], config: SampleConfig, spool: MediaSpool | None
) -> tuple[list[dict], dict[int, Path]]:
    """The messages with every media part naming its media by a string (what is stored and hashed), and the
    files of the media the source held inside it, copied to the spool, by part position."""
    embedded: dict[int, Path] = {}
    position = 0
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind in _MEDIA_KINDS:
                    name, file = _media_file(part[kind], kind, position, config, spool)
                    if file is not None:
                        embedded[position] = file
                    part = {**part, kind: name}
                    position += 1
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out, embedded


def _media_file(
    value: object, kind: str, position: int, config: SampleConfig, spool: MediaSpool | None
) -> tuple[str, Path | None]:
    """(the name a media value goes by, its spooled file or None for a path to resolve)."""
    if isinstance(value, Embedded):
        return value.name, value.path
    data, name = value, None
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
        if name is not None and not isinstance(name, str):
            raise BadRecord(f"{kind} {position}: 'path' must be a string, got {type(name).__name__}")
        if not data:
            return name, None
    if isinstance(data, str):
        return data, None
    if not isinstance(data, bytes):
        raise BadRecord(
            f"{kind} {position}: expected a path, bytes or {{'bytes', 'path'}}, got {type(data).__name__}"
        )
    if len(data) > config.max_embedded_media_bytes:
        limit = config.max_embedded_media_bytes
        raise BadRecord(over_bound("max_embedded_media_bytes", f"{len(data):,} bytes", limit, " bytes"))
    if spool is None:
        raise BadRecord(f"{kind} {position}: media bytes given where only paths are taken")
    file = spool.put_bytes(data, name or "")
    return Path(name).name if name else file.name, file


def _media_parts(record: Record):
    for message in record.messages or []:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if isinstance(part, dict) and part.get("type") in ("image", "video"):
                    yield part


def resolve_media(part: dict, base: Path, source_root: Path) -> Path:
    """The file a media part names, checked to exist and to stay inside the source root."""
    kind = part["type"]
    value = part.get(kind)
    if not isinstance(value, str) or not value:
        raise BadRecord(f"{kind} part has no path")
    value = value.removeprefix("file://")
    shown = repr(value) if len(value) <= 200 else f"{value[:200]!r}… ({len(value):,} characters)"
    if "\x00" in value:
        raise BadRecord(f"{kind} path {shown} holds a NUL character")
    try:
        # resolve() follows symlinks, so a link inside the root that points outside it is caught below.
        path = (base / value).resolve() if not Path(value).is_absolute() else Path(value).resolve()
        if not path.is_relative_to(source_root.resolve()):
            raise BadRecord(f"{kind} path {shown} is outside the source root {source_root}")
        if not path.is_file():
            raise BadRecord(f"{kind} file {shown} does not exist (looked at {path})")
    except OSError as exc:  # a name too long for the filesystem, a symlink loop, a permission denied
        raise BadRecord(f"{kind} path {shown} cannot be opened: {exc.strerror or exc}") from None
    return path


def referenced_media(
    paths: list[str],
    source_root: str,
    config: SampleConfig = SampleConfig(),
    spool: MediaSpool | None = None,
) -> dict[str, list[str]]:
    """Every video and image file the sources reference (valid references only), for media ingestion:
    media stored inside a source (tar members, table bytes) are copied to ``spool`` and listed there."""
    root = Path(source_root)
    media: dict[str, set[str]] = {"video": set(), "image": set()}
    spool = default_spool() if spool is None else spool
    for path in discover_sources(paths):
        if source_formats.source_kind(path) == "txt":
            continue
        for record in iter_records(path, [], config, spool):
            for position, part in enumerate(_media_parts(record)):
                try:
                    file = record.embedded.get(position) or resolve_media(
                        part, record.base or path.parent, root
                    )
                    media[part["type"]].add(str(file))
                except BadRecord:
                    pass  # reported when the samples are built
    return {kind: sorted(uris) for kind, uris in media.items()}


class _MediaIndex:
    """Resolves a media file to its pre-tokenised sample (by content hash) and builds its token ids."""

    def __init__(self, tokenizer, slowfast: SlowFastConfig, image_config: ImageConfig, root: str | None):
        self.tokenizer, self.slowfast, self.image_config, self.root = tokenizer, slowfast, image_config, root
        self._hashes: dict[Path, str] = {}
        self._rows: dict[str, dict | None] = {}
        self._gated: set[tuple[str, str]] | None = None

    def digest(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = content_hash(str(path))[0]
        return self._hashes[path]

    def sample(self, kind: str, path: Path, name: str | None = None) -> dict:
        """The media's pre-tokenised sample row; ``name`` is what a reason calls it (default: the file's
        name; media stored inside a source go by the name the source gave them)."""
        digest = self.digest(path)
        if kind == "video":
            key, table = pretokenize.sample_id(digest, self.slowfast), "video_samples"
            columns = ["sample_id", "config_hash", "frame_types", "timestamps", "slow_tokens", "fast_tokens"]
        else:
            key, table = images.sample_id(digest, self.image_config), "image_samples"
            columns = ["sample_id", "config_hash", "num_tokens"]
        if key not in self._rows:
            found = None
            if tables.exists(table, self.root):
                rows = (
                    tables.open_table(table, root=self.root)
                    .to_table(columns=columns, filter=pc.field("sample_id") == key)
                    .to_pylist()
                )
                found = rows[0] if rows else None
            if found is not None and (digest, found["config_hash"]) in self._gate_quarantined():
                found = None  # a gate quarantined this very sample: no conversation may use it
            self._rows[key] = found
        if self._rows[key] is None:
            raise BadRecord(
                f"{kind} {name or path.name} has no pre-tokenised sample ({self._why(path, digest)})"
            )
        return self._rows[key]

    def _gate_quarantined(self) -> set[tuple[str, str]]:
        """(content hash, config hash) of every media sample a gate quarantined, read once per build: a scan
        of the quarantine table per media file would cost its size for each."""
        if self._gated is None:
            rows = []
            if tables.exists("quarantine", self.root):
                rows = (
                    tables.open_table("quarantine", root=self.root)
                    .to_table(
                        columns=["content_hash", "config_hash"],
                        filter=f"stage LIKE '{tables.GATE_STAGE_PREFIX}%'",  # a constant: no data in it
                    )
                    .to_pylist()
                )
            self._gated = {(r["content_hash"], r["config_hash"]) for r in rows}
        return self._gated

    def _why(self, path: Path, digest: str) -> str:
        if tables.exists("quarantine", self.root):
            q = (
                tables.open_table("quarantine", root=self.root)
                .to_table(
                    columns=["reason"],
                    filter=(pc.field("content_hash") == digest) | (pc.field("uri") == str(path)),
                )
                .column("reason")
                .to_pylist()
            )
            if q:
                return f"quarantined: {q[0]}"
        return "not ingested"

    def ids(self, kind: str, row: dict) -> list[int]:
        if kind == "video":
            return token_stream.video_ids(
                self.tokenizer, row["frame_types"], row["timestamps"], row["slow_tokens"], row["fast_tokens"]
            )
        return token_stream.image_ids(self.tokenizer, row["num_tokens"])


def samples_config_hash(
    tokenizer, slowfast: SlowFastConfig, image_config: ImageConfig, config: SampleConfig
) -> str:
    """Everything that changes a sample's tokens: a change re-counts, an unchanged setting skips."""
    return hash_config(
        {
            "tokenizer": tokenizer_version(tokenizer),
            # The chat layout is not in the tokenizer's files: its default system turn changes every sample.
            "default_system_prompt": DEFAULT_SYSTEM_PROMPT,
            "slowfast": slowfast.config_hash(),
            "image": image_config.config_hash(),
            "samples": hash_config({name: getattr(config, name) for name in _TOKEN_FIELDS}),
        }
    )


def build_train_samples(
    paths: list[str],
    source_root: str,
    slowfast: SlowFastConfig,
    image_config: ImageConfig = DEFAULT_IMAGE_CONFIG,
    config: SampleConfig = SampleConfig(),
    root: str | None = None,
    on_item: Callable[[], None] | None = None,
    spool: MediaSpool | None = None,
) -> SampleReport:
    """Turn every record under ``paths`` into a ``train_samples`` row (``on_item`` is called once per
    source file). Sources are streamed and rows committed every few thousand, so a source of any length
    never sits whole in memory."""
    tokenizer = load_tokenizer(config.tokenizer_path)
    chash = samples_config_hash(tokenizer, slowfast, image_config, config)
    index = _MediaIndex(tokenizer, slowfast, image_config, root)
    report = SampleReport()
    rows: dict[str, dict] = {}
    bad: list[tuple[str, str]] = []

    def commit() -> None:
        present = tables.existing_keys("train_samples", list(rows), root)
        new = [r for key, r in rows.items() if key not in present]
        kill_point("samples.before_commit")  # the batch's samples counted; none of its rows written
        tables.upsert(
            "quarantine", [tables.quarantine_row(u, why, STAGE, config_hash=chash) for u, why in bad], root
        )
        kill_point("samples.quarantine_committed")  # the batch's quarantine rows written, its samples not
        tables.upsert("train_samples", new, root)
        kill_point("samples.batch_committed")  # the batch's rows all written; later batches not counted
        report.num_written += len(new)
        report.num_already_present += len(rows) - len(new)
        report.quarantined.update(dict(bad))
        for r in new:
            report.tokens_by_modality[r["modality"]] = (
                report.tokens_by_modality.get(r["modality"], 0) + r["num_tokens"]
            )
        rows.clear()
        bad.clear()

    spool = default_spool() if spool is None else spool
    for path in discover_sources(paths):
        for record in iter_records(path, bad, config, spool):
            try:
                for row in _samples(record, path, Path(source_root), index, tokenizer, config, chash):
                    rows[row["sample_id"]] = row  # identical content twice: one sample
            except (BadRecord, BadVideo, TypeError, ValueError) as exc:
                bad.append((record.uri, str(getattr(exc, "reason", exc))))
            report.num_records += 1
            # Commit in batches: one Lance version per few thousand rows, not per small text file, and
            # within a file too (a 100k-record source is never held whole). A crash loses at most the
            # batch in flight, which the rerun recomputes (counting tokens is cheap).
            if len(rows) + len(bad) >= _COMMIT_ROWS:
                commit()
        if on_item:
            on_item()
    commit()
    report.num_quarantined = len(report.quarantined)
    return report


def add_conversations(
    conversations: list[dict],
    source_root: str,
    slowfast: SlowFastConfig,
    image_config: ImageConfig = DEFAULT_IMAGE_CONFIG,
    config: SampleConfig = SampleConfig(),
    root: str | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Conversations made by the platform itself (LongCoT samples, reward-model judgements, rejection-sampled
    answers) as ``train_samples`` rows, through the same token counting and media lookup as files: each dict
    has ``uri`` (where it came from: ``table#id``), ``source``, ``task`` and ``messages`` (media parts by
    path, inside ``source_root``). Returns (uri → sample_id, uri → reason for the ones that could not be
    used); the rows already present are not written again."""
    tokenizer = load_tokenizer(config.tokenizer_path)
    chash = samples_config_hash(tokenizer, slowfast, image_config, config)
    index = _MediaIndex(tokenizer, slowfast, image_config, root)
    base = Path(source_root)
    rows: dict[str, dict] = {}
    ids: dict[str, str] = {}
    bad: dict[str, str] = {}
    for item in conversations:
        try:
            record = _record(
                {k: item[k] for k in ("messages", "source", "task") if k in item},
                item["uri"],
                item.get("source") or "generated",
                config,
            )
            # Media paths resolve against the source root itself (there is no file to be relative to).
            (row,) = _samples(record, base / "conversation.jsonl", base, index, tokenizer, config, chash)
        except (BadRecord, BadVideo, TypeError, ValueError) as exc:
            bad[item["uri"]] = str(getattr(exc, "reason", exc))
            continue
        rows[row["sample_id"]] = row
        ids[item["uri"]] = row["sample_id"]
    present = tables.existing_keys("train_samples", list(rows), root)
    tables.upsert("train_samples", [r for key, r in rows.items() if key not in present], root)
    tables.upsert(
        "quarantine",
        [tables.quarantine_row(u, why, STAGE, config_hash=chash) for u, why in bad.items()],
        root,
    )
    return ids, bad


def _samples(
    record: Record,
    path: Path,
    source_root: Path,
    index: _MediaIndex,
    tokenizer,
    config: SampleConfig,
    chash: str,
) -> list[dict]:
    if record.text is not None:
        chunks = chunk_text(record.text, tokenizer, config)
        if not chunks:
            raise BadRecord(f"text shorter than {config.min_text_tokens} tokens")
        return [
            _row(
                record,
                f"{record.uri}#chunk{n}",
                "text",
                token_stream.render_text(tokenizer, chunk),
                [],
                {"text": chunk},
                chash,
            )
            for n, chunk in enumerate(chunks)
        ]
    media_rows: dict[int, tuple[str, dict]] = {}
    media_ids, digests = [], []
    named_by_digest: dict[int, str] = {}  # absolute media paths → their file's digest, for the sample's id
    for position, part in enumerate(_media_parts(record)):
        kind = part["type"]
        file = record.embedded.get(position) or resolve_media(part, record.base or path.parent, source_root)
        row = index.sample(kind, file, part[kind] if position in record.embedded else None)
        media_rows[id(part)] = (kind, row)
        media_ids.append(row["sample_id"])
        digests.append(index.digest(file))
        if isinstance(part.get(kind), str) and Path(part[kind].removeprefix("file://")).is_absolute():
            named_by_digest[id(part)] = digests[-1]
    rendered = token_stream.render_conversation(
        tokenizer, record.messages, lambda part: index.ids(*media_rows[id(part)])
    )
    kinds = {kind for kind, _ in media_rows.values()}
    modality = "video" if "video" in kinds else "image" if "image" in kinds else "text"
    return [
        _row(
            record,
            record.uri,
            modality,
            rendered,
            media_ids,
            {"messages": _without_absolute_paths(record.messages, named_by_digest), "media": digests},
            chash,
        )
    ]


def _without_absolute_paths(messages: list[dict], named_by_digest: dict[int, str]) -> list[dict]:
    """`messages` as a sample's id hashes them: a media part given by an absolute path is named by its file's
    digest instead. The conversations post-training writes (reward-model judgements, RL items' answers,
    LongCoT and rejection-sampled rows) name their media by absolute path, so the same conversation had
    another id in every home, and the mixtures ordered by id another order. Relative paths (what source
    files hold) stay as written, so those samples keep their ids."""
    if not named_by_digest:
        return messages
    return [
        {
            **message,
            "content": [
                {**part, part["type"]: named_by_digest[id(part)]} if id(part) in named_by_digest else part
                for part in message["content"]
            ],
        }
        if isinstance(message.get("content"), list)
        else message
        for message in messages
    ]


def chunk_text(text: str, tokenizer, config: SampleConfig) -> list[str]:
    """Paragraph-aligned chunks of at most ``max_text_tokens`` tokens (EOS included).

    Pieces are tokenised once; a chunk's length is bounded by the sum of its pieces plus the separator's
    tokens (the pre-tokenizer splits at whitespace, so no token spans a paragraph break)."""
    limit = config.max_text_tokens - 1
    sep = len(tokenizer("\n\n")["input_ids"])
    pieces: list[tuple[str, int]] = []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        n = len(tokenizer(para)["input_ids"])
        if n <= limit:
            pieces.append((para, n))
        else:  # an overlong paragraph: split at sentence ends
            for sentence in (s.strip() for s in para.split(". ")):
                if sentence:
                    pieces.append((sentence + ".", len(tokenizer(sentence + ".")["input_ids"])))
    chunks: list[tuple[str, int]] = []
    current, size = "", 0
    for piece, n in pieces:
        if current and size + sep + n <= limit:
            current, size = f"{current}\n\n{piece}", size + sep + n
        else:
            if current:
                chunks.append((current, size))
            current, size = piece, n
    if current:
        chunks.append((current, size))
    return [c for c, n in chunks if n >= config.min_text_tokens]


def _row(
    record: Record, uri: str, modality: str, rendered, media_ids: list[str], content: dict, chash: str
) -> dict:
    body = json.dumps(content, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return {
        # Content, not position, names a sample: the same conversation in two files is one sample.
        "sample_id": f"{digest[:20]}-{chash}",
        "source": record.source,
        "task": record.task,
        "modality": modality,
        "num_tokens": len(rendered.input_ids),
        "num_text_tokens": rendered.num_text_tokens,
        "num_vision_tokens": rendered.num_vision_tokens,
        "media_ids": media_ids,
        "source_uri": uri,
        "content_hash": digest,
        "config_hash": chash,
        "messages": json.dumps(
            record.messages
            if record.messages is not None
            else [{"role": "text", "content": content["text"]}],
            ensure_ascii=False,
        ),
        "created_at": tables.now(),
    }
