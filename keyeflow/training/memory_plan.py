"""Memory per GPU of every training stage of a recipe, worked out before anything trains.

`plan_pretrain(recipe, cluster)` and `plan_posttrain(recipe, cluster)` give one `StagePlan` per stage: the
bytes each GPU holds for parameters, gradients, optimizer state, activations, the loss's logit chunks, the
ViT, and whatever the loop adds (GSPO's rollout KV cache), under the stage's layout
(DeepSpeed ZeRO stage, sequence/pipeline parallel sizes, activation checkpointing, bf16, offload), and
whether that fits the card, with the reason when it does not. The pretrain and posttrain flows check their
recipe with it first (`check_fits`), so an 8B recipe that cannot train is refused before stage 1 rather than
after two stages have trained; `keyeflow plan` prints it for any cluster.

Where the numbers come from:
- **Parameter counts** are exact: the model is built on the meta device (no memory) at the recipe's widths,
  and the stage's freezing policy is applied to it (`engine.freeze`, the trainer's own rule).
- **Bytes per parameter**: without DeepSpeed the engine keeps fp32 weights and AdamW state (4 + 4 + 8 bytes
  per trained parameter), and bf16 autocast caches a bf16 copy of every weight during the forward (2 more).
  DeepSpeed's bf16 mode keeps bf16 weights and gradients (2 + 2) and, per trained parameter, an fp32 master
  copy, both Adam moments and an fp32 gradient partition (16). ZeRO-1 shards that optimizer state over the
  ranks of a pipeline stage (DeepSpeed shards over data × sequence ranks), ZeRO-2 also the gradients, ZeRO-3
  also the weights, frozen ones included; ZeRO-3 then holds gathered weights of the layers in flight (twice
  the largest module: the one computing and the one prefetched) plus its prefetch bucket. ZeRO-1/2 hold a
  reduce and an all-gather bucket.
- **Activations** come from a per-token formula of what autograd saves in one decoder layer and one ViT layer
  of this model (`layer_activation_bytes`, `vision_layer_activation_bytes`), fitted to and checked against
  the saved tensors counted in `tests/unit/test_memory_plan.py` (two widths, fp32 and bf16, within 3 %). With
  checkpointing a layer keeps only its input and one layer is recomputed at a time; "selective" checkpoints
  every other layer. A frozen layer saves less than the formula (no weight gradients): an upper bound.
- **Tokens**: a micro-batch's tokens are the stage's `max_tokens_per_micro_batch`; without one, the most a
  micro-batch can hold: its samples (the step's window over ranks and micro-batches) each `max_length` long.
  Sequence parallelism splits them over its ranks. The ViT is charged as if every token of the micro-batch
  were a vision token (4 patches each): the worst micro-batch, all video.
- **Logit chunks**: `chunked_head` holds one `[512, V]` chunk at a time, in the compute dtype and in fp32,
  and its gradient in both.
- **Reserve**: 1 GiB (CUDA context, kernels' workspaces) plus 5 % of everything else for allocator
  fragmentation. An allowance, not a measurement.

What is not modelled: pipeline bubbles' extra in-flight micro-batches (a 1F1B schedule keeps up to
`pipeline_parallel_size` micro-batches of activations on the first stage: charged as that many), tensor
parallelism (no stage config has it), host memory of offloaded state.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyeflow.config import check_int, check_number
from keyeflow.model.chunked_head import DEFAULT_CHUNK_SIZE
from keyeflow.model.config import KeyeConfig
from keyeflow.model.modeling import KeyeForConditionalGeneration, checkpointed_layers
from keyeflow.training.config import GSPOStageConfig, MPOStageConfig, StageConfig
from keyeflow.training.engine import freeze
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.posttrain_recipe import PosttrainRecipe
from keyeflow.training.recipes import PretrainRecipe

GIB = 2**30
RESERVE_FIXED = 1 * GIB
RESERVE_SHARE = 0.05
# A GSPO prompt's tokens are not bounded by any config (they depend on the items' media): assumed, and shown.
DEFAULT_RL_PROMPT_TOKENS = 4_096

COMPONENTS = (
    "parameters",
    "gradients",
    "optimizer",
    "activations",
    "logit_chunks",
    "vit",
    "zero_buffers",
    "rollout_kv_cache",
    "rollout_engine",
    "reference_model",
    "reserve",
)


@dataclass(frozen=True)
class Cluster:
    """The machines a stage runs on: `nodes` × `gpus_per_node` devices of `gpu_memory_gib` each."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float

    def __post_init__(self) -> None:
        check_int("Cluster", "nodes", self.nodes, minimum=1)
        check_int("Cluster", "gpus_per_node", self.gpus_per_node, minimum=1)
        check_number("Cluster", "gpu_memory_gib", self.gpu_memory_gib, minimum=0, strict=True)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def capacity(self) -> int:
        return int(self.gpu_memory_gib * GIB)


@dataclass(frozen=True)
class StagePlan:
    """One stage on one GPU: `components` in bytes (keys of `COMPONENTS`), `layout` in words, and `problems`:
    why it cannot run (empty when it fits)."""

    stage: str
    layout: str
    tokens_per_gpu: int
    components: dict[str, int]
    capacity: int
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool:
        return not self.problems

    def grouped(self) -> dict[str, int]:
        """The components in four groups: weights, gradients and optimizer state ("model state"), the LLM's
        activations with the logit chunks, the ViT's, and the rest (buffers, KV cache, reserve)."""
        c = self.components
        state = c["parameters"] + c["gradients"] + c["optimizer"]
        llm = c["activations"] + c["logit_chunks"]
        return {
            "model state": state,
            "activations": llm,
            "vit": c["vit"],
            "other": self.total - state - llm - c["vit"],
        }

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "layout": self.layout,
            "tokens_per_gpu": self.tokens_per_gpu,
            "components_gib": {k: round(v / GIB, 2) for k, v in self.components.items()},
            "total_gib": round(self.total / GIB, 2),
            "capacity_gib": round(self.capacity / GIB, 2),
            "fits": self.fits,
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


class InfeasibleRecipe(ValueError):
    """A recipe has a stage that cannot run on the cluster it would run on (`check_fits`)."""


# ------------------------------------------------------------------------------------------ model sizes


@dataclass(frozen=True)
class ModelSizes:
    """Exact parameter counts of a `KeyeConfig` (its model built on the meta device), and the widths the
    activation formulas take."""

    config: KeyeConfig
    model: torch.nn.Module  # on the meta device: shapes only

    @classmethod
    def of(cls, config: KeyeConfig) -> ModelSizes:
        with torch.device("meta"):
            return cls(config, KeyeForConditionalGeneration(config))

    @property
    def total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def count(self, prefix: str) -> int:
        return sum(
            p.numel()
            for name, p in self.model.named_parameters()
            if name == prefix or name.startswith(prefix + ".")
        )

    def trained(self, prefixes: tuple[str, ...] | None) -> dict[str, int]:
        """Trained elements per top-level module (vision, projector, language_model, lm_head) under the
        freezing policy, by `engine.freeze` itself: a prefix that names nothing fails here as in the
        trainer."""
        out: dict[str, int] = {}
        trained = {id(p) for p in freeze(self.model, prefixes)}
        for name, p in self.model.named_parameters():
            if id(p) in trained:
                out[name.split(".")[0]] = out.get(name.split(".")[0], 0) + p.numel()
        return out

    def largest_module(self) -> int:
        """The most elements one layer-sized module holds (a decoder layer, the embedding, the LM head)."""
        per_module: dict[str, int] = {}
        for name, p in self.model.named_parameters():
            parts = name.split(".")
            key = ".".join(parts[: parts.index("layers") + 2] if "layers" in parts else parts[:2])
            per_module[key] = per_module.get(key, 0) + p.numel()
        return max(per_module.values())


def layer_activation_bytes(config: KeyeConfig, compute_bytes: int, *, tensor_parallel: int = 1) -> int:
    """Bytes autograd saves per token in one LLM decoder layer (Qwen3 with QK-norm, packed attention): in the
    compute dtype 4 hidden-size tensors (norm inputs and outputs, the residual), 4 per query dim (q before and
    after its norm and RoPE, the attention output), 3 per key/value dim, 4 per MLP dim (gate, up, their
    activation and product); plus the fp32 copies RMSNorm makes (2 per hidden, 1 per query and key/value
    dim), the RoPE cos/sin and the attention's per-head log-sum-exp. Measured:
    tests/unit/test_memory_plan.py. Under `tensor_parallel` t (a comparison only: not built) the head and MLP
    parts are split t ways and the hidden-size tensors stay whole on every rank, as in Megatron without its
    sequence parallelism."""
    text = config.text_config
    hidden, mlp = text.hidden_size, text.intermediate_size
    q_dim = text.num_attention_heads * text.head_dim
    kv_dim = text.num_key_value_heads * text.head_dim
    split = (
        mlp * 4 * compute_bytes
        + q_dim * (4 * compute_bytes + 4)
        + kv_dim * (3 * compute_bytes + 4)
        + 8 * text.num_attention_heads
        + 4 * text.num_key_value_heads
    )
    return hidden * (4 * compute_bytes + 8) + 2 * text.head_dim * compute_bytes + split // tensor_parallel


def vision_layer_activation_bytes(config: KeyeConfig, compute_bytes: int) -> int:
    """Bytes autograd saves per patch in one ViT layer: 8 hidden-size and 2 MLP-size tensors in the compute
    dtype, the fp32 2D-RoPE cos/sin and the per-head log-sum-exp. Measured: tests/unit/test_memory_plan.py."""
    vision = config.vision_config
    return (
        vision.hidden_size * 8 * compute_bytes
        + vision.intermediate_size * 2 * compute_bytes
        + 8 * vision.head_dim
        + 8 * vision.num_attention_heads
    )


def stack_activation_bytes(per_layer: int, input_bytes: int, num_layers: int, mode: str) -> int:
    """Per token, a stack of `num_layers` layers in the backward's worst moment: the saved tensors of the
    layers not checkpointed, the inputs of the checkpointed ones, one layer recomputed, and that layer's
    activation gradients (as large as what it saved)."""
    recomputed = len(checkpointed_layers(mode, num_layers))
    return (num_layers - recomputed) * per_layer + recomputed * input_bytes + 2 * per_layer


# ------------------------------------------------------------------------------------------ one stage


@dataclass(frozen=True)
class _Layout:
    """What the formulas need of a stage, whichever loop trains it."""

    name: str
    world_size: int
    trainable: tuple[str, ...] | None
    tokens: int  # one micro-batch's tokens on one GPU before sequence parallelism
    zero: int | None  # None: no DeepSpeed
    bf16: bool
    checkpointing: str
    fsdp: bool = False  # FSDP2 (`keyeflow.training.sharding`), instead of DeepSpeed
    sequence_parallel: int = 1
    pipeline_parallel: int = 1
    tensor_parallel: int = 1  # Megatron-style, LLM decoder layers only: no stage config has it (comparisons)
    offload_optimizer: bool = False
    offload_params: bool = False
    zero_bucket: int = 0  # elements per ZeRO reduce/all-gather bucket
    kv_cache_tokens: int = 0
    rollout_share: int = 0  # bytes a colocated rollout engine reserves on each GPU (GSPO)
    reference_bytes: int = 0  # a frozen reference model held beside the policy (GSPO with a KL term)
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _stage_layout(stage: StageConfig, world_size: int) -> _Layout:
    problems = []
    model_parallel = stage.sequence_parallel_size * stage.pipeline_parallel_size
    if world_size % model_parallel:
        problems.append(
            f"{world_size} GPU(s) do not divide into sequence-parallel groups of {model_parallel}"
        )
    data_parallel = max(1, world_size // model_parallel)
    if stage.max_tokens_per_micro_batch is not None:
        tokens = stage.max_tokens_per_micro_batch
    else:
        samples = math.ceil(stage.window_size / (data_parallel * stage.micro_batches_per_step))
        tokens = samples * stage.max_length
    return _Layout(
        name=stage.name,
        world_size=world_size,
        trainable=stage.trainable_prefixes(),
        tokens=tokens,
        zero=stage.deepspeed_zero,
        fsdp=stage.fsdp,
        bf16=stage.bf16,
        checkpointing=stage.activation_checkpointing,
        sequence_parallel=stage.sequence_parallel_size,
        pipeline_parallel=stage.pipeline_parallel_size,
        offload_optimizer=stage.offload_optimizer,
        offload_params=stage.offload_params,
        zero_bucket=stage.zero_bucket_size,
        problems=tuple(problems),
    )


def plan_layout(layout: _Layout, sizes: ModelSizes, cluster: Cluster) -> StagePlan:
    """One stage's bytes per GPU under `layout` (module docstring: where each number comes from), and whether
    they fit `cluster`'s cards."""
    config = sizes.config
    text = config.text_config
    sp, pp, tp = layout.sequence_parallel, layout.pipeline_parallel, layout.tensor_parallel
    shard = max(1, layout.world_size // (pp * tp))  # ZeRO's partition group: the ranks holding the same slice
    compute_bytes = 2 if layout.bf16 else 4
    deepspeed = layout.zero is not None

    total = sizes.total
    trained_by_module = sizes.trained(layout.trainable)
    trained = sum(trained_by_module.values())
    vision_trained = trained_by_module.get("vision", 0)
    # The first pipeline stage holds the ViT, the projector, the embedding and its share of decoder layers.
    llm_layers = sizes.count("language_model.layers")
    per_stage = total - llm_layers + math.ceil(llm_layers / (pp * tp)) if pp * tp > 1 else total
    stage_share = per_stage / total
    local_total = per_stage
    local_trained = trained * stage_share

    if deepspeed and layout.bf16:
        weight_bytes, grad_bytes, optimizer_bytes = 2, 2, 16
    elif deepspeed or layout.fsdp:  # FSDP2: fp32 shards; bf16 is its mixed-precision cast of gathered units
        weight_bytes, grad_bytes, optimizer_bytes = 4, 4, 8
    else:  # fp32 master weights, bf16 autocast caching a bf16 copy of each weight
        weight_bytes, grad_bytes, optimizer_bytes = 4 + (2 if layout.bf16 else 0), 4, 8
    zero = 3 if layout.fsdp else layout.zero or 0  # FSDP2 shards what ZeRO-3 does, over every rank
    parameters = local_total * weight_bytes / (shard if zero >= 3 else 1)
    if layout.offload_params:
        parameters = 0
    gradients = local_trained * grad_bytes / (shard if zero >= 2 else 1)
    optimizer = (
        0 if layout.offload_optimizer else local_trained * optimizer_bytes / (shard if zero >= 1 else 1)
    )
    if layout.fsdp:
        # one unit gathered and the next prefetched, in the compute dtype, and the root unit (final norm and
        # lm_head, which the chunked head reads directly) gathered for the whole step
        root = sizes.count("lm_head") + sizes.count("language_model.norm")
        zero_buffers = (2 * sizes.largest_module() + root) * compute_bytes
    elif zero >= 3:
        zero_buffers = (2 * sizes.largest_module() + layout.zero_bucket) * weight_bytes
    elif deepspeed and zero >= 1:
        zero_buffers = 2 * layout.zero_bucket * grad_bytes
    else:
        zero_buffers = 0

    tokens = math.ceil(layout.tokens / sp)
    in_flight = pp  # 1F1B keeps up to pp micro-batches' activations on the first pipeline stage
    llm_layers_here = math.ceil(text.num_hidden_layers / pp)
    activations = 0
    if trained:
        per_token = stack_activation_bytes(
            layer_activation_bytes(config, compute_bytes, tensor_parallel=tp),
            text.hidden_size * compute_bytes,
            llm_layers_here,
            layout.checkpointing,
        )
        # + the embedding output, the final norm's output and the head's input
        activations = tokens * in_flight * (per_token + 3 * text.hidden_size * compute_bytes)
    logit_chunks = DEFAULT_CHUNK_SIZE * text.vocab_size * (2 * compute_bytes + 8) if trained else 0

    vision = config.vision_config
    patches = tokens * vision.spatial_merge_size**2
    per_patch = vision_layer_activation_bytes(config, compute_bytes)
    if vision_trained:
        vit_per_patch = stack_activation_bytes(
            per_patch, vision.hidden_size * compute_bytes, vision.num_hidden_layers, layout.checkpointing
        )
    else:  # frozen ViT: nothing is saved, one layer's tensors live at a time
        vit_per_patch = per_patch
    vit = patches * vit_per_patch

    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4
    kv_cache = layout.kv_cache_tokens * kv

    components = {
        "parameters": parameters,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "logit_chunks": logit_chunks,
        "vit": vit,
        "zero_buffers": zero_buffers,
        "rollout_kv_cache": kv_cache,
        "rollout_engine": layout.rollout_share,
        "reference_model": layout.reference_bytes,
    }
    # (a rollout engine's share is its own reservation: no fragmentation allowance on it)
    components["reserve"] = RESERVE_FIXED + RESERVE_SHARE * (sum(components.values()) - layout.rollout_share)
    components = {k: int(v) for k, v in components.items()}
    total_bytes = sum(components.values())
    problems = list(layout.problems)
    if total_bytes > cluster.capacity:
        largest = max((k for k in COMPONENTS if k != "reserve"), key=components.__getitem__)
        problems.append(
            f"needs {total_bytes / GIB:.1f} GiB per GPU of {cluster.gpu_memory_gib:g}; largest: {largest} "
            f"{components[largest] / GIB:.1f} GiB"
        )
    words = [
        f"{layout.world_size}×",
        "FSDP2" if layout.fsdp else f"ZeRO-{layout.zero}" if deepspeed else "DDP",
    ]
    if sp > 1:
        words.append(f"SP{sp}")
    if pp > 1:
        words.append(f"PP{pp}")
    if tp > 1:
        words.append(f"TP{tp}")
    words.append("bf16" if layout.bf16 else "fp32")
    words.append(f"ckpt:{layout.checkpointing}")
    return StagePlan(
        stage=layout.name,
        layout=" ".join(words),
        tokens_per_gpu=tokens,
        components=components,
        capacity=cluster.capacity,
        problems=tuple(problems),
        notes=layout.notes,
    )


# ------------------------------------------------------------------------------------------ recipes


def _unique(stages: Iterable[StageConfig]) -> list[StageConfig]:
    seen, out = set(), []
    for stage in stages:
        if stage.name not in seen:
            seen.add(stage.name)
            out.append(stage)
    return out


def plan_pretrain(recipe: PretrainRecipe, cluster: Cluster) -> list[StagePlan]:
    """Stages 1, 2 and 3 (every annealing variant trains the same layout: planned once) of a pre-training
    recipe, each on the whole cluster (its launcher's ranks). Stage 4 averages checkpoints on the host."""
    sizes = ModelSizes.of(recipe.model_config())
    stages = [recipe.stages[1], recipe.stages[2], recipe.annealing]
    return [plan_layout(_stage_layout(s, cluster.world_size), sizes, cluster) for s in stages]


def plan_posttrain(
    recipe: PosttrainRecipe,
    model: KeyeConfig,
    cluster: Cluster,
    *,
    rl_prompt_tokens: int = DEFAULT_RL_PROMPT_TOKENS,
) -> list[StagePlan]:
    """Every post-training stage of `recipe` for a policy of `model`'s widths. Without a launch config the
    post-training flow trains in its own process: one GPU per stage whatever the cluster (a note says so);
    with one, every stage runs on the whole cluster, and each GSPO stage on the first rollout placement that
    fits (`choose_rollout_placement`; a note names it and why the ones before it were refused)."""
    sizes = ModelSizes.of(model)
    launched = recipe.launch is not None and recipe.launch.launcher != "inprocess"
    where = cluster if launched else Cluster(1, 1, cluster.gpu_memory_gib)
    note = () if launched else ("post-training runs in the flow's process: 1 GPU",)
    plans = []
    for stage in _unique(
        [recipe.sft, recipe.sft_anneal, recipe.reward_model_stage, recipe.longcot, recipe.expert]
    ):
        layout = _stage_layout(stage, where.world_size)
        plans.append(plan_layout(dataclasses.replace(layout, notes=layout.notes + note), sizes, where))
    plans.append(plan_layout(_mpo_layout(recipe.mpo, note, where.world_size), sizes, where))
    for name, gspo in (("gspo", recipe.gspo), ("alignment-rl", recipe.alignment)):
        if not launched:
            plans.append(plan_layout(_gspo_layout(name, gspo, rl_prompt_tokens, note), sizes, where))
            continue
        chosen, tried = choose_rollout_placement(name, gspo, sizes, where, rl_prompt_tokens)
        refused = [
            f"{placement.describe()}: {'; '.join(pr for p in ps for pr in p.problems)}"
            for placement, ps in tried
            if placement is not chosen
        ]
        chosen_plans = tried[-1][1] if chosen is None else dict(tried)[chosen]
        mismatch = _rl_launch_mismatch(recipe, gspo, chosen, cluster) if chosen is not None else None
        for k, plan in enumerate(chosen_plans):
            plans.append(
                dataclasses.replace(
                    plan,
                    notes=plan.notes + tuple(f"refused: {r}" for r in refused),
                    problems=plan.problems + ((mismatch,) if mismatch and k == 0 else ()),
                )
            )
    return plans


def _rl_launch_mismatch(
    recipe: PosttrainRecipe, gspo: GSPOStageConfig, chosen: RolloutPlacement, cluster: Cluster
) -> str | None:
    """Why the recipe's GSPO layout is not the chosen placement's (None: it is): a separate pool of k nodes
    needs the stage launched on the other nodes (`rl_launch`) and sampling from a server it does not start
    (`rollout_server.url` or `url_env`); a colocated engine, the stage on the whole cluster."""
    separate = chosen.kind == "separate"
    train_nodes = cluster.nodes - chosen.rollout_nodes
    launch = recipe.gspo_launch
    launched_nodes = launch.num_nodes if launch is not None else None
    if separate and launched_nodes != train_nodes:
        return (
            f"the chosen layout trains the policy on {train_nodes} node(s) beside a rollout pool of "
            f"{chosen.rollout_nodes}; the recipe launches GSPO on {launched_nodes or 'all'} (set rl_launch)"
        )
    server = gspo.rollout_server
    if separate and (server is None or (server.url is None and server.url_env is None)):
        return (
            "the chosen layout samples on a separate rollout pool: the stage's rollout_server must name "
            "that server (url or url_env), not start one beside the trainer"
        )
    if not separate and recipe.rl_launch is not None and launched_nodes not in (None, cluster.nodes):
        return f"the chosen layout trains on all {cluster.nodes} node(s); the recipe's rl_launch takes fewer"
    return None


def _mpo_layout(mpo: MPOStageConfig, notes: tuple[str, ...], world_size: int = 1) -> _Layout:
    # One batch of pairs_per_step chosen and rejected conversations (`preference.train_mpo`), rank r scoring
    # pairs r, r + W, …; the reference log-probs were computed once per pair before training, so no second
    # model is held.
    return _Layout(
        name="posttrain-3-mpo",
        world_size=world_size,
        trainable=None,
        tokens=2 * math.ceil(mpo.pairs_per_step / world_size) * mpo.max_length,
        zero=None,
        fsdp=mpo.fsdp,
        bf16=False,
        checkpointing=mpo.activation_checkpointing,
        notes=notes
        + (
            f"one batch of {mpo.pairs_per_step} pairs, each side up to {mpo.max_length} tokens",
            "MPO: reference log-probs computed once per pair before training (no reference model held)",
        ),
    )


@dataclass(frozen=True)
class RolloutPlacement:
    """Where a GSPO stage's rollout engine runs and what it holds: `engine_bytes` per weight and KV-cache
    value (2: a bf16 serving engine such as vLLM or SGLang; 4: the in-process fp32 sampler), `tensor_parallel`
    GPUs per engine instance (weights and KV heads split over them).
    - "colocated": on the training GPUs. A serving engine reserves `gpu_memory_utilization` of each GPU
      (vLLM's setting) for its weights and KV cache, resident beside the policy's sharded state, activations
      and buffers; the in-process sampler (None) holds exactly its weights and one group's cache;
    - "separate": on `rollout_nodes` machines of their own (`gpu_memory_utilization` of each), the policy
      training on the others; weights go over the network after every update.
    The engine must hold its weights and the KV cache of one prompt's G responses at full length (what
    sampling a group together needs); what is left of its share holds more sequences at once (throughput)."""

    kind: str
    gpu_memory_utilization: float | None
    engine_bytes: int = 2
    tensor_parallel: int = 1
    rollout_nodes: int = 0

    def describe(self) -> str:
        engine = "in-process fp32 sampler" if self.engine_bytes == 4 else "bf16 serving engine"
        share = "" if self.gpu_memory_utilization is None else f" at {self.gpu_memory_utilization:g}"
        tp = f" TP{self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        if self.kind == "separate":
            return f"separate rollout pool of {self.rollout_nodes} node(s), {engine}{share}{tp}"
        return f"colocated {engine}{share}{tp}"


# Tried in order; the first that fits is used. Colocated first: rollouts are most of an RL step, so a
# separate pool leaves the trainers idle while it samples (and itself idles during the update); among the
# colocated ones the largest share first (a larger KV cache samples more sequences at once). The in-process
# sampler (an fp32 copy of the model and fp32 cache) comes last among the colocated ones.
ROLLOUT_PLACEMENTS = (
    *(RolloutPlacement("colocated", share) for share in (0.6, 0.5, 0.4)),
    *(RolloutPlacement("colocated", share, tensor_parallel=2) for share in (0.5, 0.4, 0.3)),
    RolloutPlacement("colocated", None, engine_bytes=4),
    RolloutPlacement("separate", 0.9, rollout_nodes=1),
    RolloutPlacement("separate", 0.9, rollout_nodes=2),
)


def plan_gspo(
    name: str,
    gspo: GSPOStageConfig,
    sizes: ModelSizes,
    cluster: Cluster,
    placement: RolloutPlacement,
    prompt_tokens: int = DEFAULT_RL_PROMPT_TOKENS,
) -> list[StagePlan]:
    """A GSPO stage on `cluster` with its rollout engine placed by `placement`: the policy's plan (sharded
    as its config says over the training GPUs, the update's packed micro-batch, a colocated engine's share,
    a reference model only with a KL term), and for a separate pool the pool's plan too."""
    text = sizes.config.text_config
    length = prompt_tokens + gspo.max_new_tokens
    tp = placement.tensor_parallel
    weights = sizes.total * placement.engine_bytes / tp
    kv_per_token = (
        2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * placement.engine_bytes
    )
    kv_per_token /= tp
    group_cache = gspo.group_size * length * kv_per_token
    need = weights + group_cache
    capacity = cluster.capacity
    share = need if placement.gpu_memory_utilization is None else placement.gpu_memory_utilization * capacity
    problems, notes = [], [f"prompts assumed ≤ {prompt_tokens:,} tokens", f"rollouts: {placement.describe()}"]
    if tp > text.num_key_value_heads or text.num_key_value_heads % tp:
        problems.append(f"rollout TP{tp} does not divide the {text.num_key_value_heads} KV heads")
    if need > share:
        problems.append(
            f"rollout engine needs {need / GIB:.1f} GiB (weights {weights / GIB:.1f} + one group's KV cache "
            f"{group_cache / GIB:.1f}) of its {share / GIB:.1f} GiB share"
        )
    else:
        sequences = int((share - weights) // (length * kv_per_token))
        notes.append(f"rollout engine: room for {sequences} sequences of {length:,} tokens at once")
    train_world = cluster.world_size
    if placement.kind == "separate":
        train_world = (cluster.nodes - placement.rollout_nodes) * cluster.gpus_per_node
        if train_world < 1:
            problems.append(f"{cluster.nodes} node(s) leave none to train on beside the rollout pool")
            train_world = 1
    if gspo.gspo.kl_coef > 0:
        notes.append("KL term: the frozen reference model is held, unsharded, in fp32")
    else:
        notes.append("no KL term: no reference model (old log-probs are recomputed by the policy)")
    base = _gspo_layout(name, gspo, prompt_tokens, ())
    layout = dataclasses.replace(
        base,
        world_size=train_world,
        fsdp=gspo.fsdp,
        kv_cache_tokens=0,  # the engine holds the rollout cache
        rollout_share=int(share) if placement.kind == "colocated" else 0,
        reference_bytes=sizes.total * 4 if gspo.gspo.kl_coef > 0 else 0,
        problems=tuple(problems) if placement.kind == "colocated" else (),
        notes=tuple(notes),
    )
    policy = plan_layout(layout, sizes, cluster)  # (the layout's world size: the training GPUs)
    if placement.kind == "colocated":
        return [policy]
    components = {k: 0 for k in COMPONENTS}
    components["rollout_engine"] = int(share)
    components["reserve"] = RESERVE_FIXED
    pool = StagePlan(
        stage=f"posttrain-{name}-rollout",
        layout=f"{placement.rollout_nodes * cluster.gpus_per_node}× rollout engine"
        + (f" TP{tp}" if tp > 1 else ""),
        tokens_per_gpu=gspo.group_size * length,
        components=components,
        capacity=capacity,
        problems=tuple(problems),
        notes=tuple(notes),
    )
    return [policy, pool]


def choose_rollout_placement(
    name: str,
    gspo: GSPOStageConfig,
    sizes: ModelSizes,
    cluster: Cluster,
    prompt_tokens: int = DEFAULT_RL_PROMPT_TOKENS,
    placements: tuple[RolloutPlacement, ...] = ROLLOUT_PLACEMENTS,
) -> tuple[RolloutPlacement | None, list[tuple[RolloutPlacement, list[StagePlan]]]]:
    """The first of `placements` whose plans all fit (None: none does), and every placement tried up to it
    with its plans (their problems say why a placement was refused)."""
    tried = []
    for placement in placements:
        if placement.kind == "separate" and placement.rollout_nodes >= cluster.nodes:
            continue  # no machine left to train on
        plans = plan_gspo(name, gspo, sizes, cluster, placement, prompt_tokens)
        tried.append((placement, plans))
        if all(p.fits for p in plans):
            return placement, tried
    return None, tried


def _gspo_layout(name: str, gspo: GSPOStageConfig, prompt_tokens: int, notes: tuple[str, ...]) -> _Layout:
    # Rollouts: one prompt's G responses are sampled together with a KV cache (fp32 weights, fp32 cache);
    # the update: packed micro-batches of at most `max_tokens_per_micro_batch` tokens, else one padded forward
    # over a mini-batch's responses (`rl.train_gspo`).
    length = prompt_tokens + gspo.max_new_tokens
    responses = math.ceil(gspo.prompts_per_step * gspo.group_size / gspo.mini_batches_per_step)
    tokens = gspo.max_tokens_per_micro_batch or responses * length
    return _Layout(
        name=f"posttrain-{name}",
        world_size=1,
        trainable=None,
        tokens=tokens,
        zero=None,
        bf16=False,
        checkpointing=gspo.activation_checkpointing,
        kv_cache_tokens=gspo.group_size * length,
        notes=notes + (f"prompts assumed ≤ {prompt_tokens:,} tokens",),
    )


# ------------------------------------------------------------------------------------------ layouts compared


@dataclass(frozen=True)
class Interconnect:
    """What a layout comparison assumes of the machines (stated, not measured): per-GPU bandwidth inside a
    node (NVLink 4 on H100 SXM: 450 GB/s each way) and across nodes (one 400 Gb/s NIC per GPU: 50 GB/s), the
    card's dense bf16 peak and the share of it a step reaches."""

    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    peak_tflops: float = 989.0
    mfu: float = 0.4


@dataclass(frozen=True)
class LayoutCost:
    """One candidate layout of a stage: its memory plan, and per micro-batch on one GPU the compute seconds,
    the communication bytes inside and across nodes and their seconds (no overlap assumed), the pipeline
    bubble and the cluster's resulting tokens/s."""

    name: str
    plan: StagePlan
    compute_s: float
    intra_bytes: float
    inter_bytes: float
    comm_s: float
    bubble: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return {
            "layout": self.name,
            "total_gib": round(self.plan.total / GIB, 1),
            "fits": self.plan.fits,
            "problems": list(self.plan.problems),
            "compute_s": round(self.compute_s, 3),
            "intra_node_gb": round(self.intra_bytes / 1e9, 2),
            "inter_node_gb": round(self.inter_bytes / 1e9, 2),
            "comm_s": round(self.comm_s, 3),
            "bubble": round(self.bubble, 4),
            "tokens_per_s": round(self.tokens_per_s),
        }


# The layouts `compare_layouts` weighs for a long-context stage: (ZeRO stage, sequence, pipeline, tensor).
CANDIDATE_LAYOUTS = ((1, 4, 2, 1), (3, 4, 1, 1), (3, 8, 1, 1), (2, 8, 1, 1), (1, 1, 1, 8), (3, 2, 1, 4))


def compare_layouts(
    stage: StageConfig,
    model: KeyeConfig,
    cluster: Cluster,
    candidates: Iterable[tuple[int, int, int, int]] = CANDIDATE_LAYOUTS,
    interconnect: Interconnect = Interconnect(),
) -> list[LayoutCost]:
    """`stage` under each (ZeRO stage, sequence, pipeline, tensor parallel) candidate on `cluster`: memory per
    GPU (the stage's own plan with the layout swapped in, the trainer's refusals left out: this compares
    layouts, not what runs today) and a time model of one micro-batch of `max_tokens_per_micro_batch` tokens
    (else `max_length`), every sample as long as the micro-batch (the worst case for attention).

    Compute: 6 × LLM parameters × tokens + causal attention 6·T(T+1)·head_dim·heads per layer, split over the
    micro-batch's sp·pp·tp GPUs, at `mfu` of the peak. Communication per GPU and micro-batch (forward, the
    recomputation of checkpointing, backward): Ulysses 3 × (an all-to-all of q, k, v and one of the output)
    per layer; tensor parallelism 6 all-reduces of the hidden states per layer; ZeRO-3 3 parameter
    all-gathers and one gradient reduce-scatter; ZeRO-2 one reduce-scatter, and ZeRO-0/1 one all-reduce and
    ZeRO-1/2 one parameter all-gather per step, spread over the step's micro-batches; pipeline sends are left
    out (one hidden state per micro-batch). A group inside a node runs at NVLink speed, one across nodes at
    the NIC's.
    Pipeline bubble: (pp − 1) / (m + pp − 1) with m the step's micro-batches per pipeline, at most one per
    sample of the window."""
    sizes = ModelSizes.of(model)
    text = model.text_config
    e = 2 if stage.bf16 else 4
    tokens = stage.max_tokens_per_micro_batch or stage.max_length
    llm = sizes.count("language_model")
    q_dim = text.num_attention_heads * text.head_dim
    kv_dim = text.num_key_value_heads * text.head_dim
    attention = 6 * tokens * (tokens + 1) * text.head_dim * text.num_attention_heads * text.num_hidden_layers
    flops = 6 * llm * tokens + attention
    world = cluster.world_size
    base = _stage_layout(stage, world)
    trained_elements = sum(sizes.trained(stage.trainable_prefixes()).values())
    out = []
    for zero, sp, pp, tp in candidates:
        if world % (sp * pp * tp):
            continue
        dp = world // (sp * pp * tp)
        layout = dataclasses.replace(
            base,
            zero=zero,
            fsdp=False,
            sequence_parallel=sp,
            pipeline_parallel=pp,
            tensor_parallel=tp,
            problems=(),
        )
        plan = plan_layout(layout, sizes, cluster)
        micro_batches = max(1, math.ceil(stage.window_size / dp))
        group = max(1, world // (pp * tp))  # ZeRO's partition group

        def link(ranks: int) -> str:
            return "intra" if ranks <= cluster.gpus_per_node else "inter"

        volume = {"intra": 0.0, "inter": 0.0}
        layers = math.ceil(text.num_hidden_layers / pp)
        if sp > 1:
            per_layer = (tokens / sp) * (2 * q_dim + 2 * kv_dim) * e * (sp - 1) / sp
            volume[link(sp)] += 3 * layers * per_layer
        if tp > 1:
            volume[link(tp)] += 6 * layers * 2 * (tokens / sp) * text.hidden_size * e * (tp - 1) / tp
        weights = plan.components["parameters"] * (group if zero >= 3 else 1)  # the stage's whole weights
        grads = trained_elements * e / (pp * tp)
        share = (group - 1) / group
        if zero >= 3:
            volume[link(group)] += (3 * weights + grads) * share
        elif zero == 2:
            volume[link(group)] += grads * share + weights * share / micro_batches
        else:
            volume[link(group)] += 2 * grads * share / micro_batches + (
                weights * share / micro_batches if zero else 0
            )
        compute_s = flops / (sp * pp * tp) / (interconnect.peak_tflops * 1e12 * interconnect.mfu)
        comm_s = volume["intra"] / (interconnect.intra_node_gbps * 1e9) + volume["inter"] / (
            interconnect.inter_node_gbps * 1e9
        )
        bubble = (pp - 1) / (micro_batches + pp - 1)
        seconds = (compute_s + comm_s) / (1 - bubble)
        name = f"ZeRO-{zero} SP{sp} PP{pp} TP{tp} (DP{dp})"
        out.append(
            LayoutCost(
                name, plan, compute_s, volume["intra"], volume["inter"], comm_s, bubble, dp * tokens / seconds
            )
        )
    return out


# ------------------------------------------------------------------------------------------ the flows' check


def local_cluster(launch: LaunchConfig | None) -> Cluster:
    """The cluster a flow's stages run on here: the launcher's ranks on this machine's device. On CUDA the
    device's memory; on a CPU the host's RAM shared by the ranks of this node."""
    launch = launch or LaunchConfig()
    if launch.hostfile is not None:
        hosts = [
            line for line in Path(launch.hostfile).read_text().splitlines() if line.split("#")[0].strip()
        ]
        nodes = launch.num_nodes or len(hosts)
    else:
        nodes = launch.nodes()
    per_node = launch.nproc_per_node if launch.launcher != "inprocess" else 1
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / per_node
    return Cluster(nodes, per_node, memory / GIB)


def check_fits(plans: list[StagePlan], what: str) -> None:
    """Raise `InfeasibleRecipe` naming every stage that cannot run, and why."""
    bad = [p for p in plans if not p.fits]
    if bad:
        lines = [f"  {p.stage} ({p.layout}): {'; '.join(p.problems)}" for p in bad]
        raise InfeasibleRecipe(f"{what}: {len(bad)} stage(s) cannot run here:\n" + "\n".join(lines))


def markdown(plans: list[StagePlan], title: str) -> str:
    """The plans as a Markdown table (GiB per GPU), for a Prefect artifact."""
    shown = [c for c in COMPONENTS if any(p.components[c] for p in plans)]
    lines = [
        f"### {title}",
        "",
        "| stage | layout | tokens/GPU | "
        + " | ".join(c.replace("_", " ") for c in shown)
        + " | total | fits |",
        "|" + "---|" * (len(shown) + 5),
    ]
    for p in plans:
        cells = [f"{p.components[c] / GIB:.2f}" for c in shown]
        verdict = "yes" if p.fits else "**no**: " + "; ".join(p.problems)
        lines.append(
            f"| {p.stage} | {p.layout} | {p.tokens_per_gpu:,} | {' | '.join(cells)} | {p.total / GIB:.2f} | "
            f"{verdict} |"
        )
    notes = sorted({n for p in plans for n in p.notes})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))
