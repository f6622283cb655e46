"""Lance tables: schemas, idempotent writes, pinned reads.

Every table lives at ``<tables root>/<name>.lance``, on local disk or on S3-compatible storage
(``KEYEFLOW_TABLES_URI=s3://bucket/prefix``). Open and write Lance datasets through :func:`dataset` and
:func:`write_dataset`, never ``lance.*`` directly: they add the storage options (endpoint, region,
credentials) that :func:`keyeflow.config.storage_options` reads from the environment.

Writes go through :func:`upsert`, a Lance ``merge_insert`` keyed on the table's primary key: a commit
is one transaction, and re-writing rows that are already there inserts nothing, so a rerun after a
crash never duplicates a row. Readers pin a table by ``TableRef`` (URI + version) so a downstream step
sees exactly the rows its upstream produced.

Several processes may write one data root at once (two ``keyeflow ingest`` over overlapping folders,
``ingest`` while ``mix`` runs). Lance alone does not keep a key unique then: two ``merge_insert`` commits
that insert the same new key both succeed. So every write here (i) holds the table's write lock, an
``flock`` on ``<tables root>/.locks/<table>.lock`` for a local root, while it reads which keys are there
and commits, and (ii) marks the primary key column as Lance's unenforced primary key, with which Lance
itself detects a concurrent insert of the same key and retries (what protects keyed writes on an object
store, where there is no lock); a commit that still conflicts (``lance.commit.CommitConflictError``) is
re-read and re-applied. A failed commit (a full disk, a killed process) writes no new manifest, so the
table stays readable at its previous version and the rerun writes the rows again.

Schemas (documented here because ``keyeflow sql`` users read them):

``videos`` — one row per distinct video content (primary key ``video_id``)
    video_id (sha256 of the file bytes), uri, size_bytes, container, codec, pix_fmt, bit_depth,
    width/height (as displayed, after rotation), coded_width/coded_height, rotation (degrees),
    fps (average), duration_s, num_frames (container's count, 0 if unknown), is_vfr, ingested_at.

``video_samples`` — one row per (video, Slow-Fast config) (primary key ``sample_id``)
    sample_id, video_id, uri, config_hash, preset, sampling_fps, num_frames, num_slow, num_fast,
    frame_types (list<int8>: 0 slow, 1 fast), timestamps (list<float32>, seconds),
    slow_height/slow_width, fast_height/fast_width (pixels, multiples of 28),
    slow_tokens/fast_tokens (LLM tokens per frame), total_tokens (vision tokens of the video),
    token_budget, created_at.

``video_frames`` — pixel patches, one row per sampled frame (primary key ``frame_id``)
    frame_id (``<sample_id>/<index>``), sample_id, frame_index, frame_type, timestamp, grid_h, grid_w
    (in 14-px patches), num_tokens, patches (uint8 bytes: grid_h*grid_w rows of 3*14*14 values, rows
    ordered so that each 2×2 merge group is contiguous, values in channel-major order).

``images`` — one row per distinct still image (primary key ``image_id``)
    image_id (sha256 of the file bytes), uri, size_bytes, format (JPEG, PNG, WEBP, BMP, GIF), mode
    (Pillow's pixel mode as stored: RGB, L, P, RGBA, LA, I;16, CMYK, ...), width/height (as displayed,
    after the EXIF orientation is applied), exif_orientation (the tag as found: 0 none, 1 upright, 2-8
    the EXIF transforms), ingested_at.

``image_samples`` — one row per (image, image config), pixels included (primary key ``sample_id``)
    sample_id (``<image_id[:16]>-<config_hash>``), image_id, uri, config_hash, height/width (resized,
    multiples of 28), grid_h/grid_w (in 14-px patches), num_tokens (LLM tokens, grid_h*grid_w/4),
    patches (uint8 bytes, the same layout as ``video_frames.patches``), created_at.

``quarantine`` — every input we did not take, with why (primary key ``quarantine_id``)
    quarantine_id, uri, reason, stage, content_hash (empty if unreadable), config_hash, detected_at.

``gate_results`` — every gate verdict (primary key ``gate_result_id``: gate + table version + run)
    gate, table_uri, table_version, passed, num_rows, failures (JSON object: max_failing_share,
    num_failing_rows, num_quarantined, and the list of failed checks, each with check, expectation, column,
    level, action, unexpected_count, examples), run_id (MLflow), checked_at.

``train_samples`` — one row per training sample, any modality (primary key ``sample_id``)
    sample_id, source (dataset name, e.g. ``captions-coco-like``), task (caption, ocr, grounding, vqa,
    interleaved, text, conversation, …), modality (``video`` if it holds any video, else ``image`` if it
    holds any image, else ``text``), num_tokens (exact: text + vision tokens), num_text_tokens,
    num_vision_tokens, media_ids (list<string>: the video_samples / image_samples sample ids it uses),
    source_uri, content_hash, config_hash, messages (JSON), created_at.

``mixtures`` — the samples a pre-training stage uses, one row per (mixture, sample) (primary key
``mixture_row_id`` = ``<mixture_id>/<sample_id>``)
    mixture_row_id, mixture_id (hash of stage, mixture config incl. seed, and the input table versions),
    stage, sample_id, modality, source, num_tokens, repeats (>= 1: times the sample is used per epoch),
    order (position in the epoch's seeded shuffle; quote it in SQL: ``"order"``),
    train_samples_version (the pinned input version), created_at. Shares actually reached:
    ``select modality, sum(num_tokens * repeats) from mixtures where mixture_id = '…' group by 1``.

``longcot_questions`` — LongCoT questions, deduped (primary key ``question_id``: normalised text + media
hashes)
    question_id, source, source_uri (file#Lline, or ``merge:…`` for merged questions), domain (math, stem,
    ocr, grounding, counting, gui, business), question (the text paths are generated for), original_question,
    reference, solution (JSON reference solution: steps, concept, method, tool, answer_forms, wrong_answers;
    null when the question gives none), media (JSON list of {type, path, hash}), num_media, rewrite (none,
    harder, merged),
    rewrite_note (why a rewrite was kept or discarded), config_hash, created_at.

``longcot_paths`` — every generated reasoning path and what happened to it (primary key ``path_id`` =
``<question_id>/<gen_config_hash>/<k>``)
    question_id, domain, gen_config_hash, path_index, text, finish_reason, num_tokens; answer level: answer,
    answer_ok, answer_method, answer_reason, format_problem; confidence (response, in [0, 1]),
    step_confidences (list<double>), num_steps, confidence_note, selected; process level: judge, judge_notes,
    logical_consistency, factual_accuracy, relevance, redundancy, step_scores (JSON); grade (A, B, C; null
    if dropped at selection before grading), needs_review, grade_reasons; review: review_action, reviewer;
    response (the kept text in think/answer form), score (1–5), score_reason, repeats; status (selected,
    review, kept, dropped), stage (generate, select, assess, review, score: where it is or was dropped),
    reason, created_at, updated_at.

``longcot_reviews`` — every review decision, by a person or a policy (primary key ``review_id``)
    review_id, path_id, question_id, grade, review_reason, action (approve, edit, reject), edited_text,
    reviewer, note, source (person, policy), mode (prefect, auto_approve, keep_out), outcome (kept, dropped),
    outcome_reason, flow_run_id, decided_at.

``longcot`` — the LongCoT cold-start set, one row per kept sample (primary key ``sample_id`` = path id)
    sample_id, question_id, domain, source, question, reference, media (JSON), response
    (``<think>…</think><answer>…</answer>``), answer, grade, redundancy, confidence, score, repeats,
    reviewer_action (none, approve, edit), reviewer, reason, judge, messages (JSON, ready for SFT),
    gen_config_hash, created_at.

``rl_hint_levels`` — the hint level every GSPO step trained each item on (primary key ``record_id`` =
``<run_id>/<step>/<item_id>``)
    run_id (the stage's MLflow run), stage (its name), step (1-based), item_id, level (0: solved without a
    hint; k: the lowest hint level with a success; null: unsolved up to the stage's max level, hint sampling
    off, the item without hints, or its reward failed), hint (the hint text at that level), pass_rates (JSON:
    level → share of its rollouts that passed), note (why there is no level), created_at. E.g.
    ``select level, count(*) from rl_hint_levels group by level``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance.commit import CommitConflictError
from lance.optimize import Compaction

from keyeflow.config import get_settings, storage_options
from keyeflow.faults import kill_point

log = logging.getLogger(__name__)

TIMESTAMP = pa.timestamp("us", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    "videos": pa.schema(
        [
            ("video_id", pa.string()),
            ("uri", pa.string()),
            ("size_bytes", pa.int64()),
            ("container", pa.string()),
            ("codec", pa.string()),
            ("pix_fmt", pa.string()),
            ("bit_depth", pa.int32()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("coded_width", pa.int32()),
            ("coded_height", pa.int32()),
            ("rotation", pa.int32()),
            ("fps", pa.float64()),
            ("duration_s", pa.float64()),
            ("num_frames", pa.int64()),
            ("is_vfr", pa.bool_()),
            ("ingested_at", TIMESTAMP),
        ]
    ),
    "video_samples": pa.schema(
        [
            ("sample_id", pa.string()),
            ("video_id", pa.string()),
            ("uri", pa.string()),
            ("config_hash", pa.string()),
            ("preset", pa.string()),
            ("sampling_fps", pa.float64()),
            ("num_frames", pa.int32()),
            ("num_slow", pa.int32()),
            ("num_fast", pa.int32()),
            ("frame_types", pa.list_(pa.int8())),
            ("timestamps", pa.list_(pa.float32())),
            ("slow_height", pa.int32()),
            ("slow_width", pa.int32()),
            ("fast_height", pa.int32()),
            ("fast_width", pa.int32()),
            ("slow_tokens", pa.int32()),
            ("fast_tokens", pa.int32()),
            ("total_tokens", pa.int64()),
            ("token_budget", pa.int64()),
            ("created_at", TIMESTAMP),
        ]
    ),
    "video_frames": pa.schema(
        [
            ("frame_id", pa.string()),
            ("sample_id", pa.string()),
            ("frame_index", pa.int32()),
            ("frame_type", pa.int8()),
            ("timestamp", pa.float32()),
            ("grid_h", pa.int32()),
            ("grid_w", pa.int32()),
            ("num_tokens", pa.int32()),
            ("patches", pa.large_binary()),
        ]
    ),
    "images": pa.schema(
        [
            ("image_id", pa.string()),
            ("uri", pa.string()),
            ("size_bytes", pa.int64()),
            ("format", pa.string()),
            ("mode", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("exif_orientation", pa.int32()),
            ("ingested_at", TIMESTAMP),
        ]
    ),
    "image_samples": pa.schema(
        [
            ("sample_id", pa.string()),
            ("image_id", pa.string()),
            ("uri", pa.string()),
            ("config_hash", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("grid_h", pa.int32()),
            ("grid_w", pa.int32()),
            ("num_tokens", pa.int32()),
            ("patches", pa.large_binary()),
            ("created_at", TIMESTAMP),
        ]
    ),
    "quarantine": pa.schema(
        [
            ("quarantine_id", pa.string()),
            ("uri", pa.string()),
            ("reason", pa.string()),
            ("stage", pa.string()),
            ("content_hash", pa.string()),
            ("config_hash", pa.string()),
            ("detected_at", TIMESTAMP),
        ]
    ),
    "gate_results": pa.schema(
        [
            ("gate_result_id", pa.string()),
            ("gate", pa.string()),
            ("table_uri", pa.string()),
            ("table_version", pa.int64()),
            ("passed", pa.bool_()),
            ("num_rows", pa.int64()),
            ("failures", pa.string()),
            ("run_id", pa.string()),
            ("checked_at", TIMESTAMP),
        ]
    ),
    "train_samples": pa.schema(
        [
            ("sample_id", pa.string()),
            ("source", pa.string()),
            ("task", pa.string()),
            ("modality", pa.string()),
            ("num_tokens", pa.int64()),
            ("num_text_tokens", pa.int64()),
            ("num_vision_tokens", pa.int64()),
            ("media_ids", pa.list_(pa.string())),
            ("source_uri", pa.string()),
            ("content_hash", pa.string()),
            ("config_hash", pa.string()),
            ("messages", pa.string()),
            ("created_at", TIMESTAMP),
        ]
    ),
    "mixtures": pa.schema(
        [
            ("mixture_row_id", pa.string()),
            ("mixture_id", pa.string()),
            ("stage", pa.int32()),
            ("sample_id", pa.string()),
            ("modality", pa.string()),
            ("source", pa.string()),
            ("num_tokens", pa.int64()),
            ("repeats", pa.int32()),
            ("order", pa.int64()),
            ("train_samples_version", pa.int64()),
            ("created_at", TIMESTAMP),
            ("name", pa.string()),  # the mixture's name/variant (stage3-balanced); null in rows before it
        ]
    ),
    "longcot_questions": pa.schema(
        [
            ("question_id", pa.string()),
            ("source", pa.string()),
            ("source_uri", pa.string()),
            ("domain", pa.string()),
            ("question", pa.string()),
            ("original_question", pa.string()),
            ("reference", pa.string()),
            ("solution", pa.string()),
            ("media", pa.string()),
            ("num_media", pa.int32()),
            ("rewrite", pa.string()),
            ("rewrite_note", pa.string()),
            ("config_hash", pa.string()),
            ("created_at", TIMESTAMP),
        ]
    ),
    "longcot_paths": pa.schema(
        [
            ("path_id", pa.string()),
            ("question_id", pa.string()),
            ("domain", pa.string()),
            ("gen_config_hash", pa.string()),
            ("path_index", pa.int32()),
            ("text", pa.string()),
            ("finish_reason", pa.string()),
            ("num_tokens", pa.int32()),
            ("answer", pa.string()),
            ("answer_ok", pa.bool_()),
            ("answer_method", pa.string()),
            ("answer_reason", pa.string()),
            ("format_problem", pa.string()),
            ("confidence", pa.float64()),
            ("step_confidences", pa.list_(pa.float64())),
            ("num_steps", pa.int32()),
            ("confidence_note", pa.string()),
            ("selected", pa.bool_()),
            ("judge", pa.string()),
            ("judge_notes", pa.string()),
            ("logical_consistency", pa.float64()),
            ("factual_accuracy", pa.float64()),
            ("relevance", pa.float64()),
            ("redundancy", pa.float64()),
            ("step_scores", pa.string()),
            ("grade", pa.string()),
            ("needs_review", pa.bool_()),
            ("grade_reasons", pa.string()),
            ("review_action", pa.string()),
            ("reviewer", pa.string()),
            ("response", pa.string()),
            ("score", pa.int32()),
            ("score_reason", pa.string()),
            ("repeats", pa.int32()),
            ("status", pa.string()),
            ("stage", pa.string()),
            ("reason", pa.string()),
            ("created_at", TIMESTAMP),
            ("updated_at", TIMESTAMP),
        ]
    ),
    "longcot_reviews": pa.schema(
        [
            ("review_id", pa.string()),
            ("path_id", pa.string()),
            ("question_id", pa.string()),
            ("grade", pa.string()),
            ("review_reason", pa.string()),
            ("action", pa.string()),
            ("edited_text", pa.string()),
            ("reviewer", pa.string()),
            ("note", pa.string()),
            ("source", pa.string()),
            ("mode", pa.string()),
            ("outcome", pa.string()),
            ("outcome_reason", pa.string()),
            ("flow_run_id", pa.string()),
            ("decided_at", TIMESTAMP),
        ]
    ),
    "longcot": pa.schema(
        [
            ("sample_id", pa.string()),
            ("question_id", pa.string()),
            ("domain", pa.string()),
            ("source", pa.string()),
            ("question", pa.string()),
            ("reference", pa.string()),
            ("media", pa.string()),
            ("response", pa.string()),
            ("answer", pa.string()),
            ("grade", pa.string()),
            ("redundancy", pa.float64()),
            ("confidence", pa.float64()),
            ("score", pa.int32()),
            ("repeats", pa.int32()),
            ("reviewer_action", pa.string()),
            ("reviewer", pa.string()),
            ("reason", pa.string()),
            ("judge", pa.string()),
            ("messages", pa.string()),
            ("gen_config_hash", pa.string()),
            ("created_at", TIMESTAMP),
        ]
    ),
    "rl_hint_levels": pa.schema(
        [
            ("record_id", pa.string()),
            ("run_id", pa.string()),
            ("stage", pa.string()),
            ("step", pa.int64()),
            ("item_id", pa.string()),
            ("level", pa.int32()),
            ("hint", pa.string()),
            ("pass_rates", pa.string()),
            ("note", pa.string()),
            ("created_at", TIMESTAMP),
        ]
    ),
}

# The `stage` of the quarantine rows a gate writes begins with this (`quality.gates.gate_stage`).
GATE_STAGE_PREFIX = "gate:"

PRIMARY_KEYS = {
    "videos": "video_id",
    "video_samples": "sample_id",
    "video_frames": "frame_id",
    "images": "image_id",
    "image_samples": "sample_id",
    "quarantine": "quarantine_id",
    "gate_results": "gate_result_id",
    "train_samples": "sample_id",
    "mixtures": "mixture_row_id",
    "longcot_questions": "question_id",
    "longcot_paths": "path_id",
    "longcot_reviews": "review_id",
    "longcot": "sample_id",
    "rl_hint_levels": "record_id",
}

# Lance's marker for a table's primary key: with it, a merge_insert that inserts a key another writer
# inserted meanwhile conflicts and is retried against the newer version instead of adding a second row.
# Lance requires the column to be non-nullable (a key is never null here anyway). Tables created before
# the marker existed keep working: their writers are serialised by the write lock alone.
PRIMARY_KEY_METADATA = {"lance-schema:unenforced-primary-key": "true"}


def _mark_primary_key(schema: pa.Schema, key: str) -> pa.Schema:
    i = schema.get_field_index(key)
    field = schema.field(i).with_nullable(False).with_metadata(PRIMARY_KEY_METADATA)
    return schema.set(i, field)


SCHEMAS = {name: _mark_primary_key(schema, PRIMARY_KEYS[name]) for name, schema in SCHEMAS.items()}

# Pixel patches are stored losslessly compressed (zstd, level 9): Lance applies the field's encoding
# metadata when a table is created. Measured on the sample clips' video_frames (92 frames of 8 videos,
# 46 s, 1.95 MB of source video; benchmarks/bench_loader.py prints it): raw patches 37.7 MB (19.4x the
# source); Lance 2.2's default (zstd level 3) 6.47 MB (3.32x); level 9 6.15 MB (3.16x), as fast to read
# and to `take`, ~0.3 s more CPU per 38 MB written; levels 15-19 save another 4-7% at 6-60x the write time.
# Lossy video codecs are what make the source smaller still; pixels here must stay exact.
PATCH_COMPRESSION = {"lance-encoding:compression": "zstd", "lance-encoding:compression-level": "9"}


def _compress_patches(schema: pa.Schema) -> pa.Schema:
    i = schema.get_field_index("patches")
    return schema.set(i, schema.field(i).with_metadata(PATCH_COMPRESSION))


for _name in ("video_frames", "image_samples"):
    SCHEMAS[_name] = _compress_patches(SCHEMAS[_name])

# How often a write that keeps conflicting with other writers is re-read and re-applied before it fails.
MAX_COMMIT_ATTEMPTS = 20


@dataclass(frozen=True)
class TableRef:
    """A pinned table: what flows pass between tasks instead of the rows themselves."""

    name: str
    uri: str
    version: int

    def __str__(self) -> str:
        return f"{self.uri}@v{self.version}"


def now() -> datetime:
    return datetime.now(UTC)


def table_uri(name: str, root: str | None = None) -> str:
    return f"{(root or get_settings().tables).rstrip('/')}/{name}.lance"


def dataset(uri: str, version: int | None = None) -> lance.LanceDataset:
    """``lance.dataset`` with the storage options for ``uri`` (any table URI, e.g. a ``TableRef.uri``)."""
    return lance.dataset(uri, version=version, storage_options=storage_options(uri))


def write_dataset(data: pa.Table, uri: str, mode: str) -> lance.LanceDataset:
    """``lance.write_dataset`` with the storage options for ``uri``."""
    return lance.write_dataset(data, uri, mode=mode, storage_options=storage_options(uri))


def exists(name: str, root: str | None = None) -> bool:
    try:
        dataset(table_uri(name, root))
    except (ValueError, FileNotFoundError, OSError):
        return False
    return True


def open_table(name: str, version: int | None = None, root: str | None = None) -> lance.LanceDataset:
    uri = table_uri(name, root)
    try:
        return dataset(uri, version=version)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"table {name!r} not found at {uri} (version {version}): {exc}") from exc


def ref(name: str, root: str | None = None) -> TableRef:
    """The table's current version as a pinnable reference (creating it empty if missing)."""
    ds = ensure(name, root)
    return TableRef(name=name, uri=ds.uri, version=ds.version)


def ensure(name: str, root: str | None = None) -> lance.LanceDataset:
    """Open a table, creating it empty with its schema if it does not exist yet."""
    if exists(name, root):
        return open_table(name, root=root)
    with write_lock(name, root):
        return _ensure_locked(name, root)


def _ensure_locked(name: str, root: str | None) -> lance.LanceDataset:
    if exists(name, root):
        return _add_new_columns(name, open_table(name, root=root))
    try:
        return write_dataset(SCHEMAS[name].empty_table(), table_uri(name, root), mode="create")
    except OSError:
        # Another writer (on an object store, where there is no lock) created it first: theirs is as good.
        return open_table(name, root=root)


def _add_new_columns(name: str, ds: lance.LanceDataset) -> lance.LanceDataset:
    """A table written before a column was added to its schema gets the column (null in its old rows, a
    metadata-only change) at its next write, so old tables stay readable and writable."""
    missing = [f for f in SCHEMAS[name] if f.name not in ds.schema.names]
    if not missing:
        return ds
    ds.add_columns([f.with_nullable(True) for f in missing])
    return dataset(ds.uri)


@contextlib.contextmanager
def write_lock(name: str, root: str | None = None) -> Iterator[None]:
    """Hold the table's write lock: one writer at a time reads which keys are there and commits.

    A local root gets an ``flock`` on ``<root>/.locks/<name>.lock`` (released by the kernel when the
    holder dies, so a killed writer never leaves it stuck). An object store has no lock; Lance's
    primary-key conflict detection and :func:`_commit` keep its keyed writes exact."""
    base = root or get_settings().tables
    if "://" in base and not base.startswith("file://"):
        yield
        return
    folder = Path(base.removeprefix("file://")) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _commit(name: str, root: str | None, write: Callable[[], int]) -> int:
    """Run one idempotent write under the table's lock; on a commit conflict with another writer, re-read
    the table and apply it again (``write`` decides afresh what is still missing)."""
    for attempt in range(1, MAX_COMMIT_ATTEMPTS + 1):
        try:
            with write_lock(name, root):
                return write()
        except CommitConflictError as exc:
            if not exc.retryable or attempt == MAX_COMMIT_ATTEMPTS:
                raise
            wait = min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
            log.info(
                "%s: commit conflict with another writer (%s); retry %d in %.2fs", name, exc, attempt, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _conform(name: str, data: pa.Table) -> pa.Table:
    """Rows in the table's own schema (the key marked and non-nullable), whatever produced them."""
    return data if data.schema.equals(SCHEMAS[name], check_metadata=True) else data.cast(SCHEMAS[name])


def upsert(name: str, rows: list[dict] | pa.Table, root: str | None = None) -> int:
    """Insert rows whose primary key is not present yet; return the table version after the commit.

    Existing keys are left untouched, so writing the same shard twice is harmless, and so is another
    process writing the same keys at the same time (each key ends up in the table once).
    """
    data = (
        _conform(name, rows)
        if isinstance(rows, pa.Table)
        else pa.Table.from_pylist(rows, schema=SCHEMAS[name])
    )
    key = PRIMARY_KEYS[name]

    def write() -> int:
        ds = _ensure_locked(name, root)
        todo = data
        if todo.num_rows:
            # merge_insert commits a new version even when it inserts nothing; downstream ids (mixtures)
            # are keyed on input versions, so a no-op rerun must leave the version alone.
            present = existing_keys(name, todo.column(key).to_pylist(), root)
            if present:
                todo = todo.filter(pc.invert(pc.is_in(todo.column(key), pa.array(list(present)))))
        if todo.num_rows == 0:
            return ds.version
        kill_point("table.commit")  # holding the lock, keys checked, nothing committed
        ds.merge_insert(key).when_not_matched_insert_all().execute(todo)
        return open_table(name, root=root).version

    return _commit(name, root, write)


def update_rows(name: str, rows: list[dict], root: str | None = None) -> int:
    """Write whole rows, replacing those with the same primary key (one merge_insert commit); for tables
    whose rows change state (e.g. a review outcome), unlike :func:`upsert`, which never overwrites."""
    data = pa.Table.from_pylist(rows, schema=SCHEMAS[name]) if rows else None

    def write() -> int:
        ds = _ensure_locked(name, root)
        if data is None:
            return ds.version
        ds.merge_insert(PRIMARY_KEYS[name]).when_matched_update_all().when_not_matched_insert_all().execute(
            data
        )
        return open_table(name, root=root).version

    return _commit(name, root, write)


def delete_rows(name: str, where: pc.Expression, root: str | None = None) -> int:
    """Delete the rows matching an Arrow expression (never a SQL string built from data); no commit, and
    the version unchanged, when none matches."""

    def write() -> int:
        ds = _ensure_locked(name, root)
        if ds.count_rows(filter=where):  # a delete commits a new version even when it removes nothing
            ds.delete(where)
            return open_table(name, root=root).version
        return ds.version

    return _commit(name, root, write)


def replace_where(name: str, where: pc.Expression, data: pa.Table, root: str | None = None) -> int:
    """Delete the rows matching ``where`` and append ``data`` in its place, under one lock (two commits: a
    reader pinned between them sees the group absent, never twice)."""
    data = _conform(name, data)

    def write() -> int:
        ds = _ensure_locked(name, root)
        if ds.count_rows(filter=where):
            ds.delete(where)
            kill_point("table.replace.deleted")  # the old rows deleted, the new ones not yet appended
        if data.num_rows:
            write_dataset(data, table_uri(name, root), mode="append")
        return open_table(name, root=root).version

    return _commit(name, root, write)


# Stored bytes a compacted fragment holds (see :func:`compact`). Why not one fragment whatever the size:
# each compaction rewrites every fragment under the target, so the target bounds what a run rewrites besides
# its own new rows; and why bytes, not rows: frames weigh 1 KB to 600 KB, and a row target that the file-size
# cap cuts short leaves fragments "under target" that every later compaction would rewrite again. At 4 GiB a
# table's fragments stay few (a 1M-row table of small frames is one; 10 TB of frames ~2,300), while a
# micro-batch of large frames reads megabytes, next to which one more fragment touched (~0.04 ms) is nothing.
FRAGMENT_BYTES = 4 << 30


def compact(name: str, root: str | None = None, fragment_bytes: int = FRAGMENT_BYTES) -> int:
    """Merge the table's small fragments (each append adds one) into fragments of about ``fragment_bytes``
    stored bytes, dropping deleted rows; return the table version after it. Nothing is committed when there
    is nothing to merge, so a run that wrote nothing leaves the version alone.

    Rows keep their content, keys and order; only the files change. Under the table's write lock, so no
    writer commits between the plan and its commit; a reader pinned to an older version keeps reading that
    version's files (compaction deletes none). Pages are copied without re-encoding where the fragments
    allow it (the patches' zstd encoding stays as written), else re-encoded with the schema's encodings.
    Killed before the commit, the table stays at its previous version (the rewritten files unreferenced);
    the rerun compacts again."""

    def write() -> int:
        ds = _ensure_locked(name, root)
        fragments = ds.get_fragments()
        stored = sum(f.file_size_bytes or 0 for fragment in fragments for f in fragment.metadata.files)
        rows = sum(fragment.metadata.physical_rows for fragment in fragments)
        if len(fragments) < 2 and not any(f.metadata.deletion_file for f in fragments):
            return ds.version
        # Lance's target is in rows: the table's mean stored row size turns bytes into rows.
        target_rows = max(1, min(fragment_bytes * rows // max(stored, 1), 1 << 31))
        options = {
            "target_rows_per_fragment": target_rows,
            "max_bytes_per_file": 2 * fragment_bytes,  # never cut a fragment short of its row target
            "compaction_mode": "try_binary_copy",
        }
        plan = Compaction.plan(ds, options)
        if plan.num_tasks() == 0:
            return ds.version
        rewritten = [task.execute(ds) for task in plan.tasks]
        kill_point("table.compact.rewritten")  # the new files written, the table not yet pointing at them
        Compaction.commit(ds, rewritten)
        return open_table(name, root=root).version

    return _commit(name, root, write)


def first_uris(name: str, keys: set[str], root: str | None = None) -> dict[str, str]:
    """primary key -> the ``uri`` its row was ingested from, for the keys the table holds."""
    if not keys or not exists(name, root):
        return {}
    column = PRIMARY_KEYS[name]
    found = open_table(name, root=root).to_table(
        columns=[column, "uri"], filter=pa.compute.field(column).isin(list(keys))
    )
    return dict(zip(found.column(column).to_pylist(), found.column("uri").to_pylist()))


def existing_keys(name: str, keys: Iterable[str], root: str | None = None) -> set[str]:
    """Which of ``keys`` the table already holds (a scan filtered on the primary key)."""
    keys = list(keys)
    if not keys or not exists(name, root):
        return set()
    column = PRIMARY_KEYS[name]
    ds = open_table(name, root=root)
    found = ds.to_table(columns=[column], filter=pa.compute.field(column).isin(keys))
    return set(found.column(column).to_pylist())


def quarantine_row(uri: str, reason: str, stage: str, content_hash: str = "", config_hash: str = "") -> dict:
    # One row per (input, stage, config): re-detecting the same problem on a rerun is not a new row.
    key = hashlib.sha256(f"{uri}\0{stage}\0{content_hash}\0{config_hash}".encode()).hexdigest()[:24]
    return {
        "quarantine_id": key,
        "uri": uri,
        "reason": reason,
        "stage": stage,
        "content_hash": content_hash,
        "config_hash": config_hash,
        "detected_at": now(),
    }


def list_tables(root: str | None = None) -> list[str]:
    """Names of the tables that exist under the root (local or object store)."""
    from pyarrow import fs as pafs

    base = (root or get_settings().tables).rstrip("/")
    filesystem, path = _filesystem(base)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return []
    names = []
    for info in filesystem.get_file_info(pafs.FileSelector(path)):
        if info.base_name.endswith(".lance"):
            names.append(info.base_name[: -len(".lance")])
    return sorted(names)


def _filesystem(base: str):
    """A pyarrow filesystem for the tables root; on S3 configured exactly as Lance is (same options)."""
    from pyarrow import fs as pafs

    options = storage_options(base)
    if options is None:
        return pafs.FileSystem.from_uri(base if "://" in base else str(Path(base).resolve()))
    endpoint = options.get("aws_endpoint")
    filesystem = pafs.S3FileSystem(
        access_key=options.get("aws_access_key_id"),
        secret_key=options.get("aws_secret_access_key"),
        session_token=options.get("aws_session_token"),
        region=options.get("aws_region"),
        endpoint_override=endpoint,
        scheme="http" if options.get("allow_http") else "https",
    )
    return filesystem, base.split("://", 1)[1]


def replace_groups(name: str, data: pa.Table, group_column: str, root: str | None = None) -> int:
    """Append ``data`` after deleting rows of the same groups (e.g. a video's frames) left by a crashed write
    or by another writer that tokenised the same video at the same time.

    For bulk rows that one writer produces per group, a plain append is far cheaper than a keyed
    ``merge_insert``; clearing the group first, under the table's lock, keeps a rerun or a concurrent
    writer from duplicating anything.
    """
    if data.num_rows == 0:
        return ensure(name, root).version
    groups = pc.unique(data.column(group_column))
    return replace_where(name, pc.field(group_column).isin(groups), data, root)
