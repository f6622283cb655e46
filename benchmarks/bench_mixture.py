"""build_mixture's DuckDB computation vs the same algorithm in pandas, on 1M synthetic train_samples.

    python benchmarks/bench_mixture.py [--rows 1000000] [--repeat 3]

Both read the same pinned Lance table and quarantine, exclude the same samples, plan with the same
:func:`keyeflow.datasets.mixture.plan_quotas`, rank by the same md5 keys and pick the boundary samples
the same way; the benchmark checks they choose identical (sample_id, repeats, order) rows, then prints
a side-by-side table (best of ``--repeat`` runs) and the ratio. The pandas column is split into its
md5 keys (no vectorised md5 exists in pandas; hashlib per row) and the rest, so the comparison is
visible with and without that handicap.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keyeflow.datasets import mixture, tables
from keyeflow.datasets.mixture import MixtureConfig, compute_mixture, stage_mixture

# modality → (share of rows, lognormal median tokens, sigma, min, max, sources, tasks)
SHAPES = {
    # Long videos: Slow-Fast budgets put most between 5K and 60K tokens, a tail past the 128K context.
    "video": (
        0.06,
        18_000,
        0.9,
        1_000,
        200_000,
        ["yt-long", "ego-clips", "movie-qa", "howto-steps"],
        ["caption", "vqa", "grounding"],
    ),
    # Medium images: a few hundred to a few thousand tokens, up to the 20,480-token image cap + text.
    "image": (
        0.54,
        1_200,
        0.8,
        64,
        21_000,
        ["captions-coco-like", "ocr-docs", "grounding-refcoco-like", "charts", "interleaved-web", "vqa-mix"],
        ["caption", "ocr", "grounding", "vqa", "interleaved"],
    ),
    # Short texts, with long documents in the tail.
    "text": (0.40, 500, 1.1, 8, 140_000, ["web-text", "code", "math-text"], ["text"]),
}


def synthetic_samples(num_rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    parts = []
    start = 0
    for modality, (fraction, median, sigma, low, high, sources, tasks) in SHAPES.items():
        n = round(num_rows * fraction) if modality != "text" else num_rows - start
        tokens = np.clip(rng.lognormal(np.log(median), sigma, n), low, high).astype(np.int64)
        text = tokens if modality == "text" else np.minimum(tokens, rng.integers(16, 400, n))
        # Uneven sources: the first source of each modality is the biggest.
        source_p = np.arange(len(sources), 0, -1, dtype=float)
        source_idx = rng.choice(len(sources), n, p=source_p / source_p.sum())
        ids = np.char.add(f"{modality}-", np.char.zfill(np.arange(start, start + n).astype(str), 8))
        src = np.asarray(sources)[source_idx]
        media = pa.array([[] if modality == "text" else [i] for i in ids.tolist()], pa.list_(pa.string()))
        parts.append(
            pa.table(
                {
                    "sample_id": ids,
                    "source": src,
                    "task": np.asarray(tasks)[rng.integers(0, len(tasks), n)],
                    "modality": np.full(n, modality),
                    "num_tokens": tokens,
                    "num_text_tokens": text.astype(np.int64),
                    "num_vision_tokens": (tokens - text).astype(np.int64),
                    "media_ids": media,
                    "source_uri": np.char.add(np.char.add("s3://corpus/", src), np.char.add("/", ids)),
                    "content_hash": np.char.zfill(np.arange(start, start + n).astype(str), 16),
                    "config_hash": np.full(n, "tok-v1"),
                    "messages": np.full(n, "[]"),
                    "created_at": pa.array(
                        np.full(n, np.datetime64("2026-01-01T00:00:00", "us")), pa.timestamp("us", tz="UTC")
                    ),
                }
            )
        )
        start += n
    return pa.concat_tables(parts).cast(tables.SCHEMAS["train_samples"])


# ---------------------------------------------------------------------------------------------- pandas


def md5_keys(prefix: str, ids: np.ndarray) -> np.ndarray:
    """The same key as DuckDB's ``md5_number_upper(prefix || id)``: the digest's first 8 bytes,
    little-endian."""
    digest = b"".join(hashlib.md5((prefix + i).encode()).digest()[:8] for i in ids)
    return np.frombuffer(digest, dtype="<u8")


def pandas_mixture(
    samples: tables.TableRef,
    config: MixtureConfig,
    quarantine: tables.TableRef | None,
    timings: dict[str, float],
) -> pd.DataFrame:
    t0 = time.perf_counter()
    df = (
        lance.dataset(samples.uri, version=samples.version)
        .to_table(columns=["sample_id", "modality", "source", "task", "num_tokens", "source_uri"])
        .to_pandas()
    )
    bad = set()
    if quarantine is not None:
        bad = set(
            lance.dataset(quarantine.uri, version=quarantine.version)
            .to_table(columns=["uri"])
            .column("uri")
            .to_pylist()
        )
    t1 = time.perf_counter()

    reason = pd.Series(None, index=df.index, dtype=object)

    def mark(condition, name):
        reason[reason.isna() & condition] = name

    if quarantine is not None:
        mark(df.source_uri.isin(bad), mixture.QUARANTINED)
    mark(~df.modality.isin(config.targeted_modalities), mixture.MODALITY_NOT_IN_MIXTURE)
    if config.tasks is not None:
        mark(~df.task.isin(config.tasks), mixture.TASK_NOT_IN_STAGE)
    mark(df.num_tokens.isna() | (df.num_tokens <= 0), mixture.NO_TOKENS)
    mark(df.num_tokens > config.max_sample_tokens, mixture.OVER_LENGTH)
    zero = [s for s, w in config.source_weights.items() if w == 0]
    if zero:
        mark(df.source.isin(zero), mixture.SOURCE_WEIGHT_ZERO)
    df["reason"] = reason
    groups = (
        df.groupby(["reason", "modality", "source"], dropna=False, sort=True)
        .agg(n=("sample_id", "size"), tokens=("num_tokens", "sum"))
        .reset_index()
    )
    rows = [(None if pd.isna(r) else r, m, s, n, t) for r, m, s, n, t in groups.itertuples(index=False)]
    excluded = mixture._exclusions(rows)
    available = [(m, s, int(t), int(n)) for r, m, s, n, t in rows if r is None]
    plan = mixture.plan_quotas(available, config, excluded)

    plan_df = pd.DataFrame(
        [
            {
                "modality": p.modality,
                "source": p.source,
                "full_passes": p.full_passes,
                "remainder": p.remainder,
                "available": p.available_tokens,
                "cap_tokens": p.cap_tokens,
            }
            for p in plan.sources
        ]
    )
    e = df.loc[df.reason.isna(), ["sample_id", "modality", "source", "num_tokens"]].merge(
        plan_df, on=["modality", "source"]
    )
    t2 = time.perf_counter()
    e["key"] = md5_keys(f"{config.seed}:", e.sample_id.to_numpy())
    t3 = time.perf_counter()

    e = e.sort_values(["modality", "source", "key", "sample_id"], kind="stable")
    e["cum"] = e.groupby(["modality", "source"], sort=False).num_tokens.cumsum()
    partial = (e.remainder > 0) & (e.full_passes * e.available + e.cum <= e.cap_tokens)
    e["progress"] = np.where(partial, (e.cum - e.num_tokens / 2.0) / e.remainder.where(partial, 1.0), np.nan)
    e = e.sort_values(["modality", "progress", "sample_id"], na_position="last", kind="stable")
    e["mcum"] = e.num_tokens.where(e.progress.notna(), 0).groupby(e.modality, sort=False).cumsum()
    rem = e.modality.map(plan.remainders)
    prev = e.mcum - e.num_tokens
    take = e.progress.notna() & ((e.mcum <= rem) | ((prev < rem) & (e.mcum - rem < rem - prev)))
    e["repeats"] = e.full_passes + take.astype(int)
    used = e.loc[e.repeats > 0, ["sample_id", "modality", "source", "num_tokens", "repeats"]]
    t4 = time.perf_counter()
    order_key = md5_keys(f"{config.seed}:order:", used.sample_id.to_numpy())
    t5 = time.perf_counter()
    used = used.assign(order_key=order_key).sort_values(["order_key", "sample_id"], kind="stable")
    used["order"] = np.arange(len(used), dtype=np.int64)
    used = used.drop(columns="order_key")
    t6 = time.perf_counter()
    timings.update(read=t1 - t0, md5=(t3 - t2) + (t5 - t4), compute=(t2 - t1) + (t4 - t3) + (t6 - t5))
    return used


# ---------------------------------------------------------------------------------------------- main


def best_of(repeat: int, fn, timings: dict | None = None):
    """Best wall time of ``repeat`` runs; ``timings`` (filled by ``fn``) is kept from the best run."""
    best, result, best_timings = float("inf"), None, {}
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, result = elapsed, out
            best_timings = dict(timings or {})
    if timings is not None:
        timings.clear()
        timings.update(best_timings)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_mixture_") as tmp:
        root = str(Path(tmp) / "tables")
        start = time.perf_counter()
        data = synthetic_samples(args.rows, args.seed)
        lance.write_dataset(data, tables.table_uri("train_samples", root), mode="create")
        samples = tables.ref("train_samples", root)
        # 0.5% of the corpus quarantined upstream (undecodable media and the like).
        bad = data.column("source_uri").to_pylist()[::200]
        tables.upsert("quarantine", [tables.quarantine_row(u, "decode failed", "ingest") for u in bad], root)
        quarantine = tables.ref("quarantine", root)
        setup_s = time.perf_counter() - start

        config = stage_mixture(3, seed=args.seed)
        duck_s, selection = best_of(args.repeat, lambda: compute_mixture(samples, config, quarantine, root))
        pandas_timings: dict[str, float] = {}
        pandas_s, pandas_rows = best_of(
            args.repeat, lambda: pandas_mixture(samples, config, quarantine, pandas_timings), pandas_timings
        )
        start = time.perf_counter()
        built = mixture.build_mixture(samples, config, quarantine, root)
        build_s = time.perf_counter() - start

        duck = selection.rows.select(["sample_id", "repeats", "order"]).to_pandas()
        duck = duck.sort_values("sample_id").reset_index(drop=True)
        other = pandas_rows[["sample_id", "repeats", "order"]].sort_values("sample_id").reset_index(drop=True)
        same_rows = duck.astype({"repeats": "int64"}).equals(other.astype({"repeats": "int64"}))
        report = selection.report

        print(
            f"train_samples: {args.rows:,} rows ({', '.join(f'{m} {SHAPES[m][0]:.0%}' for m in SHAPES)} "
            f"of rows), {len(bad):,} quarantined; setup {setup_s:.1f} s; {os.cpu_count()} cores"
        )
        print(report.markdown())
        print()
        print("| step | DuckDB | pandas |")
        print("|---|---|---|")
        print(
            f"| whole computation (read Lance → rows + report), best of {args.repeat} | {duck_s:.2f} s | "
            f"{pandas_s:.2f} s |"
        )
        print(f"|   of which: read Lance | (pushed into the query) | {pandas_timings['read']:.2f} s |")
        print(f"|   of which: md5 keys | (in the query) | {pandas_timings['md5']:.2f} s |")
        print(
            f"|   of which: exclude, plan, rank, select, order | (in the query) | "
            f"{pandas_timings['compute']:.2f} s |"
        )
        print(
            f"| build_mixture incl. writing {built.report.num_rows:,} rows to Lance | {build_s:.2f} s | — |"
        )
        print()
        print(
            f"ratio pandas / DuckDB: {pandas_s / duck_s:.1f}x "
            f"(without pandas' md5 cost: {(pandas_s - pandas_timings['md5']) / duck_s:.1f}x)"
        )
        print(
            f"same rows (sample_id, repeats, order): {same_rows} "
            f"({len(duck):,} DuckDB rows, {len(other):,} pandas rows)"
        )
        print(f"DuckDB under 10 s: {duck_s < 10}")
        if not same_rows:
            raise SystemExit("DuckDB and pandas chose different rows")


if __name__ == "__main__":
    main()
