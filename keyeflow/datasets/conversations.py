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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from keyeflow.config import check_int, invalid
from keyeflow.config import config_hash as hash_config
from keyeflow.datasets import images, pretokenize, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.slowfast import SlowFastConfig
from keyeflow.datasets.video import BadVideo, content_hash
from keyeflow.faults import kill_point
from keyeflow.model import token_stream
from keyeflow.model.tokenizer import load_tokenizer, tokenizer_version

STAGE = "ingest_samples"
SOURCE_SUFFIXES = {".jsonl", ".txt"}
_ROLES = {"system", "user", "assistant"}
DEFAULT_IMAGE_CONFIG = ImageConfig()  # frozen: one shared default for the builders' signatures
_COMMIT_ROWS = 5000


@dataclass(frozen=True)
class SampleConfig:
    """How records become training samples (the media configs are passed beside it)."""

    max_text_tokens: int = 2048  # plain-text chunk size; longer paragraphs are split on sentences
    min_text_tokens: int = 8  # shorter chunks carry too little to train on and are dropped with a reason
    tokenizer_path: str | None = None  # a real checkpoint's tokenizer; None = the shipped one

    def __post_init__(self):
        for name in ("min_text_tokens", "max_text_tokens"):
            object.__setattr__(self, name, check_int("SampleConfig", name, getattr(self, name), minimum=1))
        if self.max_text_tokens <= self.min_text_tokens:
            raise invalid(
                "SampleConfig",
                "max_text_tokens",
                self.max_text_tokens,
                f"must be > min_text_tokens ({self.min_text_tokens})",
            )


class BadRecord(ValueError):
    pass


@dataclass
class Record:
    uri: str  # file#Lline for JSONL rows, file#chunkN for text
    source: str
    task: str
    messages: list[dict] | None = None
    text: str | None = None


@dataclass
class SampleReport:
    num_records: int = 0
    num_written: int = 0
    num_already_present: int = 0
    num_quarantined: int = 0
    tokens_by_modality: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)


def discover_sources(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def read_records(path: Path, bad: list[tuple[str, str]]) -> list[Record]:
    """Parse one source file; every unusable line/file is appended to ``bad`` as (uri, reason)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        bad.append((str(path), f"unreadable: {exc.strerror or exc}"))
        return []
    if path.suffix == ".txt":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.append((str(path), f"invalid UTF-8 at byte {exc.start}"))
            return []
        if not text.strip():
            bad.append((str(path), "empty text file"))
            return []
        return [Record(uri=str(path), source=path.parent.name, task="text", text=text)]
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        uri = f"{path}#L{number}"
        try:
            row = json.loads(line.decode("utf-8"))
            records.append(_record(row, uri, path.stem))
        except UnicodeDecodeError as exc:
            bad.append((uri, f"invalid UTF-8 at line {number}, byte {exc.start} of the line"))
        except json.JSONDecodeError as exc:
            bad.append((uri, f"invalid JSON at line {number}: {exc.msg} (column {exc.colno})"))
        except BadRecord as exc:
            bad.append((uri, f"line {number}: {exc}"))
    return records


def _record(row, uri: str, default_source: str) -> Record:
    if not isinstance(row, dict):
        raise BadRecord(f"expected a JSON object, got {type(row).__name__}")
    source = str(row.get("source") or default_source)
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("'messages' must be a non-empty list")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES:
                role = message.get("role") if isinstance(message, dict) else message
                raise BadRecord(f"message {index}: role must be one of {sorted(_ROLES)}, got {role!r}")
            if not isinstance(message.get("content"), (str, list)):
                raise BadRecord(f"message {index}: content must be a string or a list of parts")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("no assistant turn: nothing to train on")
        return Record(uri=uri, source=source, task=str(row.get("task") or "conversation"), messages=messages)
    if "caption" in row:
        kinds = [k for k in ("image", "video") if k in row]
        if len(kinds) != 1 or not isinstance(row["caption"], str) or not row["caption"].strip():
            raise BadRecord("a caption pair needs exactly one of 'image'/'video' and a non-empty 'caption'")
        media = {"type": kinds[0], kinds[0]: row[kinds[0]]}
        messages = [{"role": "user", "content": [media]}, {"role": "assistant", "content": row["caption"]}]
        return Record(uri=uri, source=source, task="caption", messages=messages)
    raise BadRecord("neither 'messages' nor a caption pair ('image'/'video' + 'caption')")


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
    path = (base / value).resolve() if not Path(value).is_absolute() else Path(value).resolve()
    if not path.is_relative_to(source_root.resolve()):
        raise BadRecord(f"{kind} path {value!r} is outside the source root {source_root}")
    if not path.is_file():
        raise BadRecord(f"{kind} file {value!r} does not exist (looked at {path})")
    return path


def referenced_media(paths: list[str], source_root: str) -> dict[str, list[str]]:
    """Every video and image file the sources reference (valid references only), for media ingestion."""
    root = Path(source_root)
    media: dict[str, set[str]] = {"video": set(), "image": set()}
    for path in discover_sources(paths):
        if path.suffix != ".jsonl":
            continue
        for record in read_records(path, []):
            for part in _media_parts(record):
                try:
                    media[part["type"]].add(str(resolve_media(part, path.parent, root)))
                except BadRecord:
                    pass  # reported when the samples are built
    return {kind: sorted(uris) for kind, uris in media.items()}


class _MediaIndex:
    """Resolves a media file to its pre-tokenised sample (by content hash) and builds its token ids."""

    def __init__(self, tokenizer, slowfast: SlowFastConfig, image_config: ImageConfig, root: str | None):
        self.tokenizer, self.slowfast, self.image_config, self.root = tokenizer, slowfast, image_config, root
        self._hashes: dict[Path, str] = {}
        self._rows: dict[str, dict | None] = {}

    def digest(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = content_hash(str(path))[0]
        return self._hashes[path]

    def sample(self, kind: str, path: Path) -> dict:
        digest = self.digest(path)
        if kind == "video":
            key, table = pretokenize.sample_id(digest, self.slowfast), "video_samples"
            columns = ["sample_id", "frame_types", "timestamps", "slow_tokens", "fast_tokens"]
        else:
            key, table = images.sample_id(digest, self.image_config), "image_samples"
            columns = ["sample_id", "num_tokens"]
        if key not in self._rows:
            found = None
            if tables.exists(table, self.root):
                rows = (
                    tables.open_table(table, root=self.root)
                    .to_table(columns=columns, filter=pc.field("sample_id") == key)
                    .to_pylist()
                )
                found = rows[0] if rows else None
            self._rows[key] = found
        if self._rows[key] is None:
            raise BadRecord(f"{kind} {path.name} has no pre-tokenised sample ({self._why(path, digest)})")
        return self._rows[key]

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
            "slowfast": slowfast.config_hash(),
            "image": image_config.config_hash(),
            "samples": hash_config(config),
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
) -> SampleReport:
    """Turn every record under ``paths`` into a ``train_samples`` row (``on_item`` is called once per
    source file)."""
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

    for path in discover_sources(paths):
        for record in read_records(path, bad):
            try:
                for row in _samples(record, path, Path(source_root), index, tokenizer, config, chash):
                    rows[row["sample_id"]] = row  # identical content twice: one sample
            except (BadRecord, BadVideo, TypeError, ValueError) as exc:
                bad.append((record.uri, str(getattr(exc, "reason", exc))))
            report.num_records += 1
        # Commit in batches: one Lance version per few thousand rows, not per small text file. A crash
        # loses at most the batch in flight, which the rerun recomputes (counting tokens is cheap).
        if len(rows) >= _COMMIT_ROWS:
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
    has ``uri`` (where it came from: ``table#id``), ``source``, ``task`` and ``messages`` (media parts by path,
    inside ``source_root``). Returns (uri → sample_id, uri → reason for the ones that could not be used); the
    rows already present are not written again."""
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
    for part in _media_parts(record):
        kind = part["type"]
        file = resolve_media(part, path.parent, source_root)
        row = index.sample(kind, file)
        media_rows[id(part)] = (kind, row)
        media_ids.append(row["sample_id"])
        digests.append(index.digest(file))
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
            {"messages": record.messages, "media": digests},
            chash,
        )
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
