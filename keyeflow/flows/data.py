"""Data flows beyond video: images, training samples (conversations, captions, text) and stage mixtures,
and the `data-pipeline` flow that chains them with the video flows. Wiring only; table references flow
between tasks."""

from __future__ import annotations

from prefect import flow

from keyeflow.datasets import mixture as mixture_mod
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.datasets.tables import TableRef, table_uri
from keyeflow.flows.video import video_pipeline
from keyeflow.tasks import data as t
from keyeflow.tasks.common import current_ref, lineage_run, progress, record_outputs, task_runner

RUNNER = task_runner()  # KEYEFLOW_TASK_RUNNER, read at import like the video flows'


@flow(name="ingest-images", task_runner=RUNNER)
def ingest_images(
    paths: list[str], max_tokens: int = 20480, shard_size: int = 32, parent_run_id: str | None = None
) -> dict:
    """Register and pre-tokenise images (EXIF-upright, smart-resized to 4..max_tokens tokens)."""
    config = ImageConfig(max_tokens=max_tokens)
    params = {"paths": paths, "config": config.__dict__, "config_hash": config.config_hash()}
    with lineage_run("ingest-images", params, parent_run_id) as run_id:
        shards = t.plan_images(paths, shard_size)
        with progress(sum(map(len, shards)), "images-progress", "images") as tracker:
            futures = [t.ingest_image_shard.submit(shard, config, tracker.for_tasks()) for shard in shards]
            reports = tracker.results(futures, shards)
        totals = {k: sum(r[k] for r in reports) for k in ("num_seen", "num_ingested", "num_quarantined")}
        outputs = [current_ref("images"), current_ref("image_samples"), current_ref("quarantine")]
        record_outputs(run_id, outputs, metrics=totals)
        t.gate_images(outputs[1], config, run_id)
        return {"image_samples": outputs[1], "run_id": run_id, **totals}


@flow(name="build-train-samples")
def build_train_samples(
    paths: list[str],
    source_root: str,
    preset: str = "paper",
    max_image_tokens: int = 20480,
    parent_run_id: str | None = None,
) -> dict:
    """Ingest the media that conversations reference, then count every sample's tokens into train_samples."""
    slowfast, image_config = resolve_config(preset), ImageConfig(max_tokens=max_image_tokens)
    with lineage_run(
        "build-train-samples", {"paths": paths, "source_root": source_root, "preset": preset}, parent_run_id
    ) as run_id:
        media = t.referenced_media(paths, source_root)
        if media["video"]:
            video_pipeline(media["video"], preset=preset, parent_run_id=run_id)
        if media["image"]:
            ingest_images(media["image"], max_tokens=max_image_tokens, parent_run_id=run_id)
        report = t.build_train_samples(paths, source_root, slowfast, image_config)
        samples, quarantine = current_ref("train_samples"), current_ref("quarantine")
        record_outputs(
            run_id,
            [samples, quarantine],
            metrics={"num_written": report["num_written"], "num_quarantined": report["num_quarantined"]}
            | {f"tokens_{k}": v for k, v in report["tokens_by_modality"].items()},
        )
        t.gate_train_samples(samples, run_id)
        return {
            "train_samples": samples,
            "quarantine": quarantine,
            "run_id": run_id,
            "num_written": report["num_written"],
            "num_quarantined": report["num_quarantined"],
        }


@flow(name="build-mixture")
def build_mixture(
    stage: int,
    overrides: dict | None = None,
    samples_version: int | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """The stage's token-balanced mixture over train_samples (pinned version, or the latest)."""
    config = mixture_mod.stage_mixture(stage, **(overrides or {}))
    samples = (
        TableRef("train_samples", table_uri("train_samples"), samples_version)
        if samples_version
        else current_ref("train_samples")
    )
    quarantine = current_ref("quarantine")
    params = {"stage": stage, "config": config.to_dict(), "config_hash": config.config_hash()}
    with lineage_run(f"mixture-stage-{stage}", params, parent_run_id) as run_id:
        result = t.build_mixture(samples, config, quarantine, run_id)
        record_outputs(run_id, [result.mixture], inputs=[samples, quarantine])
        t.gate_mixture(result, config, quarantine, samples, run_id)
        return {
            "mixture": result.mixture,
            "mixture_id": result.mixture_id,
            "run_id": run_id,
            "shares": {m.modality: m.reached_share for m in result.report.modalities},
        }


@flow(name="data-pipeline")
def data_pipeline(
    videos: list[str],
    images: list[str],
    sources: list[str],
    source_root: str,
    preset: str = "paper",
    stages: list[int] = (1, 2, 3),
    mixture_overrides: dict | None = None,
) -> dict:
    """Everything before training: media, samples, and one mixture per pre-training stage."""
    with lineage_run("data-pipeline", {"preset": preset, "stages": list(stages)}) as run_id:
        video = video_pipeline(videos, preset=preset, parent_run_id=run_id) if videos else None
        image = ingest_images(images, parent_run_id=run_id) if images else None
        samples = build_train_samples(sources, source_root, preset=preset, parent_run_id=run_id)
        mixtures = {
            stage: build_mixture(
                stage,
                (mixture_overrides or {}).get(str(stage)),
                samples["train_samples"].version,
                parent_run_id=run_id,
            )
            for stage in stages
        }
        return {"run_id": run_id, "video": video, "image": image, "samples": samples, "mixtures": mixtures}
