"""The loader's sample reader: train_samples rows + their stored media patches → model Features.

Pixels come back from Lance by key (``video_frames`` by sample, ``image_samples`` by id) exactly as
pre-tokenisation stored them; nothing is decoded again. Each rank calls this only for its own samples.

**Reads by index.** A :class:`LanceSampleReader` pins each table's version when it opens it and scans only
its key column(s) once, into a map key → row offsets (:class:`RowIndex`, which also keeps the frames' grid
sizes); every later read is a Lance ``take`` of exactly the rows wanted, of the ``patches`` column only.
A filter such as ``isin(sample_id)`` instead scans the whole key column of the table for every micro-batch
(``video_frames`` has one row per stored frame). Measured on a 1M-row ``video_frames``
(``benchmarks/bench_loader.py``, 8 videos of 16 frames, 2-core CPU shared by 4 workers, 3 runs), on the table
as the pre-tokenisation flow leaves it (compacted to one fragment, ``pretokenize.compact_frames``): one
:meth:`MediaReader.read` 0.74-0.76 ms per micro-batch, the old filtered scans 47-51 ms (64-67x); Lance's
``take`` alone 0.45-0.48 ms; a BTREE scalar index on ``sample_id`` + the same filter 2.6-3.0 ms. On the same
rows in the 20 fragments the shards appended: 1.07-1.15 ms vs 52-55 ms (45-50x), ``take`` alone 0.76-0.80 ms
(it touches 7-8 fragments, ~0.04 ms each, over a ~0.3 ms fixed cost). The ~0.3 ms of the read that is not
Lance's is ours, spread over a dozen steps of 10-40 us each (medians of 2,000 reads in place: index lookups
and the frame-count check ~50 us, byte ranges and grids ~40, the videos' rows ~40, the views ~30, MediaPatches
~20, the copy ~20 and allocating its tensor ~13, freeing Lance's result ~15). ``take`` needs no index that
every writer would have to build and keep up to date after each append, so it is what the reader uses. The key
scan costs ~0.25 s per million rows, once per reader.

**One copy of the pixels.** ``take`` returns the patches of all frames and images asked for back to back in
one Arrow buffer; :meth:`MediaReader.read` copies them once, into one uint8 torch tensor (page-locked when
CUDA is available, so the copy to the GPU can be asynchronous), laid out in the order the caller asks: the
loader asks in micro-batch order (samples, then each sample's media), so every sample's ``pixel_values``
is a view of that tensor, and so is the collated micro-batch's (``processor.join_rows`` joins adjacent
views without copying). Before, ``encode_sample`` and ``collate`` each concatenated the patches again.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from keyeflow.datasets import tables
from keyeflow.model.processor import Features, MediaPatches, encode_sample
from keyeflow.model.tokenizer import load_tokenizer

_PATCH_VALUES = 3 * 14 * 14
_VIDEO_COLUMNS = ["sample_id", "frame_types", "timestamps", "slow_tokens", "fast_tokens"]


class RowIndex:
    """key → the row offsets (for ``LanceDataset.take``) of one pinned table version, from one scan of its
    key column (and of ``order_by``, which orders the rows of one key: a video's frames by index). Small
    per-row columns named in ``carry`` (grid sizes) are kept beside the offsets, so a read takes only the
    payload column: Lance's ``take`` costs per column and fragment touched."""

    def __init__(
        self,
        dataset: lance.LanceDataset,
        key: str,
        order_by: str | None = None,
        carry: Sequence[str] = (),
    ):
        columns = list(dict.fromkeys([key, *([order_by] if order_by else []), *carry]))
        found = dataset.to_table(columns=columns)
        encoded = pc.dictionary_encode(found.column(key)).combine_chunks()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        if order_by is None:
            self._offsets = np.argsort(codes, kind="stable")
        else:
            self._offsets = np.lexsort((found.column(order_by).to_numpy(), codes))
        self.carried = {c: found.column(c).to_numpy()[self._offsets] for c in carry}
        counts = np.bincount(codes, minlength=len(encoded.dictionary))
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._code = {k: i for i, k in enumerate(encoded.dictionary.to_pylist())}

    def __contains__(self, key: str) -> bool:
        return key in self._code

    def __len__(self) -> int:
        return len(self._offsets)

    def code(self, key: str) -> int:
        """The key's number in this index, -1 for a key it does not have."""
        return self._code.get(key, -1)

    def spans(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each key's rows start in the index and how many there are (0, 0 for code -1)."""
        known = codes >= 0
        first = np.where(known, self._starts[np.where(known, codes, 0)], 0)
        return first, np.where(known, self._starts[np.where(known, codes, 0) + 1] - first, 0)

    def first_offsets(self, keys: Iterable[str]) -> np.ndarray:
        """The row offset of each (known) key's first row."""
        return self._offsets[self._starts[[self._code[k] for k in keys]]]

    def positions(self, keys: Iterable[str]) -> np.ndarray:
        """Where the rows of each key are, key after key (unknown keys have none), in the order of the
        index: ``offsets`` and ``carried`` values at these positions."""
        codes = np.array([c for c in map(self._code.get, keys) if c is not None], np.int64)
        return span_positions(self._starts[codes], self._starts[codes + 1] - self._starts[codes])

    def offsets(self, positions: np.ndarray) -> np.ndarray:
        return self._offsets[positions]


def span_positions(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """first[0], first[0] + 1, … (counts[0] of them), then the same for the next span, …"""
    return np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())


class _IndexedTable:
    """A table at the version it had when first used, read by key through a :class:`RowIndex`."""

    def __init__(
        self, dataset: lance.LanceDataset, key: str, order_by: str | None = None, carry: Sequence[str] = ()
    ):
        self.dataset, self.key, self.order_by, self.carry = dataset, key, order_by, carry
        self._index: RowIndex | None = None

    @property
    def index(self) -> RowIndex:
        if self._index is None:  # built on first use: a reader that never sees images never scans them
            self._index = RowIndex(self.dataset, self.key, self.order_by, self.carry)
        return self._index

    def rows(self, keys: Sequence[str], columns: list[str]) -> pa.Table:
        """The rows of ``keys``, in table order (ascending offsets: Lance's take reads them faster)."""
        return self.dataset.take(np.sort(self.index.offsets(self.index.positions(keys))), columns=columns)


class _Videos:
    """``video_samples``' per-video columns (no pixels: frame types, timestamps, tokens per frame), held in
    memory from one scan as flat arrays (list columns as values + offsets), joined once to where each
    video's frames are in ``video_frames``' :class:`RowIndex` (first position, number of rows, first row
    offset, bytes of patches), so that a read finds all of it with a few array lookups. A Lance ``take`` of
    the list columns costs ~1.5 ms per micro-batch, an Arrow take + ``to_pylist`` ~0.14 ms, these lookups a
    few microseconds. Memory: ~13 bytes per frame and ~200 per video (1.5 GB for a million 100-frame
    videos), beside the frames' own :class:`RowIndex` (~16 bytes per frame)."""

    def __init__(self, dataset: lance.LanceDataset, frames: RowIndex):
        table = dataset.to_table(columns=_VIDEO_COLUMNS).combine_chunks()
        ids = table.column("sample_id").to_pylist()
        self.position = {k: i for i, k in enumerate(ids)}
        # ``values`` and ``offsets`` of a list array both ignore a slice's offset, so they agree.
        types, stamps = (table.column(c).chunk(0) if ids else None for c in ("frame_types", "timestamps"))
        self._types = (
            (types.values.to_numpy(), types.offsets.to_numpy()) if ids else (None, np.zeros(1, np.int64))
        )
        self._stamps = (stamps.values.to_numpy(), stamps.offsets.to_numpy()) if ids else None
        self._slow = table.column("slow_tokens").to_pylist()
        self._fast = table.column("fast_tokens").to_pylist()
        self.num_frames = np.diff(self._types[1])  # as listed in video_samples
        code = np.array([frames.code(k) for k in ids], np.int64)
        self.first, self.stored = frames.spans(code)
        self.first_offset = frames.offsets(self.first) if len(frames) else self.first
        # bytes of patches before each index position (rows are h·w patches of _PATCH_VALUES bytes)
        row_bytes = frames.carried["grid_h"].astype(np.int64) * frames.carried["grid_w"] * _PATCH_VALUES
        self.bytes_before = np.concatenate([[0], np.cumsum(row_bytes)])

    def row(self, i: int) -> dict:
        """Row ``i``'s lists as Python lists."""
        (types, type_at), (stamps, stamp_at) = self._types, self._stamps
        return {
            "frame_types": types[type_at[i] : type_at[i + 1]].tolist(),
            "timestamps": stamps[stamp_at[i] : stamp_at[i + 1]].tolist(),
            "slow_tokens": self._slow[i],
            "fast_tokens": self._fast[i],
        }


class MediaReader:
    """Stored patches of video samples (frames in order, one (1, h, w) grid each) and image samples, by
    their sample ids, through row indexes over the tables as they were at the first read."""

    def __init__(self, root: str | None = None, pin_memory: bool | None = None):
        self.root = root
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._tables: dict[str, _IndexedTable | None] = {}
        self._videos: _Videos | None = None

    def _table(self, name: str, *args) -> _IndexedTable | None:
        if name not in self._tables:
            self._tables[name] = (
                _IndexedTable(tables.open_table(name, root=self.root), "sample_id", *args)
                if tables.exists(name, self.root)
                else None
            )
        return self._tables[name]

    def __call__(self, media_ids: Iterable[str]) -> dict[str, MediaPatches]:
        """Each distinct id once, by id; all are views of one tensor. A missing id, or a video with missing
        frames, is a KeyError."""
        ids = sorted(set(media_ids))
        return dict(zip(ids, self.read(ids)))

    def read(self, media_ids: Sequence[str]) -> list[MediaPatches]:
        """One MediaPatches per entry of ``media_ids``, in that order (an id may repeat), whose patches lie
        back to back in one uint8 tensor (pinned when ``pin_memory``), in that order: the patches of
        consecutive entries are adjacent views, so a caller asking in micro-batch order (samples, then each
        sample's media) gets its batch's pixels already concatenated (``processor.join_rows`` then only
        makes a view). The bytes are copied once, from the Arrow buffers Lance's ``take`` returned."""
        ids = sorted(set(media_ids))
        if not ids:
            return []
        videos = self._table("video_samples")
        frames = self._table("video_frames", "frame_index", ("grid_h", "grid_w"))
        images = self._table("image_samples", None, ("grid_h", "grid_w"))
        if videos and frames and self._videos is None:
            self._videos = _Videos(videos.dataset, frames.index)
        found: dict[str, tuple] = {}  # id → (source bytes, first byte, end byte, grids, video row or None)
        known = self._videos.position if videos and frames else {}
        video_ids = [i for i in ids if i in known]
        if video_ids:
            table = self._videos
            rows = np.array([known[i] for i in video_ids], np.int64)
            stored, listed = table.stored[rows], table.num_frames[rows]
            for k in np.flatnonzero(stored != listed).tolist()[:1]:
                raise KeyError(
                    f"video sample {video_ids[k]} has {stored[k]} stored frames, expected {listed[k]}"
                )
            # Videos in table order: their frames are stored together, so the offsets then ascend, which
            # Lance's take reads faster (~20%).
            order = np.argsort(table.first_offset[rows], kind="stable")
            rows, counts = rows[order], stored[order]
            first = table.first[rows]
            positions = span_positions(first, counts)
            blob = _take_bytes(frames, positions)
            ends = np.cumsum(table.bytes_before[first + counts] - table.bytes_before[first]).tolist()
            frame_ends = np.cumsum(counts).tolist()
            heights = frames.index.carried["grid_h"][positions].tolist()
            widths = frames.index.carried["grid_w"][positions].tolist()
            for k, (i, row) in enumerate(zip(order.tolist(), rows.tolist())):
                a, b = (frame_ends[k - 1] if k else 0), frame_ends[k]
                grids = list(zip(itertools.repeat(1), heights[a:b], widths[a:b]))
                found[video_ids[i]] = (blob, ends[k - 1] if k else 0, ends[k], grids, table.row(row))
        rest = [i for i in ids if i not in found and images and i in images.index]
        if rest:
            blob, grids, ends = _take_patches(images, images.index.positions(rest))
            for k, image_id in enumerate(rest):
                found[image_id] = (blob, ends[k - 1] if k else 0, ends[k], grids[k : k + 1], None)
        missing = set(ids) - set(found)
        if missing:
            raise KeyError(f"media not found in video_samples/image_samples: {sorted(missing)[:5]}")

        wanted = [found[i] for i in media_ids]
        sizes = [end - start for _, start, end, _, _ in wanted]
        pixels = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=self.pin_memory)
        into, at = pixels.numpy(), 0
        for (blob, start, end, _, _), size in zip(wanted, sizes):
            into[at : at + size] = blob[start:end]  # the one copy
            at += size
        views = pixels.view(-1, _PATCH_VALUES).split_with_sizes([size // _PATCH_VALUES for size in sizes])
        out = []
        for (_, _, _, grids, v), patches in zip(wanted, views):
            if v is None:
                out.append(MediaPatches(patches=patches, grids=grids))
            else:
                out.append(
                    MediaPatches(
                        patches=patches,
                        grids=grids,
                        frame_types=v["frame_types"],
                        timestamps=v["timestamps"],
                        slow_tokens=v["slow_tokens"],
                        fast_tokens=v["fast_tokens"] if 1 in v["frame_types"] else None,
                    )
                )
        return out


def _take_bytes(table: _IndexedTable, at: np.ndarray) -> np.ndarray:
    """One Lance ``take`` of the ``patches`` of the index positions ``at``: their bytes back to back (one
    read-only view of the Arrow buffer, no copy)."""
    return _patch_bytes(table.dataset.take(table.index.offsets(at), columns=["patches"]).column(0))


def _take_patches(
    table: _IndexedTable, at: np.ndarray
) -> tuple[np.ndarray, list[tuple[int, int, int]], list[int]]:
    """One Lance ``take`` of the ``patches`` of the index positions ``at``: their bytes back to back (one
    read-only view of the Arrow buffer, no copy), each row's (1, h, w) grid, and where each row ends."""
    blob = _patch_bytes(table.dataset.take(table.index.offsets(at), columns=["patches"]).column(0))
    h, w = table.index.carried["grid_h"][at], table.index.carried["grid_w"][at]
    ends = np.cumsum(h.astype(np.int64) * w * _PATCH_VALUES).tolist()
    return blob, list(zip(itertools.repeat(1), h.tolist(), w.tolist())), ends


class _Media:
    """What one filtered read found (``read_media``): ``video_samples`` rows, their frames' (grid_h, grid_w)
    and patches (each video's frames adjacent and in frame order), images' ids, grids and patches."""

    def __init__(self, videos: list[dict]):
        self.videos = videos
        self.frame_grids = np.zeros((0, 2), np.int64)
        self.frame_patches: pa.ChunkedArray | None = None
        self.image_ids: list[str] = []
        self.image_grids = np.zeros((0, 2), np.int64)
        self.image_patches: pa.ChunkedArray | None = None

    def assemble(self, wanted: Sequence[str], pin_memory: bool = False) -> dict[str, MediaPatches]:
        """MediaPatches of every video and image; their patch bytes are copied once, into one uint8 tensor
        that every result is a view of. An id of ``wanted`` found in neither table is a KeyError."""
        blobs = [
            _patch_bytes(c) if c is not None else np.zeros(0, np.uint8)
            for c in (self.frame_patches, self.image_patches)
        ]
        pixels = torch.empty(sum(len(b) for b in blobs), dtype=torch.uint8, pin_memory=pin_memory)
        pixels.numpy()[: len(blobs[0])] = blobs[0]  # the one copy
        pixels.numpy()[len(blobs[0]) :] = blobs[1]
        rows = pixels.view(-1, _PATCH_VALUES)
        out: dict[str, MediaPatches] = {}
        grids = np.concatenate([self.frame_grids, self.image_grids])
        ends = np.cumsum(grids.prod(axis=1)).tolist()
        starts = [0, *ends[:-1]]
        grids = [(1, h, w) for h, w in grids.tolist()]
        frame = 0
        for v in self.videos:
            n = len(v["frame_types"])
            out[v["sample_id"]] = MediaPatches(
                patches=rows[starts[frame] : ends[frame + n - 1]] if n else rows[:0],
                grids=grids[frame : frame + n],
                frame_types=v["frame_types"],
                timestamps=v["timestamps"],
                slow_tokens=v["slow_tokens"],
                fast_tokens=v["fast_tokens"] if 1 in v["frame_types"] else None,
            )
            frame += n
        for i, image_id in enumerate(self.image_ids, start=frame):
            out[image_id] = MediaPatches(patches=rows[starts[i] : ends[i]], grids=[grids[i]])
        missing = set(wanted) - set(out)
        if missing:
            raise KeyError(f"media not found in video_samples/image_samples: {sorted(missing)[:5]}")
        return out


def _patch_bytes(column: pa.ChunkedArray) -> np.ndarray:
    """The values of a binary column as one read-only uint8 array, without copying when it is one chunk
    (what ``take`` returns): rows back to back from the first row's first byte."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not len(array):
        return np.zeros(0, np.uint8)
    _, offsets, values = array.buffers()
    first, end = np.frombuffer(offsets, dtype=np.int64)[[array.offset, array.offset + len(array)]].tolist()
    return np.frombuffer(values, dtype=np.uint8)[first:end]


class LanceSampleReader:
    """Callable ``reader(sample_ids) -> list[Features]`` (same order) over pinned tables.

    ``train_samples`` is read at the pinned version; the media tables at the version they have at the first
    read (their rows are keyed by content and config and never change, so a later version only adds rows
    no pinned train_samples version refers to). ``pin_memory`` (default: when CUDA is available) page-locks
    the patch tensors.
    """

    def __init__(
        self,
        train_samples: tables.TableRef,
        tokenizer=None,
        root: str | None = None,
        pin_memory: bool | None = None,
    ):
        self.samples = _IndexedTable(
            tables.open_table("train_samples", version=train_samples.version, root=root), "sample_id"
        )
        self.tokenizer = tokenizer or load_tokenizer()
        self.root = root
        self.media = MediaReader(root, pin_memory)

    def __call__(self, sample_ids: list[str]) -> list[Features]:
        wanted = list(dict.fromkeys(sample_ids))
        found = self.samples.rows(wanted, ["sample_id", "messages", "media_ids"]).to_pylist()
        rows = {r["sample_id"]: r for r in found}
        missing = [s for s in wanted if s not in rows]
        if missing:
            raise KeyError(f"train_samples@v{self.samples.dataset.version} has no rows {missing[:5]}")
        # Media in the order the micro-batch's pixels will be (samples as asked, each one's media in the
        # order its parts render, which is the order they were counted): every sample's pixel_values, and
        # the collated batch's, are then views of the reader's one tensor.
        media = iter(self.media.read([m for sid in sample_ids for m in rows[sid]["media_ids"]]))
        return [self._encode(rows[sid], media) for sid in sample_ids]

    def _encode(self, row: dict, media: Iterator[MediaPatches]) -> Features:
        own = [next(media) for _ in row["media_ids"]]  # taken whether or not every part renders
        parts = iter(own)
        return encode_sample(json.loads(row["messages"]), self.tokenizer, lambda part: next(parts))


def read_media(media_ids: set[str], root: str | None = None) -> dict[str, MediaPatches]:
    """Stored patches of video samples and image samples by their sample ids, for a one-off lookup
    (evaluation): filtered reads, no row index to build; a missing id, or a video with missing frames, is a
    KeyError. A reader of many batches uses :class:`MediaReader`."""
    if not media_ids:
        return {}
    ids = sorted(media_ids)
    media = _Media([])
    if tables.exists("video_samples", root) and tables.exists("video_frames", root):
        media.videos = (
            tables.open_table("video_samples", root=root)
            .to_table(columns=_VIDEO_COLUMNS, filter=pc.field("sample_id").isin(ids))
            .to_pylist()
        )
        if media.videos:
            frames = (
                tables.open_table("video_frames", root=root)
                .to_table(
                    columns=["sample_id", "frame_index", "grid_h", "grid_w", "patches"],
                    filter=pc.field("sample_id").isin([v["sample_id"] for v in media.videos]),
                )
                .sort_by([("sample_id", "ascending"), ("frame_index", "ascending")])
            )
            stored = {c["values"]: c["counts"] for c in pc.value_counts(frames["sample_id"]).to_pylist()}
            for v in media.videos:
                if stored.get(v["sample_id"], 0) != len(v["frame_types"]):
                    raise KeyError(
                        f"video sample {v['sample_id']} has {stored.get(v['sample_id'], 0)} stored frames, "
                        f"expected {len(v['frame_types'])}"
                    )
            media.videos.sort(key=lambda v: v["sample_id"])  # the frames' order
            media.frame_grids = np.stack([frames["grid_h"].to_numpy(), frames["grid_w"].to_numpy()], axis=1)
            media.frame_patches = frames["patches"]
    taken = {v["sample_id"] for v in media.videos}
    rest = [i for i in ids if i not in taken]
    if rest and tables.exists("image_samples", root):
        found = tables.open_table("image_samples", root=root).to_table(
            columns=["sample_id", "grid_h", "grid_w", "patches"], filter=pc.field("sample_id").isin(rest)
        )
        media.image_ids = found["sample_id"].to_pylist()
        media.image_grids = np.stack([found["grid_h"].to_numpy(), found["grid_w"].to_numpy()], axis=1)
        media.image_patches = found["patches"]
    return media.assemble(ids)
