"""The data of post-training's supervised stages, from the tables to a mixture the trainer reads.

- SFT: conversation samples of `train_samples` (the tasks a recipe names), minus what the **difficulty
  filter** drops: an item whose every one of `num_paths` sampled answers is right teaches nothing new (SPEC
  §4), so it is dropped with that reason. Items whose answer cannot be checked (free-form captions, chats) are
  kept: the filter only removes what it can prove easy.
- LongCoT SFT: the `longcot` table's kept samples, each used `repeats` times (its 1–5 quality score turned
  into repeats by the LongCoT flow), as `train_samples` rows (through `conversations.add_conversations`, so
  media go through the same ingestion tables).
- Expert SFT: the LongCoT samples of one domain (math, OCR, …), to train the expert that is merged back.

Each ends in `mixture.fixed_mixture`: the same `mixtures` table and loader as pre-training, so the trainer,
its checkpoints and lineage are the same code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from keyeflow.config import check_int, check_number
from keyeflow.datasets import conversations, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.mixture import MixtureResult, fixed_mixture
from keyeflow.datasets.sample_reader import read_media
from keyeflow.datasets.slowfast import SlowFastConfig
from keyeflow.datasets.tables import TableRef
from keyeflow.model.generation import Generator
from keyeflow.model.processor import MediaPatches
from keyeflow.quality.rewards import answer_reward

POSTTRAIN_STAGE = 5  # the `stage` column of post-training mixtures (pre-training uses 1–3)
# train_samples.task → the checker that can tell a right answer (others are not checkable: kept)
CHECKERS = {
    "grounding": "grounding",
    "counting": "count",
    "count": "count",
    "math": "math",
    "vqa": "math",
    "ocr": "math",
    "temporal": "math",
}


@dataclass(frozen=True, kw_only=True)
class DifficultyConfig:
    num_paths: int = 4  # answers sampled per item; all right → dropped
    max_new_tokens: int = 256
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("num_paths", 1), ("max_new_tokens", 1), ("seed", 0)):
            object.__setattr__(
                self, name, check_int("DifficultyConfig", name, getattr(self, name), minimum=minimum)
            )
        # > 0: sampling, so that several paths can differ. Kept as given: the recipe's hash holds it.
        check_number("DifficultyConfig", "temperature", self.temperature, minimum=0, strict=True)


@dataclass
class DifficultyReport:
    kept: list[str] = field(default_factory=list)  # sample ids
    dropped: dict[str, str] = field(default_factory=dict)  # sample id → why
    unchecked: list[str] = field(default_factory=list)  # kept because their answer cannot be checked
    num_right: dict[str, int] = field(default_factory=dict)  # sample id → right answers of num_paths

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "dropped": self.dropped,
            "unchecked": self.unchecked,
            "num_right": self.num_right,
        }


def conversation_samples(samples: TableRef, tasks: Sequence[str], max_tokens: int) -> list[dict]:
    """`train_samples` rows of `tasks` (chats ending in an assistant turn) at most `max_tokens` long."""
    rows = (
        tables.dataset(samples.uri, version=samples.version)
        .to_table(
            columns=["sample_id", "task", "modality", "num_tokens", "media_ids", "messages"],
            filter=pc.field("task").isin(list(tasks)) & (pc.field("num_tokens") <= max_tokens),
        )
        .to_pylist()
    )
    out = []
    for row in rows:
        messages = json.loads(row["messages"])
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            out.append({**row, "messages": messages})
    return sorted(out, key=lambda r: r["sample_id"])


def _text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")


def ordered_media_lookup(media_ids: Sequence[str], media: Mapping[str, MediaPatches]) -> Callable:
    """A generator's media lookup for one sample: its media parts in order are its `media_ids` in order (how
    `train_samples` recorded them)."""
    order = iter(media_ids)
    return lambda part: media[next(order)]


def difficulty_filter(
    generator: Generator, rows: list[dict], config: DifficultyConfig, root: str | None = None
) -> DifficultyReport:
    """Sample `num_paths` answers per row with `generator` (the model SFT starts from) and drop the rows every
    path answers right. `generator.media_lookup` is set per row (a LocalGenerator's media come from Lance)."""
    report = DifficultyReport()
    for row in rows:
        checker = CHECKERS.get(row["task"])
        if checker is None:
            report.kept.append(row["sample_id"])
            report.unchecked.append(row["sample_id"])
            continue
        prompt, reference = row["messages"][:-1], _text(row["messages"][-1]["content"])
        try:  # a reference the checker cannot read (a region described in words, not a box): not checkable
            answer_reward(reference, reference, checker)
        except ValueError:
            report.kept.append(row["sample_id"])
            report.unchecked.append(row["sample_id"])
            continue
        if hasattr(generator, "media_lookup"):
            generator.media_lookup = ordered_media_lookup(
                row["media_ids"], read_media(set(row["media_ids"]), root)
            )
        (completions,) = generator.generate(
            [prompt],
            n=config.num_paths,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=config.seed,
            logprobs=False,
        )
        right = sum(answer_reward(c.text, reference, checker).value >= 1.0 for c in completions)
        report.num_right[row["sample_id"]] = right
        if right == len(completions):
            report.dropped[row["sample_id"]] = (
                f"too easy: all {right} sampled answers match the reference ({checker} check)"
            )
        else:
            report.kept.append(row["sample_id"])
    return report


def sft_mixture(samples: TableRef, kept: Sequence[str], *, name: str, seed: int = 0) -> MixtureResult:
    return fixed_mixture(samples, {s: 1 for s in kept}, name=name, stage=POSTTRAIN_STAGE, seed=seed)


def longcot_rows(longcot: TableRef, domain: str | None = None) -> list[dict]:
    """The `longcot` table's samples (optionally one domain's), with their repeats."""
    ds = tables.dataset(longcot.uri, version=longcot.version)
    filter_ = pc.field("domain") == domain if domain else None
    return ds.to_table(
        columns=["sample_id", "domain", "source", "messages", "repeats", "score"], filter=filter_
    ).to_pylist()


def longcot_mixture(
    longcot: TableRef,
    *,
    name: str,
    slowfast: SlowFastConfig,
    image_config: ImageConfig,
    domain: str | None = None,
    seed: int = 0,
    source_root: str = "/",
    min_repeats: int = 0,
    root: str | None = None,
) -> tuple[MixtureResult, dict[str, str]]:
    """LongCoT samples (one domain's, or all) as train_samples rows and a mixture using each `repeats` times,
    at least `min_repeats` (an expert takes every kept sample of its domain: 1, even those the scoring drew
    out of the general mix). Returns the mixture and the samples that could not be used, with why (also in
    `quarantine`)."""
    rows = longcot_rows(longcot, domain)
    if not rows:
        raise ValueError(
            f"{longcot.uri}@v{longcot.version} has no LongCoT samples"
            + (f" of domain {domain!r}" if domain else "")
        )
    items = [
        {
            "uri": f"longcot#{r['sample_id']}",
            "source": f"longcot-{r['domain']}",
            "task": "longcot",
            "messages": json.loads(r["messages"]),
        }
        for r in rows
    ]
    ids, bad = conversations.add_conversations(items, source_root, slowfast, image_config, root=root)
    repeats: dict[str, int] = {}
    for r in rows:
        sample_id = ids.get(f"longcot#{r['sample_id']}")
        # Repeats 0: the scoring kept the sample out of training (a low score drawn out). Two LongCoT rows
        # with the same conversation are one sample: it gets the larger count.
        uses = max(int(r["repeats"]), min_repeats)
        if sample_id is not None and uses >= 1:
            repeats[sample_id] = max(repeats.get(sample_id, 0), uses)
    samples = tables.ref("train_samples", root)
    return fixed_mixture(samples, repeats, name=name, stage=POSTTRAIN_STAGE, seed=seed, root=root), bad
