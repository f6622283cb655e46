"""prefect.yaml stays in step with the code: every deployment's entrypoint is a real flow whose
parameters exist."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_deployment_points_at_a_flow_with_those_parameters():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert len(names) == len(set(names))
    for deployment in spec["deployments"]:
        path, _, func = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert hasattr(flow, "deploy"), f"{deployment['entrypoint']} is not a Prefect flow"
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]
    assert {
        "ingest-videos",
        "pretokenize-videos",
        "video-pipeline",
        "data-pipeline",
        "longcot",
        "pretrain",
        "posttrain",
    } <= set(names)
