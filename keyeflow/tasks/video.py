"""Prefect tasks of the video path; each wraps one domain function with retries, tags and progress."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from keyeflow import lineage
from keyeflow.config import get_settings
from keyeflow.datasets import ingest, pretokenize, strips, tables
from keyeflow.datasets.slowfast import SlowFastConfig
from keyeflow.quality import gates
from keyeflow.tasks.common import ProgressTracker, log_quarantined, max_failing_share, publish_gate

# Shard tasks retry: a remote read or a concurrent Lance commit can fail transiently, and a retried
# shard is harmless because every write is keyed. Bad files never raise here; they are quarantined.
# No tags on shard tasks: a tagged task asks the server for tag concurrency slots before it runs, and on a
# SQLite-backed server those calls meet "database busy" retries that cost 30 % on a 2,000-video ingest
# (benchmarks/bench_prefect_load.py). Cap data-flow parallelism with the task runner instead.
_SHARD = {"retries": 2, "retry_delay_seconds": 2, "cache_policy": NO_CACHE}


@task(cache_policy=NO_CACHE)
def plan_ingest(paths: list[str], shard_size: int) -> list[list[str]]:
    shards = ingest.plan_shards(paths, ingest.IngestConfig(shard_size=shard_size))
    get_run_logger().info("%d files in %d shards", sum(map(len, shards)), len(shards))
    return shards


@task(**_SHARD)
def ingest_shard(uris: list[str], tracker: ProgressTracker | None = None) -> dict:
    report = ingest.ingest_shard(uris, on_item=tracker.advance if tracker else None)
    log_quarantined(report.quarantined)
    return report.to_dict()


@task(cache_policy=NO_CACHE)
def plan_pretokenize(videos: tables.TableRef, config: SlowFastConfig, shard_size: int) -> list[list[dict]]:
    rows = pretokenize.pending_videos(videos, config)
    get_run_logger().info("%d videos to pre-tokenise with config %s", len(rows), config.config_hash())
    return [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]


@task(**_SHARD)
def pretokenize_shard(
    rows: list[dict], config: SlowFastConfig, tracker: ProgressTracker | None = None
) -> dict:
    report = pretokenize.pretokenize_shard(
        rows, config, spool_dir=get_settings().work_dir, on_item=tracker.advance if tracker else None
    )
    log_quarantined(report.quarantined)
    return report.__dict__


@task(**_SHARD)  # retried like a shard: a compaction commits once or not at all, so a retry is harmless
def compact_video_frames() -> int:
    return pretokenize.compact_frames()


@task(cache_policy=NO_CACHE)
def gate_videos(videos: tables.TableRef, run_id: str) -> None:
    publish_gate(gates.check_videos(videos, max_failing_share=max_failing_share("videos")), videos, run_id)


@task(cache_policy=NO_CACHE)
def gate_video_samples(
    samples: tables.TableRef, frames: tables.TableRef, config: SlowFastConfig, run_id: str
) -> None:
    verdict = gates.check_video_samples(
        samples, frames, config, max_failing_share=max_failing_share("video_samples")
    )
    publish_gate(verdict, samples, run_id)


@task(cache_policy=NO_CACHE)
def log_frame_strips(samples: tables.TableRef, frames: tables.TableRef, run_id: str) -> None:
    import matplotlib.pyplot as plt
    from prefect.artifacts import create_markdown_artifact

    figure = strips.frame_strips(samples, frames)
    lineage.log_figure(run_id, figure, "slowfast_strips.png")
    plt.close(figure)
    create_markdown_artifact(
        f"Slow/Fast frame strips are attached to MLflow run `{run_id}` as `slowfast_strips.png`.",
        key="slowfast-strips",
    )
