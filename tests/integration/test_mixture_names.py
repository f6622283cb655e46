"""Mixture rows carry the mixture's name (stage and annealing variant), so SQL alone tells the stage-3
variants apart; a `mixtures` table written before the column existed stays readable and gains it."""

from __future__ import annotations

import pyarrow as pa

from keyeflow.datasets import mixture, sql, tables
from keyeflow.training.recipes import pretrain_recipe


def _samples(n: int) -> tables.TableRef:
    rows = [
        {
            "sample_id": f"s{i}",
            "source": "src",
            "task": "caption",
            "modality": "text",
            "num_tokens": 10 + i,
            "num_text_tokens": 10 + i,
            "num_vision_tokens": 0,
            "media_ids": [],
            "source_uri": f"f#L{i}",
            "content_hash": f"h{i}",
            "config_hash": "c",
            "messages": "[]",
            "created_at": tables.now(),
        }
        for i in range(n)
    ]
    tables.upsert("train_samples", rows)
    return tables.ref("train_samples")


def test_variants_are_told_apart_by_sql_and_an_old_table_gains_the_column(home):
    # An old mixtures table: the schema without `name`, one row in it.
    old_schema = pa.schema([f for f in tables.SCHEMAS["mixtures"] if f.name != "name"])
    old = pa.Table.from_pylist(
        [
            {
                "mixture_row_id": "old/s0",
                "mixture_id": "old",
                "stage": 1,
                "sample_id": "s0",
                "modality": "text",
                "source": "src",
                "num_tokens": 10,
                "repeats": 1,
                "order": 0,
                "train_samples_version": 1,
                "created_at": tables.now(),
            }
        ],
        schema=old_schema,
    )
    tables.write_dataset(old, tables.table_uri("mixtures"), mode="create")
    samples = _samples(4)
    recipe = pretrain_recipe("tiny")
    names = [recipe.mixture(3, v).name for v in recipe.variants]
    assert names == [f"stage3-{v.name}" for v in recipe.variants] and recipe.mixture(1).name == "stage1"
    # the name is a label: the config's hash (and so every mixture id) is what it was without it
    config = recipe.mixture(3, recipe.variants[0])
    assert (
        config.config_hash()
        == mixture.MixtureConfig(**{k: v for k, v in config.__dict__.items() if k != "name"}).config_hash()
    )

    for i, name in enumerate(names):
        mixture.fixed_mixture(samples, {f"s{j}": 1 for j in range(i + 1)}, name=name, stage=3)
    found = sql.query(
        "select coalesce(name, '(before names)') as name, count(*) as n from mixtures group by 1 order by 1"
    )
    by_name = dict(zip(found["name"], found["n"]))
    assert by_name == {"(before names)": 1, **{name: i + 1 for i, name in enumerate(names)}}
