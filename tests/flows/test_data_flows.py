"""The data-pipeline flow under Prefect's harness: media → samples → stage mixtures, gated and tracked."""

from __future__ import annotations

import pytest

from keyeflow import lineage
from keyeflow.datasets import sql, tables
from keyeflow.training.recipes import pretrain_recipe


@pytest.fixture(autouse=True)
def _prefect(prefect_harness):
    yield


def test_data_pipeline_builds_gated_mixtures_with_charts(home, sample_corpus, media_dir):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from keyeflow.flows.data import data_pipeline

    corpus = str(sample_corpus["conversations"].parent)
    # Stage 2 as `keyeflow run` builds it: with the tiny recipe's overrides (its upsampling), which reach
    # the stage's shares on data too small to reach them using each sample once.
    tiny = pretrain_recipe("tiny")
    result = data_pipeline(
        [], [], [corpus], str(media_dir), stages=[1, 2, 3], mixture_overrides={"2": tiny.mixture_overrides(2)}
    )
    stage2 = result["mixtures"][2]
    for modality, target in {"video": 0.2, "image": 0.6, "text": 0.2}.items():
        assert abs(stage2["shares"][modality] - target) <= 0.005, stage2["shares"]
    stage3 = result["mixtures"][3]
    assert abs(stage3["shares"]["video"] - 0.24) <= 0.005
    assert abs(stage3["shares"]["image"] - 0.50) <= 0.005
    assert abs(stage3["shares"]["text"] - 0.26) <= 0.005
    assert set(result["mixtures"][1]["shares"]) == {"image"}

    run = lineage.client().get_run(stage3["run_id"])
    assert run.data.tags["keyeflow.gate.mixture"] == "passed"
    assert run.data.tags["keyeflow.input.train_samples"].endswith(
        f"@v{result['samples']['train_samples'].version}"
    )
    assert run.data.tags[lineage.PARENT_TAG] == result["run_id"]
    files = {a.path for a in lineage.client().list_artifacts(stage3["run_id"])}
    assert {"mixture_shares.png", "mixture_report.json"} <= files
    assert abs(run.data.metrics["share_text"] - 0.26) <= 0.005

    gates_run = sql.query("select gate, bool_and(passed) as ok from gate_results group by gate order by gate")
    assert dict(zip(gates_run.gate, gates_run.ok)) == {
        "image_samples": True,
        "mixture": True,
        "train_samples": True,
        "video_samples": True,
        "videos": True,
    }
    with get_client(sync_client=True) as client:
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["mixture-stage-3", "gate-mixture", "samples-progress"])
                )
            )
        }
    assert keys == {"mixture-stage-3", "gate-mixture", "samples-progress"}

    # nothing changed: the samples table keeps its version, so the stage-3 mixture id is the same
    again = data_pipeline([], [], [corpus], str(media_dir), stages=[3])
    assert again["mixtures"][3]["mixture_id"] == stage3["mixture_id"]
    assert tables.ref("train_samples").version == result["samples"]["train_samples"].version
