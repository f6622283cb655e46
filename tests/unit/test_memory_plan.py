"""The memory planner: its activation formulas against the tensors autograd really saves, its parameter counts
against the model, its sharding arithmetic, and its verdicts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from keyeflow.model.config import keye_8b, tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration, VisionGroups
from keyeflow.model.packed_attention import packed_segments
from keyeflow.training.config import StageConfig
from keyeflow.training.memory_plan import (
    GIB,
    Cluster,
    InfeasibleRecipe,
    ModelSizes,
    check_fits,
    compare_layouts,
    layer_activation_bytes,
    plan_posttrain,
    plan_pretrain,
    vision_layer_activation_bytes,
)
from keyeflow.training.posttrain_recipe import posttrain_recipe
from keyeflow.training.recipes import pretrain_recipe


def saved_bytes(run, parameters) -> int:
    """Bytes of the distinct storages autograd saves for the backward while `run()` executes, parameters
    excluded (they are counted as parameters)."""
    owned = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def widened(hidden: int, mlp: int, heads: int, kv_heads: int, head_dim: int):
    config = tiny()
    text = config.text_config
    text.hidden_size, text.intermediate_size = hidden, mlp
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = heads, kv_heads, head_dim
    text.num_hidden_layers = 1
    quarter, eighth = head_dim // 4, head_dim // 8
    config.mrope_section = [quarter, eighth, head_dim // 2 - quarter - eighth]
    vision = config.vision_config
    vision.hidden_size, vision.intermediate_size, vision.num_attention_heads = hidden, mlp, heads
    vision.num_hidden_layers = 1
    return config


SHAPES = [(256, 768, 4, 2, 64), (384, 1024, 6, 3, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decoder_layer_formula_matches_saved_tensors(shape, dtype):
    config = widened(*shape)
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(config).to(dtype)
    layer = model.language_model.layers[0]
    length = 512
    x = torch.randn(1, length, config.text_config.hidden_size, dtype=dtype, requires_grad=True)
    sample_index = torch.zeros(1, length, dtype=torch.long)
    sample_index[0, length // 3 :] = 1  # two packed samples
    positions = torch.arange(length)[None].expand(3, 1, length)
    rope = model.language_model.rotary_emb(x, positions)
    measured = saved_bytes(
        lambda: layer(
            x,
            attention_mask=packed_segments(sample_index),
            position_ids=positions,
            position_embeddings=rope,
        ),
        layer.parameters(),
    )
    predicted = layer_activation_bytes(config, dtype.itemsize) * length
    assert predicted == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_vision_layer_formula_matches_saved_tensors(shape, dtype):
    config = widened(*shape)
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(config).to(dtype)
    layer = model.vision.layers[0]
    patches = 1024
    x = torch.randn(patches, config.vision_config.hidden_size, dtype=dtype, requires_grad=True)
    head_dim = config.vision_config.head_dim
    cos, sin = torch.randn(patches, head_dim), torch.randn(patches, head_dim)
    groups = VisionGroups([256] * 4, x.device)
    measured = saved_bytes(lambda: layer(x, cos, sin, groups), layer.parameters())
    predicted = vision_layer_activation_bytes(config, dtype.itemsize) * patches
    assert predicted == pytest.approx(measured, rel=0.03)


def test_parameter_counts_are_the_models():
    config = tiny()
    sizes = ModelSizes.of(config)
    model = KeyeForConditionalGeneration(config)
    assert sizes.total == sum(p.numel() for p in model.parameters())
    assert sizes.trained(("projector",)) == {
        "projector": sum(p.numel() for p in model.projector.parameters())
    }
    with pytest.raises(ValueError, match="matches no parameter"):
        sizes.trained(("projektor",))
    assert ModelSizes.of(keye_8b()).total == 8_643_848_560  # SPEC §1: about 8.7B


def stage(**overrides) -> StageConfig:
    base = {
        "name": "s",
        "learning_rate": 1e-5,
        "max_steps": 10,
        "max_length": 8_192,
        "window_size": 64,
        "bf16": True,
        "deepspeed_zero": 1,
        "activation_checkpointing": "full",
        "max_tokens_per_micro_batch": None,
    }
    return StageConfig(**{**base, **overrides})


def plan_one(s: StageConfig, cluster: Cluster):
    recipe = pretrain_recipe("keye-8b")
    recipe = dataclasses.replace(recipe, stages={1: s, 2: s}, annealing=dataclasses.replace(s, name="s3"))
    return plan_pretrain(recipe, cluster)[0]


def test_zero_stages_shard_what_they_say():
    cluster = Cluster(2, 8, 80)
    plans = {z: plan_one(stage(deepspeed_zero=z), cluster).components for z in (0, 1, 2, 3)}
    params = ModelSizes.of(keye_8b()).total
    assert plans[0]["parameters"] == 2 * params and plans[0]["optimizer"] == 16 * params
    assert plans[1]["optimizer"] == 16 * params // 16 and plans[1]["gradients"] == 2 * params
    assert plans[2]["gradients"] == 2 * params // 16 and plans[2]["parameters"] == 2 * params
    assert plans[3]["parameters"] == 2 * params // 16
    assert plans[3]["zero_buffers"] > plans[2]["zero_buffers"] > 0 == plans[0]["zero_buffers"]


def test_checkpointing_and_token_budget_bound_activations():
    cluster = Cluster(1, 8, 80)
    full = plan_one(stage(), cluster).components["activations"]
    off = plan_one(stage(activation_checkpointing="off"), cluster).components["activations"]
    selective = plan_one(stage(activation_checkpointing="selective"), cluster).components["activations"]
    assert full < selective < off
    # 64 samples over 8 ranks = 8 per micro-batch, each up to 8,192 tokens; a budget of one pack is 1/8 of it
    unbounded = plan_one(stage(), cluster)
    budgeted = plan_one(stage(deepspeed_zero=None, max_tokens_per_micro_batch=8_192), cluster)
    assert unbounded.tokens_per_gpu == 8 * 8_192 and budgeted.tokens_per_gpu == 8_192


def test_verdicts_name_the_stage_and_component():
    recipe = pretrain_recipe("keye-8b")
    plans = plan_pretrain(recipe, Cluster(1, 8, 24))
    assert not all(p.fits for p in plans)
    with pytest.raises(InfeasibleRecipe) as error:
        check_fits(plans, "pretrain keye-8b")
    message = str(error.value)
    assert "pretrain-3-annealing" in message and "largest: activations" in message
    assert "of 24 GiB" not in message and "per GPU of 24" in message and "largest:" in message


def test_tiny_recipes_fit_a_small_host():
    host = Cluster(1, 1, 8)
    pre = pretrain_recipe("tiny")
    plans = plan_pretrain(pre, host) + plan_posttrain(posttrain_recipe("tiny"), pre.model_config(), host)
    check_fits(plans, "tiny")
    assert all(p.total < 8 * GIB for p in plans)
    names = [p.stage for p in plans]
    assert "posttrain-3-mpo" in names and "posttrain-gspo" in names and "pretrain-3-annealing" in names


def test_layout_comparison_for_the_128k_stage():
    recipe = pretrain_recipe("keye-8b")
    model = recipe.model_config()
    costs = {
        c.name.split(" (")[0]: c
        for c in compare_layouts(recipe.annealing, model, Cluster(4, 8, 80), [(1, 4, 2, 1), (3, 4, 1, 1)])
    }
    pipeline, sharded = costs["ZeRO-1 SP4 PP2 TP1"], costs["ZeRO-3 SP4 PP1 TP1"]
    assert not pipeline.plan.fits and sharded.plan.fits  # the reason the recipe dropped the pipeline
    assert pipeline.bubble == pytest.approx(1 / (256 // 4 + 1))  # 64 micro-batches per pipeline, 2 stages
    assert sharded.bubble == 0
    # Ulysses inside a node: 3 passes × 36 layers × (2 q + 2 kv dims) of this rank's 32,768 tokens, 3/4 of it
    # leaving the rank, in bf16
    text = model.text_config
    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    assert sharded.intra_bytes == pytest.approx(3 * 36 * 32_768 * (2 * q + 2 * kv) * 2 * 3 / 4)
    # ZeRO-3 across the 4 nodes: 3 all-gathers of the bf16 weights and a reduce-scatter of the gradients
    weights = 2 * ModelSizes.of(model).total
    assert sharded.inter_bytes == pytest.approx(4 * weights * 31 / 32, rel=1e-6)


def test_keye_8b_gspo_layout_on_4_by_8_h100_and_a_too_small_cluster_is_refused():
    """GSPO at 8B (issue 17): the policy sharded by FSDP2, the rollout engine's memory (a colocated share of
    every GPU, or a pool of its own), no reference model. On 4 × 8 H100 80 GB no colocated share leaves room
    for the update, and a separate pool of 1 node fits; on one node every placement is refused, each with
    its reason."""
    from keyeflow.training.memory_plan import GIB, choose_rollout_placement, plan_posttrain
    from keyeflow.training.posttrain_recipe import posttrain_recipe

    recipe = posttrain_recipe("keye-8b")
    model = pretrain_recipe("keye-8b").model_config()
    sizes = ModelSizes.of(model)
    chosen, tried = choose_rollout_placement("gspo", recipe.gspo, sizes, Cluster(4, 8, 80))
    assert chosen is not None and (chosen.kind, chosen.rollout_nodes) == ("separate", 1)
    policy, pool = dict(tried)[chosen]
    assert policy.fits and pool.fits and policy.layout.startswith("24× FSDP2")
    assert policy.components["reference_model"] == 0 and policy.components["rollout_engine"] == 0
    # the pool holds bf16 weights and at least one group's KV cache in its 0.9 share
    assert pool.components["rollout_engine"] == int(0.9 * 80 * GIB)
    colocated = [plans[0] for placement, plans in tried if placement.kind == "colocated"]
    assert colocated and not any(p.fits for p in colocated)
    assert all(p.components["rollout_engine"] > 0 for p in colocated)
    assert any("rollout engine needs" in problem for p in colocated for problem in p.problems)

    small, small_tried = choose_rollout_placement("gspo", recipe.gspo, sizes, Cluster(1, 8, 80))
    assert small is None and small_tried
    assert all(not all(p.fits for p in plans) for _, plans in small_tried)
    assert all("separate" not in placement.kind for placement, _ in small_tried)  # no node to spare
    # the whole recipe on the 4-node cluster: every stage fits, GSPO with its refused placements noted
    plans = plan_posttrain(recipe, model, Cluster(4, 8, 80))
    assert all(p.fits for p in plans), [(p.stage, p.problems) for p in plans if not p.fits]
    gspo = next(p for p in plans if p.stage == "posttrain-gspo")
    assert any(n.startswith("refused: colocated") for n in gspo.notes)
    refused = plan_posttrain(recipe, model, Cluster(1, 8, 80))
    assert any(p.stage == "posttrain-gspo" and not p.fits and p.problems for p in refused)
