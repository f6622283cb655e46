"""Pre-training as Python recipes: every setting of stages 1–4, their mixtures and their evaluation, in one
`PretrainRecipe`. `pretrain_recipe("tiny")` runs on a CPU in about a minute; `pretrain_recipe("keye-8b")` has
the paper's settings (SPEC §3) and what SPEC leaves UNSTATED chosen and named in `keyeflow.training.config`.

Both variants run the same code. The tiny one scales lengths, steps and model down (context 1,024 for
stages 1–2 and 4,096 for annealing — the same 1 → 4+ extension the paper makes from 8K to 128K — and a
model of two 64-wide layers), trains in-process without DeepSpeed (a DeepSpeed engine adds ~10 s per stage
on a CPU and nothing to check at this size), and keeps everything else: the freezing policy, the rope theta
reset to 8e6, the 24/50/26 annealing mixture, several annealing variants fused by a weighted average, and
the promotion gate after every stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from keyeflow.config import check_int, check_number, config_hash, invalid
from keyeflow.datasets.mixture import MixtureConfig, stage_mixture
from keyeflow.model.config import KeyeConfig, keye_8b, tiny
from keyeflow.model.merging import MergeConfig
from keyeflow.training.config import StageConfig, pretrain_stage
from keyeflow.training.launch import LaunchConfig

MODELS = {"tiny": tiny, "keye-8b": keye_8b}


@dataclass(frozen=True, kw_only=True)
class AnnealVariant:
    """One stage-3 run: its own mixture (overrides of `stage_mixture(3)`), its fusion weight."""

    name: str
    mixture: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    seed: int = 0  # the stage's data order (the mixture's own seed is in `mixture`)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.replace("-", "").replace("_", "").isalnum():
            raise invalid(
                "AnnealVariant",
                "name",
                self.name,
                "letters, digits, '-' and '_' only (it names a checkpoint directory and an MLflow run)",
            )
        check_number("AnnealVariant", "weight", self.weight, minimum=0)  # kept as given: it is hashed
        object.__setattr__(self, "seed", check_int("AnnealVariant", "seed", self.seed, minimum=0))


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The evaluation after every stage and the promotion gate on it.

    Held-out loss: `heldout_per_modality` samples of each modality from the samples every mixture holds out
    (`holdout_per_mille`), at most `max_tokens` long, the same set for every stage so stages compare.
    MCQ: `num_mcq` Video-MME-format questions generated from the pre-tokenised videos (`generate_mcq_set`).
    Gate: a held-out loss may be at most `loss_margin` (relative) above the parent's, an accuracy at most
    `accuracy_margin` (absolute) below it.
    lmms-eval (optional, `scripts/setup_lmms_eval.sh`): `lmms_eval_tasks` names tasks lmms-eval knows or finds
    under `lmms_eval_include_path` (a directory of task YAMLs), run on at most `lmms_eval_limit` docs each (0:
    all); their higher-is-better scores are gated like accuracies."""

    holdout_per_mille: int = 50
    heldout_per_modality: int = 16
    max_tokens: int = 8_192
    num_mcq: int = 64
    loss_margin: float = 0.02
    accuracy_margin: float = 0.02
    seed: int = 0
    lmms_eval_tasks: tuple[str, ...] = ()
    lmms_eval_include_path: str = ""
    lmms_eval_limit: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lmms_eval_tasks", tuple(self.lmms_eval_tasks))
        if not all(isinstance(t, str) and t for t in self.lmms_eval_tasks):
            raise ValueError(f"EvalConfig.lmms_eval_tasks must be task names, got {self.lmms_eval_tasks!r}")
        for name, minimum, maximum in (
            ("lmms_eval_limit", 0, None),
            ("holdout_per_mille", 1, 999),
            ("heldout_per_modality", 1, None),
            ("max_tokens", 1, None),
            ("num_mcq", 1, None),
            ("seed", 0, None),
        ):
            object.__setattr__(
                self,
                name,
                check_int("EvalConfig", name, getattr(self, name), minimum=minimum, maximum=maximum),
            )
        for name in ("loss_margin", "accuracy_margin"):  # kept as given: they are hashed
            check_number("EvalConfig", name, getattr(self, name), minimum=0)


@dataclass(frozen=True, kw_only=True)
class PretrainRecipe:
    """Stages 1–4 and their evaluation. `init`: the checkpoint stage 1 starts from (a local path: SigLIP +
    Qwen3 converted, or Keye's own); None = fresh weights of `model` seeded by stage 1's seed."""

    name: str
    model: str
    init: str | None
    stages: dict[int, StageConfig]  # 1 (alignment) and 2 (multi-task)
    mixtures: dict[int, dict[str, Any]]  # stage → overrides of stage_mixture(stage), for 1 and 2
    annealing: StageConfig  # stage 3, once per variant
    variants: tuple[AnnealVariant, ...]
    fusion_method: str = "average"  # average (the paper) | task_arithmetic | ties (base = stage 2)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    initial_context: int | None = None  # the fresh model's max_position_embeddings (None: the factory's)
    launch: LaunchConfig | None = None  # how each stage's ranks start (None: in the flow's process)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"PretrainRecipe.model={self.model!r}: one of {sorted(MODELS)}")
        if sorted(self.stages) != [1, 2]:
            raise ValueError(f"PretrainRecipe.stages must hold stages 1 and 2, got {sorted(self.stages)}")
        if sorted(self.mixtures) != [1, 2]:
            raise ValueError(f"PretrainRecipe.mixtures must hold stages 1 and 2, got {sorted(self.mixtures)}")
        if not self.variants:
            raise ValueError("PretrainRecipe.variants: at least one annealing variant")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"PretrainRecipe.variants: names must be unique, got {names}")
        self.fusion()  # validates the weights for the method now, not after three stages of training
        for stage in (1, 2, 3):
            self.mixture(stage, self.variants[0])

    def model_config(self) -> KeyeConfig:
        config = MODELS[self.model]()
        if self.initial_context is not None:
            config.text_config.max_position_embeddings = self.initial_context
        return config

    def mixture_overrides(self, stage: int, variant: AnnealVariant | None = None) -> dict[str, Any]:
        """What `stage_mixture(stage, **…)` takes for this recipe: the stage's context as the longest sample,
        the recipe's overrides, and the evaluation hold-out (every mixture holds out the same samples)."""
        overrides = (variant or self.variants[0]).mixture if stage == 3 else self.mixtures[stage]
        context = self.annealing.max_length if stage == 3 else self.stages[stage].max_length
        return {
            "max_sample_tokens": context,
            "name": f"stage3-{(variant or self.variants[0]).name}" if stage == 3 else f"stage{stage}",
            **overrides,
            "holdout_per_mille": self.evaluation.holdout_per_mille,
        }

    def mixture(self, stage: int, variant: AnnealVariant | None = None) -> MixtureConfig:
        return stage_mixture(stage, **self.mixture_overrides(stage, variant))

    def variant_stage(self, variant: AnnealVariant) -> StageConfig:
        return dataclasses.replace(
            self.annealing, name=f"{self.annealing.name}-{variant.name}", seed=variant.seed
        )

    def fusion(self) -> MergeConfig:
        weights = [v.weight for v in self.variants]
        if self.fusion_method == "average":
            total = sum(weights)
            if total <= 0:
                raise ValueError("PretrainRecipe.variants: fusion weights sum to 0")
            # Weights are relative in the recipe (1, 1, 2); the merge takes them normalised, as given.
            return MergeConfig(method="average", weights=tuple(w / total for w in weights))
        return MergeConfig(method=self.fusion_method, weights=tuple(weights))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "model": self.model, "init": self.init,
            "initial_context": self.initial_context,
            "stages": {str(k): v.to_dict() for k, v in sorted(self.stages.items())},
            "mixtures": {str(k): v for k, v in sorted(self.mixtures.items())},
            "annealing": self.annealing.to_dict(),
            "variants": [dataclasses.asdict(v) for v in self.variants],
            "fusion_method": self.fusion_method, "evaluation": dataclasses.asdict(self.evaluation),
            # only when set, so the hash of a recipe that trains in-process stays what it was
            **({"launch": self.launch.to_dict()} if self.launch else {}),
        }  # fmt: skip

    def config_hash(self) -> str:
        return config_hash(self.to_dict(), compact=True)


def _tiny(init: str | None) -> PretrainRecipe:
    # Random weights learn fast at 1e-3 and barely move at the paper's 2e-5 in 4 steps; the tiny recipe's
    # learning rates are the only values chosen for a CPU demo rather than scaled from the paper.
    small = {
        "max_steps": 4,
        "window_size": 8,
        "micro_batches_per_step": 1,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "bf16": False,
        "deepspeed_zero": None,
        "activation_checkpointing": "off",  # nothing to save at this size; the stored dicts stay as they were
    }
    stages = {
        1: pretrain_stage(1, **small, max_length=1_024, learning_rate=1e-3),
        2: pretrain_stage(2, **small, max_length=1_024, learning_rate=1e-3),
    }
    annealing = pretrain_stage(
        3,
        **small,
        max_length=4_096,
        learning_rate=5e-4,
        min_lr=0.0,
        sequence_parallel_size=1,
        fsdp=False,  # one process: nothing to shard
    )
    # Stage 2's video share must come from the few clips short enough for 1,024 tokens: let it repeat them.
    mixtures = {1: {}, 2: {"upsample": True, "max_repeats": 8}}
    variants = (
        AnnealVariant(name="balanced", weight=1.0),
        AnnealVariant(
            name="video-rich",
            weight=1.0,
            seed=1,
            mixture={"target_shares": {"video": 0.34, "image": 0.44, "text": 0.22}, "seed": 1},
        ),
    )
    evaluation = EvalConfig(
        holdout_per_mille=60,
        heldout_per_modality=3,
        max_tokens=1_024,
        num_mcq=4,
        loss_margin=0.05,
        accuracy_margin=0.5,
    )
    return PretrainRecipe(
        name="tiny",
        model="tiny",
        init=init,
        stages=stages,
        mixtures=mixtures,
        annealing=annealing,
        variants=variants,
        evaluation=evaluation,
        initial_context=1_024,
    )


def _keye_8b(init: str | None) -> PretrainRecipe:
    # One pack of the stage's context per micro-batch: a step takes as many micro-batches as its window's
    # packs need, and activation memory is bounded by the context whatever the samples (`keyeflow plan`).
    stages = {s: pretrain_stage(s, max_tokens_per_micro_batch=8_192) for s in (1, 2)}
    # Variants: the paper fuses checkpoints annealed on different mixtures without listing them (UNSTATED);
    # these three move the 24/50/26 balance a few points towards each modality in turn.
    variants = (
        AnnealVariant(name="balanced"),
        AnnealVariant(
            name="video-rich",
            seed=1,
            mixture={"target_shares": {"video": 0.30, "image": 0.46, "text": 0.24}, "seed": 1},
        ),
        AnnealVariant(
            name="text-rich",
            seed=2,
            mixture={"target_shares": {"video": 0.22, "image": 0.46, "text": 0.32}, "seed": 2},
        ),
    )
    return PretrainRecipe(
        name="keye-8b",
        model="keye-8b",
        init=init,
        stages=stages,
        mixtures={1: {}, 2: {}},
        annealing=pretrain_stage(3, max_tokens_per_micro_batch=131_072),
        variants=variants,
        evaluation=EvalConfig(),
    )


RECIPES = {"tiny": _tiny, "keye-8b": _keye_8b}


def pretrain_recipe(name: str, init: str | None = None) -> PretrainRecipe:
    """The named recipe ("tiny" or "keye-8b"), starting from the checkpoint `init` (None: fresh weights)."""
    if name not in RECIPES:
        raise ValueError(f"no pre-training recipe {name!r}; available: {sorted(RECIPES)}")
    return RECIPES[name](init)
