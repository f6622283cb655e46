"""Pre-training recipes and the stage configs they produce: the paper's settings in the full recipe, the same
code paths scaled down in the tiny one, DeepSpeed JSON with context parallelism rendered."""

from __future__ import annotations

import dataclasses

import pytest
from deepspeed.runtime.zero.config import get_zero_config

from keyeflow.training.config import StageConfig, pretrain_stage
from keyeflow.training.deepspeed_config import render_deepspeed_config
from keyeflow.training.recipes import AnnealVariant, EvalConfig, pretrain_recipe


def test_full_recipe_has_the_papers_stage_settings():
    r = pretrain_recipe("keye-8b")
    s1, s2, s3 = r.stages[1], r.stages[2], r.annealing
    assert (s1.trainable, s1.max_length, s1.deepspeed_zero) == ("projector", 8_192, 2)
    assert (s2.trainable, s2.max_length, s2.deepspeed_zero) == ("all", 8_192, 2)
    assert (s3.trainable, s3.max_length, s3.rope_theta, s3.deepspeed_zero, s3.fsdp) == (
        "all",
        131_072,
        8e6,
        None,
        True,
    )
    assert s3.sequence_parallel_size > 1 and s3.pipeline_parallel_size == 1
    assert r.mixture(3).target_shares == {"video": 0.24, "image": 0.50, "text": 0.26}
    assert r.mixture(3).max_sample_tokens == 131_072 and r.mixture(1).max_sample_tokens == 8_192
    assert r.model_config().text_config.hidden_size == 4096
    assert len(r.variants) >= 2 and r.fusion().method == "average"
    assert sum(r.fusion().weights) == pytest.approx(1.0)


def test_tiny_recipe_scales_lengths_and_keeps_the_recipe():
    r = pretrain_recipe("tiny")
    assert r.stages[1].trainable == "projector" and r.stages[2].trainable == "all"
    assert r.annealing.rope_theta == 8e6
    assert r.annealing.max_length > r.stages[2].max_length == r.initial_context
    assert r.model_config().text_config.max_position_embeddings == r.initial_context
    assert r.mixture(3).target_shares == {"video": 0.24, "image": 0.50, "text": 0.26}
    assert r.mixture(3, r.variants[1]).target_shares != r.mixture(3).target_shares
    assert {r.mixture(s).holdout_per_mille for s in (1, 2, 3)} == {r.evaluation.holdout_per_mille}
    names = {r.variant_stage(v).name for v in r.variants}
    assert names == {"pretrain-3-annealing-balanced", "pretrain-3-annealing-video-rich"}
    assert r.config_hash() == pretrain_recipe("tiny").config_hash()
    assert r.config_hash() != pretrain_recipe("tiny", init="/some/checkpoint").config_hash()


def test_recipes_refuse_bad_settings_with_the_field_named():
    r = pretrain_recipe("tiny")
    with pytest.raises(ValueError, match="no pre-training recipe"):
        pretrain_recipe("huge")
    with pytest.raises(ValueError, match="names must be unique"):
        dataclasses.replace(r, variants=(r.variants[0], r.variants[0]))
    with pytest.raises(ValueError, match="AnnealVariant.weight"):
        AnnealVariant(name="x", weight=-1)
    with pytest.raises(ValueError, match="AnnealVariant.name"):
        AnnealVariant(name="a/b")
    with pytest.raises(ValueError, match="fusion weights sum to 0"):
        dataclasses.replace(r, variants=(AnnealVariant(name="a", weight=0),))
    with pytest.raises(ValueError, match="EvalConfig.holdout_per_mille"):
        EvalConfig(holdout_per_mille=0)
    with pytest.raises(ValueError, match="unknown or fixed MixtureConfig"):
        dataclasses.replace(r, mixtures={1: {"bogus": 1}, 2: {}})
    with pytest.raises(ValueError, match="sequence_parallel_size=0"):
        pretrain_stage(3, sequence_parallel_size=0)
    with pytest.raises(ValueError, match="pipeline parallelism is not built"):
        pretrain_stage(3, pipeline_parallel_size=2)


def test_stage3_deepspeed_json_renders_context_parallelism_and_deepspeed_reads_it():
    # the recipe shards stage 3 with FSDP2; the same stage on DeepSpeed ZeRO-3 renders its JSON
    with pytest.raises(ValueError, match="does not train with DeepSpeed"):
        render_deepspeed_config(pretrain_stage(3), world_size=64)
    stage = pretrain_stage(3, micro_batches_per_step=4, fsdp=False, deepspeed_zero=3)
    rendered = render_deepspeed_config(stage, world_size=64)
    assert rendered["zero_optimization"]["stage"] == 3
    assert rendered["sequence_parallel_size"] == 4
    assert "pipeline" not in rendered
    assert rendered["train_batch_size"] == 4 * 64 // 4  # data-parallel ranks only multiply the batch
    assert get_zero_config(rendered).stage == 3
    with pytest.raises(ValueError, match="not a multiple of"):
        render_deepspeed_config(stage, world_size=6)
    plain = render_deepspeed_config(pretrain_stage(2), world_size=8)
    assert "sequence_parallel_size" not in plain and "pipeline" not in plain


def test_training_refuses_a_sequence_group_larger_than_the_world(tmp_path):
    from keyeflow.datasets.tables import TableRef
    from keyeflow.model.config import tiny
    from keyeflow.training.trainer import train

    stage = StageConfig(
        name="cp",
        learning_rate=1e-3,
        max_steps=1,
        max_length=64,
        window_size=1,
        deepspeed_zero=1,
        sequence_parallel_size=2,
    )
    with pytest.raises(ValueError, match=r"stage 'cp': sequence_parallel_size=2 does not divide 1 rank"):
        train(
            stage,
            init=tiny(),
            mixture=TableRef("mixtures", str(tmp_path / "m.lance"), 1),
            mixture_id="x",
            out_dir=tmp_path / "out",
        )
