"""Video flows: ingest → pre-tokenise (Slow-Fast) → gates. They only wire tasks together and pass
table references (URI + Lance version), never frames."""

from __future__ import annotations

from prefect import flow

from keyeflow.datasets import tables
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.tasks import video as t
from keyeflow.tasks.common import current_ref, lineage_run, progress, record_outputs, task_runner

# Chosen from KEYEFLOW_TASK_RUNNER when this module is imported: a flow's runner is fixed when it is
# decorated, and reading it here (not per call) makes subflows, the CLI and deployments agree.
RUNNER = task_runner()


@flow(name="ingest-videos", task_runner=RUNNER)
def ingest_videos(paths: list[str], shard_size: int = 16, parent_run_id: str | None = None) -> dict:
    """Register every distinct video under ``paths``; quarantine what cannot be used."""
    with lineage_run("ingest-videos", {"paths": paths, "shard_size": shard_size}, parent_run_id) as run_id:
        shards = t.plan_ingest(paths, shard_size)
        with progress(sum(map(len, shards)), "ingest-progress", "ingest") as tracker:
            # In order, one after another: the first file (in sorted order) with given bytes owns them and
            # later copies are recorded as duplicates, whatever the scheduling. Ingestion only hashes and
            # probes; the expensive decoding runs in parallel in pre-tokenisation.
            reports = [t.ingest_shard(shard, tracker) for shard in shards]
        totals = {
            k: sum(r[k] for r in reports)
            for k in ("num_seen", "num_ingested", "num_already_present", "num_duplicates", "num_quarantined")
        }
        videos, quarantine = current_ref("videos"), current_ref("quarantine")
        record_outputs(run_id, [videos, quarantine], metrics=totals)
        t.gate_videos(videos, run_id)
        return {"videos": videos, "quarantine": quarantine, "run_id": run_id, **totals}


@flow(name="pretokenize-videos", task_runner=RUNNER)
def pretokenize_videos(
    preset: str = "paper",
    overrides: dict | None = None,
    videos_version: int | None = None,
    shard_size: int = 4,
    parent_run_id: str | None = None,
) -> dict:
    """Slow-Fast pre-tokenise the videos table (at a pinned version, or the latest)."""
    config = resolve_config(preset, **(overrides or {}))
    videos = (
        tables.TableRef("videos", tables.table_uri("videos"), videos_version)
        if videos_version
        else current_ref("videos")
    )
    params = {
        "preset": preset,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "videos_version": videos.version,
    }
    with lineage_run("pretokenize-videos", params, parent_run_id) as run_id:
        shards = t.plan_pretokenize(videos, config, shard_size)
        with progress(sum(map(len, shards)), "pretokenize-progress", "pre-tokenise") as tracker:
            futures = [t.pretokenize_shard.submit(shard, config, tracker.for_tasks()) for shard in shards]
            reports = tracker.results(futures, shards)
        # One fragment where the shards appended many: the loader's reads cost per fragment touched.
        t.compact_video_frames()
        totals = {
            k: sum(r[k] for r in reports)
            for k in ("num_videos", "num_done", "num_quarantined", "total_tokens")
        }
        samples, frames, quarantine = (
            current_ref("video_samples"),
            current_ref("video_frames"),
            current_ref("quarantine"),
        )
        record_outputs(run_id, [samples, frames, quarantine], inputs=[videos], metrics=totals)
        t.gate_video_samples(samples, frames, config, run_id)
        t.log_frame_strips(samples, frames, run_id)
        return {
            "video_samples": samples,
            "video_frames": frames,
            "quarantine": quarantine,
            "config_hash": config.config_hash(),
            "run_id": run_id,
            **totals,
        }


@flow(name="video-pipeline")
def video_pipeline(
    paths: list[str],
    preset: str = "paper",
    overrides: dict | None = None,
    shard_size: int = 16,
    pretokenize_shard_size: int = 4,
    parent_run_id: str | None = None,
) -> dict:
    """Ingest then pre-tokenise; the pre-tokenisation reads exactly the videos version ingestion made."""
    params = {"paths": paths, "preset": preset, "overrides": overrides or {}}
    with lineage_run("video-pipeline", params, parent_run_id) as run_id:
        ingested = ingest_videos(paths, shard_size=shard_size, parent_run_id=run_id)
        tokenised = pretokenize_videos(
            preset,
            overrides,
            videos_version=ingested["videos"].version,
            shard_size=pretokenize_shard_size,
            parent_run_id=run_id,
        )
        return {"run_id": run_id, "ingest": ingested, "pretokenize": tokenised}
