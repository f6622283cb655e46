"""Reward-model training: the think/no_think judge (`keyeflow.quality.reward_model`) fine-tuned with the stage
trainer on the judgement conversations `build_reward_model_data` writes. The conversations become
`train_samples` rows (source and task `reward_model`), a fixed mixture repeats each as asked, and
`trainer.train` trains from `init`, resuming from `out_dir/latest` like any stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pyarrow.compute as pc

from keyeflow.datasets import conversations as conversation_samples
from keyeflow.datasets import tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.mixture import fixed_mixture
from keyeflow.datasets.slowfast import SlowFastConfig, resolve_config
from keyeflow.datasets.tables import TableRef
from keyeflow.training.config import StageConfig
from keyeflow.training.engine import MetricsSink
from keyeflow.training.posttrain_data import POSTTRAIN_STAGE
from keyeflow.training.trainer import train


@dataclass(frozen=True)
class RewardModelTraining:
    checkpoint_dir: Path  # the trained judge (its `model/` loads into a LocalGenerator or a server)
    step: int
    losses: list[float]
    mixture: TableRef
    mixture_id: str
    num_samples: int  # distinct train_samples rows
    num_occurrences: int  # uses in the mixture (repeats counted)
    unusable: Mapping[str, str]  # conversation uri → why it could not become a sample


def train_reward_model(
    conversations: Sequence[Mapping[str, Any]],
    stage: StageConfig,
    *,
    init: str | Path,
    out_dir: str | Path,
    source_root: str = "/",
    slowfast: SlowFastConfig | None = None,
    image_config: ImageConfig | None = None,
    root: str | None = None,
    sink: MetricsSink | None = None,
    name: str = "reward-model",
    seed: int = 0,
) -> RewardModelTraining:
    """Fine-tune the reward model on `build_reward_model_data` conversations with the stage trainer: the
    conversations become `train_samples` rows (source and task `reward_model`; media parts by path inside
    `source_root`), a fixed mixture uses each as many times as its `repeats`, and `trainer.train(stage, …)`
    trains from `init` into `out_dir` (resuming from its `latest`). `root`: the tables root (default: the
    settings'). Conversations that cannot become samples are skipped and returned in `unusable` (and kept in
    the quarantine table)."""
    items, repeats_of = [], {}
    for k, conversation in enumerate(conversations):
        repeats = conversation.get("repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"conversation {k}: repeats={repeats!r} must be an integer >= 1")
        uri = f"reward_model#{conversation.get('conversation_id', k)}"
        if uri in repeats_of:
            raise ValueError(f"conversation id {uri!r} appears twice")
        repeats_of[uri] = repeats
        items.append(
            {
                "uri": uri,
                "source": "reward_model",
                "task": "reward_model",
                "messages": conversation["messages"],
            }
        )
    if not items:
        raise ValueError("train_reward_model needs at least one conversation")
    ids, unusable = conversation_samples.add_conversations(
        items, source_root, slowfast or resolve_config("paper"), image_config or ImageConfig(), root=root
    )
    unusable = dict(unusable)
    lengths = _num_tokens(set(ids.values()), root)
    for uri, sample_id in list(ids.items()):
        # A judgement longer than the stage's context cannot be trained on (the loader never splits a sample);
        # one long pair (a large picture and two long responses) must not stop the stage.
        if lengths[sample_id] > stage.max_length:
            unusable[uri] = (
                f"{lengths[sample_id]:,} tokens, more than the stage's max_length {stage.max_length:,}"
            )
            del ids[uri]
    repeats: dict[str, int] = {}
    for uri, sample_id in ids.items():
        # Two conversations with the same content are one sample; each was meant as its own occurrences.
        repeats[sample_id] = repeats.get(sample_id, 0) + repeats_of[uri]
    if not repeats:
        raise ValueError(
            f"none of the {len(items)} conversations could become a sample: "
            f"{dict(list(unusable.items())[:3])}"
        )
    mixture = fixed_mixture(
        tables.ref("train_samples", root), repeats, name=name, stage=POSTTRAIN_STAGE, seed=seed, root=root
    )
    result = train(
        stage, init=init, mixture=mixture.mixture, mixture_id=mixture.mixture_id, out_dir=out_dir, sink=sink
    )
    return RewardModelTraining(
        result.checkpoint_dir,
        result.step,
        result.losses,
        mixture.mixture,
        mixture.mixture_id,
        len(repeats),
        sum(repeats.values()),
        MappingProxyType(dict(unusable)),
    )


def _num_tokens(sample_ids: set[str], root: str | None) -> dict[str, int]:
    if not sample_ids:
        return {}
    ref = tables.ref("train_samples", root)
    rows = (
        tables.dataset(ref.uri, version=ref.version)
        .to_table(columns=["sample_id", "num_tokens"], filter=pc.field("sample_id").isin(sorted(sample_ids)))
        .to_pylist()
    )
    return {r["sample_id"]: int(r["num_tokens"]) for r in rows}
