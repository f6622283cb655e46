"""Prefect tasks for images, training samples and mixtures; each wraps one domain function."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from keyeflow import lineage
from keyeflow.datasets import conversations, images, mixture, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.slowfast import SlowFastConfig
from keyeflow.quality import gates
from keyeflow.tasks.common import ProgressTracker, log_quarantined, max_failing_share, progress, publish_gate

_SHARD = {"retries": 2, "retry_delay_seconds": 2, "cache_policy": NO_CACHE}


@task(cache_policy=NO_CACHE)
def plan_images(paths: list[str], shard_size: int) -> list[list[str]]:
    from keyeflow.datasets.ingest import IngestConfig

    return images.plan_image_shards(paths, IngestConfig(shard_size=shard_size))


@task(**_SHARD)  # untagged like the video shards (keyeflow/tasks/video.py says why)
def ingest_image_shard(uris: list[str], config: ImageConfig, tracker: ProgressTracker | None = None) -> dict:
    report = images.ingest_images_shard(uris, config, on_item=tracker.advance if tracker else None)
    log_quarantined(report.quarantined)
    return report.to_dict()


@task(cache_policy=NO_CACHE)
def gate_images(samples: tables.TableRef, config: ImageConfig, run_id: str) -> None:
    verdict = gates.check_image_samples(samples, config, max_failing_share=max_failing_share("image_samples"))
    publish_gate(verdict, samples, run_id)


@task(cache_policy=NO_CACHE)
def referenced_media(paths: list[str], source_root: str) -> dict[str, list[str]]:
    return conversations.referenced_media(paths, source_root)


@task(**_SHARD)
def build_train_samples(
    paths: list[str], source_root: str, slowfast: SlowFastConfig, image_config: ImageConfig
) -> dict:
    files = conversations.discover_sources(paths)
    with progress(len(files), "samples-progress", "samples") as tracker:
        report = conversations.build_train_samples(
            paths, source_root, slowfast, image_config, on_item=tracker.advance
        )
    log_quarantined(report.quarantined)
    return report.__dict__


@task(cache_policy=NO_CACHE)
def gate_train_samples(samples: tables.TableRef, run_id: str) -> None:
    verdict = gates.check_train_samples(samples, max_failing_share=max_failing_share("train_samples"))
    publish_gate(verdict, samples, run_id)


@task(cache_policy=NO_CACHE)
def build_mixture(
    samples: tables.TableRef, config: mixture.MixtureConfig, quarantine: tables.TableRef, run_id: str
) -> mixture.MixtureResult:
    result = mixture.build_mixture(samples, config, quarantine)
    _publish_report(result.report, run_id)
    return result


def _publish_report(report: mixture.MixtureReport, run_id: str) -> None:
    import matplotlib.pyplot as plt

    from keyeflow.datasets.mixture_figures import shares_chart

    figure = shares_chart(report)
    lineage.log_figure(run_id, figure, "mixture_shares.png")
    plt.close(figure)
    lineage.log_dict(run_id, report.to_dict(), "mixture_report.json")
    lineage.log_metrics(
        run_id,
        {f"share_{m.modality}": m.reached_share for m in report.modalities}
        | {f"tokens_{m.modality}": m.reached_tokens for m in report.modalities},
    )
    create_markdown_artifact(
        report.markdown() + f"\n\nChart: `mixture_shares.png` on MLflow run `{run_id}`.",
        key=f"mixture-stage-{report.stage}",
    )


@task(cache_policy=NO_CACHE)
def gate_mixture(
    result: mixture.MixtureResult,
    config: mixture.MixtureConfig,
    quarantine: tables.TableRef,
    samples: tables.TableRef,
    run_id: str,
) -> None:
    verdict = gates.check_mixture(result.mixture, result.mixture_id, config, quarantine, samples)
    publish_gate(verdict, result.mixture, run_id)
