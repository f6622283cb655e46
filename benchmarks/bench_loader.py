"""The training loader's reads: by index vs the old filtered scans, and whether it keeps up with training.

    python benchmarks/bench_loader.py [--videos 62500] [--frames 16] [--batch-videos 8] [--steps 8]

Three parts, in one temporary KEYEFLOW_HOME, printed side by side:

1. **Fetch one micro-batch** of ``--batch-videos`` videos from a ``video_frames`` table of
   ``--videos × --frames`` rows (default 1,000,000; one 14×14 patch per frame, so the table builds in
   seconds), built twice: in 20 appends as pre-tokenisation shards write it, and the same followed by the
   pre-tokenisation flow's compaction (``pretokenize.compact_frames``, what users get). Best of
   ``--rounds`` rounds interleaved over both tables (the machine may be shared: a busy moment then costs
   every path alike), each path against the filtered scan of the same table:
   - *filtered scans*: the loader's media read before issue 14, verbatim (``old_read_media``): per call it
     opens the tables, ``isin(sample_id)`` filters on ``video_samples`` and ``video_frames`` (a scan of the
     key column of the whole table per micro-batch), rows to Python bytes, then concatenated;
   - *take*: :meth:`keyeflow.datasets.sample_reader.MediaReader.read`, what ``LanceSampleReader`` calls per
     micro-batch: row offsets from a one-time scan of the key columns (printed apart), then one ``take`` of
     the ``patches`` column and one copy into the micro-batch's tensor;
   - *Lance take alone*: the same ``take`` with nothing of ours around it, the floor of the line above;
   - *BTREE*: the same filtered read after ``create_scalar_index(sample_id, BTREE)``: the alternative to
     ``take`` that was measured and not kept. Target: take ≥ 50× faster than the filtered scan.
2. **Loader vs trainer** on the generated sample corpus (videos, images, text → a stage-2 mixture): samples/s
   the loader delivers (``MixtureLoader`` + ``LanceSampleReader``, reading in the caller's thread, so
   its own cost) against samples/s that ``train_step`` consumes on the tiny model (CPU, fp32). The loader
   must be faster (and with ``prefetch`` it reads while the step computes).
3. **Storage** of the sample clips' ``video_frames``: bytes on disk per second of video against the source
   files, and the raw patch bytes (see ``keyeflow.datasets.tables.PATCH_COMPRESSION``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_of(fn, repeats: int = 20) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def old_read_media(media_ids: set[str], root: str | None = None) -> dict:
    """The media read of ``LanceSampleReader`` before issue 14, verbatim (``git show
    c897068:keyeflow/datasets/sample_reader.py``, ``read_media``): per call it opens the tables, scans
    ``video_samples`` and ``video_frames`` with ``isin`` filters (and ``image_samples`` when it exists), takes
    rows to Python and concatenates each video's frames."""
    import numpy as np
    import pyarrow.compute as pc

    from keyeflow.datasets import tables
    from keyeflow.model.processor import MediaPatches

    _PATCH_VALUES = 3 * 14 * 14

    def _old_patches(row: dict) -> np.ndarray:
        return np.frombuffer(row["patches"], dtype=np.uint8).reshape(
            row["grid_h"] * row["grid_w"], _PATCH_VALUES
        )

    out: dict[str, MediaPatches] = {}
    if not media_ids:
        return out
    ids = sorted(media_ids)
    if tables.exists("video_samples", root):
        videos = (
            tables.open_table("video_samples", root=root)
            .to_table(
                columns=["sample_id", "frame_types", "timestamps", "slow_tokens", "fast_tokens"],
                filter=pc.field("sample_id").isin(ids),
            )
            .to_pylist()
        )
        if videos:
            frames = (
                tables.open_table("video_frames", root=root)
                .to_table(
                    columns=["sample_id", "frame_index", "grid_h", "grid_w", "patches"],
                    filter=pc.field("sample_id").isin([v["sample_id"] for v in videos]),
                )
                .to_pylist()
            )
            by_video: dict[str, list[dict]] = {}
            for f in frames:
                by_video.setdefault(f["sample_id"], []).append(f)
            for v in videos:
                fs = sorted(by_video.get(v["sample_id"], []), key=lambda f: f["frame_index"])
                if len(fs) != len(v["frame_types"]):
                    raise KeyError(
                        f"video sample {v['sample_id']} has {len(fs)} stored frames, "
                        f"expected {len(v['frame_types'])}"
                    )
                out[v["sample_id"]] = MediaPatches(
                    patches=np.concatenate([_old_patches(f) for f in fs]),
                    grids=[(1, f["grid_h"], f["grid_w"]) for f in fs],
                    frame_types=v["frame_types"],
                    timestamps=v["timestamps"],
                    slow_tokens=v["slow_tokens"],
                    fast_tokens=v["fast_tokens"] if 1 in v["frame_types"] else None,
                )
    if tables.exists("image_samples", root):
        for img in (
            tables.open_table("image_samples", root=root)
            .to_table(
                columns=["sample_id", "grid_h", "grid_w", "patches"], filter=pc.field("sample_id").isin(ids)
            )
            .to_pylist()
        ):
            # copy: Arrow buffers are read-only and torch warns on wrapping them
            out[img["sample_id"]] = MediaPatches(
                patches=_old_patches(img).copy(), grids=[(1, img["grid_h"], img["grid_w"])]
            )
    missing = media_ids - set(out)
    if missing:
        raise KeyError(f"media not found in video_samples/image_samples: {sorted(missing)[:5]}")
    return out


def build_frames(num_videos: int, num_frames: int, root: str | None = None) -> float:
    """video_samples + video_frames rows written straight into the tables under ``root`` (their schemas), the
    frames in 20 appends as pre-tokenisation shards write them; seconds."""
    import numpy as np
    import pyarrow as pa

    from keyeflow.datasets import tables

    started = time.perf_counter()
    n = num_videos * num_frames
    names = pa.array([f"vs-{i:08d}" for i in range(num_videos)])
    video_of = pa.array(np.repeat(np.arange(num_videos), num_frames))
    frame_index = np.tile(np.arange(num_frames, dtype=np.int32), num_videos)
    # One 1×1 grid (588 values) per frame; values vary by frame so that rows differ, compress like pixels do.
    pixels = (
        np.arange(n, dtype=np.uint32)[:, None] * 7 + np.arange(588, dtype=np.uint32)[None, :] // 3
    ) % 251
    offsets = np.arange(0, n * 588 + 1, 588, dtype=np.int64)
    patches = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(pixels.astype(np.uint8))]
    )
    sample_ids = names.take(video_of)
    frames = pa.Table.from_arrays(
        [
            pa.compute.binary_join_element_wise(
                sample_ids, pa.array(np.char.mod("%06d", frame_index)), "/"
            ).cast(pa.string()),
            sample_ids,
            pa.array(frame_index),
            pa.array(np.zeros(n, np.int8)),
            pa.array(frame_index.astype(np.float32)),
            pa.array(np.ones(n, np.int32)),
            pa.array(np.ones(n, np.int32)),
            pa.array(np.zeros(n, np.int32)),
            patches,
        ],
        schema=tables.SCHEMAS["video_frames"],
    )
    # A table built in ~20 appends, as pre-tokenisation shards build it (several fragments).
    tables.ensure("video_frames", root)
    step = -(-n // 20)
    for start in range(0, n, step):
        tables.write_dataset(frames.slice(start, step), tables.table_uri("video_frames", root), mode="append")
    schema = tables.SCHEMAS["video_samples"]
    columns = {
        "sample_id": names,
        "frame_types": pa.array([[0] * num_frames] * num_videos, pa.list_(pa.int8())),
        "timestamps": pa.array([list(map(float, range(num_frames)))] * num_videos, pa.list_(pa.float32())),
        "num_frames": pa.array(np.full(num_videos, num_frames, np.int32)),
        "num_slow": pa.array(np.full(num_videos, num_frames, np.int32)),
    }
    samples = pa.Table.from_arrays(
        [
            columns[f.name] if f.name in columns else pa.nulls(num_videos, f.type).fill_null(_zero(f.type))
            for f in schema
        ],
        schema=schema,
    )
    tables.ensure("video_samples", root)
    tables.write_dataset(samples, tables.table_uri("video_samples", root), mode="append")
    return time.perf_counter() - started


def _zero(type_):
    import datetime

    import pyarrow as pa

    if pa.types.is_string(type_):
        return ""
    if pa.types.is_timestamp(type_):
        return datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    if pa.types.is_floating(type_):
        return 0.0
    return 0


def fetch_part(args, home: Path) -> None:
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from keyeflow.datasets import pretokenize, tables
    from keyeflow.datasets.sample_reader import MediaReader

    # The same rows twice: as the shards appended them, and after what the pre-tokenisation flow does once
    # its shards are committed (the same function), so that both are measured side by side.
    appended, compacted = str(home / "appended"), str(home / "compacted")
    build_s = build_frames(args.videos, args.frames, appended)
    build_frames(args.videos, args.frames, compacted)
    started = time.perf_counter()
    pretokenize.compact_frames(compacted)
    compact_s = time.perf_counter() - started
    fragments = {
        r: len(tables.open_table("video_frames", root=r).get_fragments()) for r in (appended, compacted)
    }
    print(
        f"video_frames: {args.videos * args.frames:,} rows ({args.videos:,} videos × {args.frames} frames), "
        f"built in {build_s:.1f} s in {fragments[appended]} appends as pre-tokenisation shards make them; "
        f"the flow's compaction (pretokenize.compact_frames) took {compact_s:.2f} s, to "
        f"{fragments[compacted]} fragment(s)"
    )
    rng = np.random.default_rng(0)
    # Micro-batches in the order the trainer asks (MediaReader.read is what LanceSampleReader calls).
    batches = [
        [f"vs-{i:08d}" for i in rng.choice(args.videos, args.batch_videos, replace=False)] for _ in range(5)
    ]
    calls = iter(batches * 100_000)
    paths = {}
    for root in (appended, compacted):
        reader = MediaReader(root)
        started = time.perf_counter()
        reader.read(batches[0])
        first_s = time.perf_counter() - started
        frames = reader._tables["video_frames"]
        # The floor: Lance's take of the same rows (videos in table order, as the reader asks), nothing of
        # ours.
        index = frames.index
        rows_of = [
            index.offsets(index.positions(sorted(b, key=lambda i: index.first_offsets([i])[0])))
            for b in batches
        ]
        offsets = iter(rows_of * 100_000)
        old = old_read_media(set(batches[0]), root)
        new = dict(zip(batches[0], reader.read(batches[0])))
        paths[root] = {
            "scan": lambda root=root: old_read_media(set(next(calls)), root),
            "take": lambda reader=reader: reader.read(next(calls)),
            "lance": lambda frames=frames, offsets=offsets: frames.dataset.take(
                next(offsets), columns=["patches"]
            ),
            "first": first_s,
            "same": all(torch.equal(torch.as_tensor(old[k].patches), new[k].patches) for k in old),
        }
    # Interleaved rounds over both tables (the machine is shared: a busy moment then costs every path
    # alike); best of each.
    best = {(root, key): float("inf") for root in paths for key in ("scan", "take", "lance")}
    for _ in range(args.rounds):
        for root, path in paths.items():
            for key, repeats in (("scan", 1), ("take", 10), ("lance", 10)):
                best[root, key] = min(best[root, key], best_of(path[key], repeats)[0])

    started = time.perf_counter()
    tables.open_table("video_frames", root=compacted).create_scalar_index("sample_id", index_type="BTREE")
    index_s = time.perf_counter() - started
    indexed = tables.open_table("video_frames", root=compacted)

    def btree():
        ids = sorted(next(calls))
        return indexed.to_table(
            columns=["sample_id", "frame_index", "grid_h", "grid_w", "patches"],
            filter=pc.field("sample_id").isin(ids),
        )

    btree_s, _ = best_of(btree)
    frames_per_batch = args.batch_videos * args.frames
    print(
        f"\nfetch one micro-batch ({args.batch_videos} videos, {frames_per_batch} frames), best of "
        f"{args.rounds} rounds, interleaved; each path against the scan of the same table:"
    )
    heads = [f"{fragments[appended]} fragments (appended)", f"{fragments[compacted]} (flow's compaction)"]
    print(f"{'':<40}{heads[0]:>26}{heads[1]:>26}")
    print(f"{'':<40}" + f"{'ms':>14}{'vs scan':>12}" * 2)
    for label, key in (
        ("filtered scans (before, verbatim)", "scan"),
        ("MediaReader.read, take by offsets (now)", "take"),
        ("  of which Lance take alone (floor)", "lance"),
    ):
        print(
            f"{label:<40}"
            + "".join(f"{best[r, key] * 1e3:>14.2f}{best[r, 'scan'] / best[r, key]:>11.1f}x" for r in paths)
        )
    scan_s = best[compacted, "scan"]
    print(f"{'BTREE index + filter (not kept)':<40}{'':>26}{btree_s * 1e3:>14.2f}{scan_s / btree_s:>11.1f}x")
    print(
        f"one-time: offsets index {paths[appended]['first']:.2f} / {paths[compacted]['first']:.2f} s (first "
        f"read, key columns scanned once per reader); BTREE build {index_s:.2f} s (a write, to redo after "
        f"appends); pixels equal: {all(p['same'] for p in paths.values())}"
    )
    ratio = scan_s / best[compacted, "take"]
    target = "met" if ratio >= 50 else "NOT met"
    print(f"target take >= 50x the filtered scan, on the flow's table: {target} ({ratio:.0f}x)")


def loader_part(args, home: Path) -> None:
    import torch

    from keyeflow.datasets.sample_reader import LanceSampleReader
    from keyeflow.model.config import tiny
    from keyeflow.model.modeling import KeyeForConditionalGeneration
    from keyeflow.training import distributed
    from keyeflow.training.engine import Engine
    from keyeflow.training.loader import MixtureLoader
    from keyeflow.training.trainer import tables_root, train_samples_of, train_step

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_trainer import build_data

    started = time.perf_counter()
    built = build_data(home, args.max_length, args.image_tokens)
    print(
        f"\nsample corpus: mixture of {built.report.num_rows} samples, "
        f"{built.report.reached_tokens:,} tokens (built in {time.perf_counter() - started:.1f} s)"
    )

    def loader(prefetch: int) -> MixtureLoader:
        reader = LanceSampleReader(
            train_samples_of(built.mixture, built.mixture_id), root=tables_root(built.mixture)
        )
        return MixtureLoader(
            built.mixture,
            built.mixture_id,
            rank=0,
            world_size=1,
            max_length=args.max_length,
            micro_batches_per_step=args.micro_batches,
            seed=0,
            sample_reader=reader,
            window_size=args.window,
            num_epochs=None,
            prefetch=prefetch,
        )

    # Loader alone, reading in this thread: its own cost per sample (after one warm-up step).
    it = iter(loader(0))
    steps = [[next(it) for _ in range(args.micro_batches)] for _ in range(args.steps + 1)]
    started = time.perf_counter()
    more = [[next(it) for _ in range(args.micro_batches)] for _ in range(args.steps)]
    load_s = time.perf_counter() - started
    load_samples = sum(len(mb.sample_ids) for step in more for mb in step)

    # The trainer's consumption: train_step on the tiny model over already-read micro-batches.
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(tiny())
    dist = distributed.setup()
    engine = Engine(model, dist=dist, learning_rate=1e-3, lr_at=lambda step: 1e-3, grad_clip=1.0)
    pad_id = model.config.text_config.pad_token_id or 0
    train_step(engine, steps[0], pad_id, None)
    started = time.perf_counter()
    for step in steps[1:]:
        train_step(engine, step, pad_id, None)
    train_s = time.perf_counter() - started
    train_samples = sum(len(mb.sample_ids) for step in steps[1:] for mb in step)

    # Both together, the loader reading ahead in its thread: the step's wait for data.
    it = iter(loader(args.micro_batches))
    waited, started = 0.0, time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        step = [next(it) for _ in range(args.micro_batches)]
        waited += time.perf_counter() - t
        train_step(engine, step, pad_id, None)
    both_s = time.perf_counter() - started
    it.close()
    print(
        f"{args.steps} steps × {args.micro_batches} micro-batches of {args.window // args.micro_batches} "
        f"samples, max_length {args.max_length}, tiny model, torch threads {torch.get_num_threads()}:"
    )
    print(f"{'':<40}{'samples/s':>10}")
    print(f"{'loader alone (reads in caller thread)':<40}{load_samples / load_s:>10.1f}")
    print(f"{'train_step alone (tiny model)':<40}{train_samples / train_s:>10.1f}")
    print(
        f"loader / trainer: {load_samples / load_s / (train_samples / train_s):.1f}x; with prefetch the step "
        f"waited {waited:.3f} s for data over {both_s:.2f} s ({100 * waited / both_s:.1f}%)"
    )


def storage_part() -> None:
    import glob

    from keyeflow.datasets import tables

    def on_disk(uri: str) -> int:
        return sum(
            os.path.getsize(f) for f in glob.glob(uri + "/data/**", recursive=True) if os.path.isfile(f)
        )

    videos = (
        tables.open_table("videos").to_table(columns=["video_id", "size_bytes", "duration_s"]).to_pylist()
    )
    done = set(
        tables.open_table("video_samples").to_table(columns=["video_id"]).column("video_id").to_pylist()
    )
    source = sum(v["size_bytes"] for v in videos if v["video_id"] in done)
    seconds = sum(v["duration_s"] for v in videos if v["video_id"] in done)
    frames = tables.open_table("video_frames")
    raw = sum(len(b) for b in frames.to_table(columns=["patches"]).column("patches").to_pylist())
    stored = on_disk(frames.uri)
    encoding = dict(frames.schema.field("patches").metadata or {})
    print(
        f"\nstorage, sample clips ({len(done)} videos, {seconds:.0f} s, {frames.count_rows()} frames; "
        f"patches field { ({k.decode(): v.decode() for k, v in encoding.items()}) }):"
    )
    print(f"{'':<28}{'bytes':>12}{'bytes/s video':>15}{'x source':>10}")
    for name, size in (("source videos", source), ("raw patches", raw), ("video_frames on disk", stored)):
        print(f"{name:<28}{size:>12,}{size / seconds:>15,.0f}{size / source:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=62_500)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch-videos", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds of part 1")
    parser.add_argument("--window", type=int, default=8, help="samples per step")
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--image-tokens", type=int, default=256)
    args = parser.parse_args()

    # Temporary homes, removed at the end (the two 1M-row tables alone are ~30 MB)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as scratch:
        big, home = Path(scratch) / "big", Path(scratch) / "home"
        big.mkdir()
        home.mkdir()
        os.environ["KEYEFLOW_HOME"] = str(big)
        fetch_part(args, big)
        os.environ["KEYEFLOW_HOME"] = str(home)
        loader_part(args, home)
        storage_part()


if __name__ == "__main__":
    main()
