"""The training stages' settings, each validated on construction: `StageConfig` (the SFT/pre-training loop)
and the recipe's pre-training stages (`pretrain_stage`); `MPOStageConfig` (preference optimisation) and
`GSPOStageConfig` (reinforcement learning) for post-training.

Everything the loop, the loader and DeepSpeed need comes from here: `keyeflow.training.deepspeed_config`
renders the DeepSpeed JSON from a `StageConfig` (one source of truth), and `keyeflow.training.trainer.train`
reads the rest. A checkpoint stores `to_dict()` and `config_hash()`, so a resumed run can tell whether its
settings changed.

What SPEC §3 fixes for pre-training, and what it leaves open:
- stage 1 (alignment) trains the projector only, ViT and LLM frozen; context 8,192; DP + ZeRO-2;
- stage 2 (multi-task) trains everything; context 8,192; DP + ZeRO-2;
- stage 3 (annealing) trains everything; context 131,072; rope theta 1e6 → 8e6; the paper: ZeRO-1 with
  context (sequence) parallelism and pipeline parallelism, sizes UNSTATED. `pretrain_stage(3)` takes ZeRO-3
  with Ulysses sequence parallelism 4 (4 divides Qwen3-8B's 8 KV heads) and no pipeline: the memory planner
  shows ZeRO-1 + pipeline 2 does not fit an 80 GB card at 131,072 tokens (`keyeflow plan --compare`);
- learning rates, batch sizes and step counts: UNSTATED. `pretrain_stage` picks LLaVA-style values
  (1e-3 for a projector-only alignment stage, 2e-5 for full training, a lower 1e-5 decaying to 0 for
  annealing) and 3% warmup; override them per run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from keyeflow.config import check_flag, check_int, check_number, config_hash, invalid, is_number
from keyeflow.model.config import ACTIVATION_CHECKPOINTING
from keyeflow.quality.errors import DEFAULT_MAX_ERROR_SHARE
from keyeflow.training.hints import HintConfig
from keyeflow.training.losses import GSPOConfig, MPOConfig

SCHEDULES = ("cosine", "constant", "linear")
TRAINABLE_POLICIES = ("projector", "all")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """How one stage trains. Units: steps are optimizer steps; `window_size` is mixture occurrences (samples)
    per step for the whole job (every rank together); `max_length` is tokens per packed sequence.

    `trainable` is the freezing policy: "projector" (alignment: ViT and LLM frozen), "all", or module-name
    prefixes of `KeyeForConditionalGeneration` (e.g. `("projector", "language_model.layers.35")`); frozen
    parameters get `requires_grad=False` and are never given to the optimizer, so nothing (weight decay
    included) can change them.
    """

    name: str
    learning_rate: float
    max_steps: int
    max_length: int  # the stage's context: longest packed sequence (and longest sample) in tokens
    window_size: int  # occurrences per optimizer step, all ranks together (the loader's window)
    trainable: str | tuple[str, ...] = "all"
    min_lr: float = 0.0  # where "cosine"/"linear" decay ends
    warmup_steps: int = 0  # linear warm-up from 0 to learning_rate
    schedule: str = "cosine"
    weight_decay: float = 0.0  # applied to matrices only (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    micro_batches_per_step: int = 1  # gradient accumulation: micro-batches per rank per step
    seed: int = 0  # fresh-init weights, the loader's epoch shuffles, torch/numpy/python RNG
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the last step
    rope_theta: float | None = None  # override the LLM's RoPE base (SPEC: 8e6 from stage 3)
    deepspeed_zero: int | None = None  # None: plain data-parallel PyTorch; 0-3: a DeepSpeed engine
    zero_bucket_size: int = 500_000_000  # elements per ZeRO reduce/all-gather bucket (DeepSpeed's default)
    # FSDP2 instead of DeepSpeed: parameters, gradients and optimizer state of every module sharded over all
    # ranks, the model built on the meta device, checkpoints sharded and asynchronous (DCP) and resumable on
    # any world size (`keyeflow.training.sharding`). Left out of `to_dict` when False (configs written before
    # the field existed read and hash the same).
    fsdp: bool = False
    # bf16 compute: autocast over fp32 weights without DeepSpeed; with it, the engine's bf16 mode (bf16
    # weights, fp32 master copies of the trained ones only, so frozen weights are saved rounded to bf16)
    bf16: bool = False
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states in CPU memory (ZeRO >= 1)
    offload_params: bool = False  # ZeRO-Infinity-style parameter offload to CPU (ZeRO 3)
    # Model-parallel degrees of a long-context stage (data-parallel ranks = world size / sequence).
    # Sequence parallelism is Ulysses (`keyeflow.model.sequence_parallel`): a group of that many ranks trains
    # on the same micro-batches, each on a slice of every row. Pipeline parallelism is not built and must stay
    # 1 (kept so stored stage dicts load and hash the same).
    sequence_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Recompute layer activations in the backward (`modeling.KeyeForConditionalGeneration`, whose loops apply
    # it in train and eval mode): "full" every LLM decoder layer and ViT layer, "selective" every other one
    # (layers 0, 2, 4, …), "off" none. It changes memory and time, never the numbers, so it is left out of
    # `config_hash` (and of `to_dict` when "off").
    activation_checkpointing: str = "off"
    # Cap on a micro-batch's tokens (the loader's `max_tokens_per_micro_batch`): a step then takes as many
    # micro-batches as its window needs, at least `micro_batches_per_step`, the same on every rank (DeepSpeed
    # is told each step's last one). None: a fixed count per step (the plans of every stage trained before the
    # field existed; left out of `to_dict` then).
    max_tokens_per_micro_batch: int | None = None

    def __post_init__(self) -> None:
        def fail(name: str, value: Any, why: str) -> None:
            raise invalid("StageConfig", name, value, why)

        if not isinstance(self.name, str) or not self.name:
            fail("name", self.name, "must be a non-empty string")
        for name, minimum in (
            ("max_steps", 1),
            ("max_length", 1),
            ("window_size", 1),
            ("warmup_steps", 0),
            ("micro_batches_per_step", 1),
            ("seed", 0),
            ("checkpoint_every", 1),
            ("zero_bucket_size", 1),
            ("sequence_parallel_size", 1),
            ("pipeline_parallel_size", 1),
        ):
            object.__setattr__(
                self, name, check_int("StageConfig", name, getattr(self, name), minimum=minimum)
            )
        if self.warmup_steps > self.max_steps:
            fail("warmup_steps", self.warmup_steps, f"must be <= max_steps ({self.max_steps})")

        # Numbers are stored as floats, so that 2 and 2.0 give one hash and one JSON.
        # grad_clip None: no clipping; rope_theta None: the checkpoint's own.
        optional = [name for name in ("grad_clip", "rope_theta") if getattr(self, name) is not None]
        positive = ["learning_rate", *optional]
        for name in (*positive, "min_lr", "weight_decay"):
            object.__setattr__(
                self,
                name,
                check_number("StageConfig", name, getattr(self, name), minimum=0, strict=name in positive),
            )
        if self.min_lr > self.learning_rate:
            fail("min_lr", self.min_lr, f"must be <= learning_rate ({self.learning_rate})")
        if self.schedule not in SCHEDULES:
            fail("schedule", self.schedule, f"must be one of {SCHEDULES}")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
            fail("betas", self.betas, "must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))

        trainable = self.trainable
        if isinstance(trainable, str):
            if trainable not in TRAINABLE_POLICIES:
                fail(
                    "trainable",
                    trainable,
                    f"must be one of {TRAINABLE_POLICIES} or a list of module prefixes",
                )
        else:
            if (
                not isinstance(trainable, (list, tuple))
                or not trainable
                or not all(isinstance(p, str) and p.strip(".") for p in trainable)
            ):
                fail("trainable", trainable, "a list of module prefixes must be non-empty strings")
            object.__setattr__(self, "trainable", tuple(sorted({p.strip(".") for p in trainable})))

        if self.deepspeed_zero is not None and (
            isinstance(self.deepspeed_zero, bool) or self.deepspeed_zero not in ZERO_STAGES
        ):
            fail(
                "deepspeed_zero", self.deepspeed_zero, f"must be None (no DeepSpeed) or one of {ZERO_STAGES}"
            )
        for flag in ("bf16", "offload_optimizer", "offload_params", "fsdp"):
            check_flag("StageConfig", flag, getattr(self, flag))
        _check_checkpointing("StageConfig", self.activation_checkpointing)
        if self.fsdp and self.deepspeed_zero is not None:
            fail("fsdp", True, "shards with FSDP2 instead of DeepSpeed: set deepspeed_zero=None")
        if self.offload_optimizer and (self.deepspeed_zero or 0) < 1:
            fail("offload_optimizer", True, "needs DeepSpeed ZeRO stage >= 1 (deepspeed_zero)")
        if self.offload_params and self.deepspeed_zero != 3:
            fail("offload_params", True, "needs DeepSpeed ZeRO stage 3 (deepspeed_zero=3)")
        if self.max_tokens_per_micro_batch is not None:
            budget = check_int(
                "StageConfig", "max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, minimum=1
            )
            if budget < self.max_length:
                fail(
                    "max_tokens_per_micro_batch", budget, f"must be >= max_length ({self.max_length}): a pack"
                )
        if self.pipeline_parallel_size != 1:
            fail(
                "pipeline_parallel_size",
                self.pipeline_parallel_size,
                "pipeline parallelism is not built: at 8.6B ZeRO-3 with sequence parallelism fits where it "
                "does not (`keyeflow plan --compare`)",
            )

    def trainable_prefixes(self) -> tuple[str, ...] | None:
        """Module-name prefixes of the trained parameters; None means every parameter."""
        if self.trainable == "all":
            return None
        if self.trainable == "projector":
            return ("projector",)
        return self.trainable

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up, then the schedule to `min_lr`."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.learning_rate
        decay_steps = max(self.max_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        if self.schedule == "linear":
            scale = 1.0 - progress
        else:
            scale = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.learning_rate - self.min_lr) * scale

    def to_dict(self) -> dict[str, Any]:
        out = _without_default_checkpointing(dataclasses.asdict(self))
        if out["max_tokens_per_micro_batch"] is None:
            del out["max_tokens_per_micro_batch"]
        if not out["fsdp"]:
            del out["fsdp"]
        out["betas"] = list(self.betas)
        if isinstance(self.trainable, tuple):
            out["trainable"] = list(self.trainable)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown StageConfig field(s) {unknown}; valid: {sorted(names)}")
        data = dict(data)
        if isinstance(data.get("trainable"), list):
            data["trainable"] = tuple(data["trainable"])
        if isinstance(data.get("betas"), list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def config_hash(self) -> str:
        return config_hash(_unhashed_checkpointing(self.to_dict()), compact=True)


def _check_checkpointing(owner: str, mode: Any) -> None:
    if mode not in ACTIVATION_CHECKPOINTING:
        raise invalid(owner, "activation_checkpointing", mode, f"must be one of {ACTIVATION_CHECKPOINTING}")


def _without_default_checkpointing(data: dict[str, Any]) -> dict[str, Any]:
    """`to_dict` leaves "off" out, so configs written before the field existed read and compare the same."""
    if data.get("activation_checkpointing") == "off":
        del data["activation_checkpointing"]
    return data


def _without_default_fsdp(data: dict[str, Any]) -> dict[str, Any]:
    if not data["fsdp"]:
        del data["fsdp"]
    return data


def _unhashed_checkpointing(data: dict[str, Any]) -> dict[str, Any]:
    data.pop("activation_checkpointing", None)
    return data


# SPEC §3 per pre-training stage; learning rates and warm-up are UNSTATED choices (module docstring).
_PRETRAIN_STAGES: dict[int, dict[str, Any]] = {
    1: {
        "name": "pretrain-1-alignment",
        "trainable": "projector",
        "learning_rate": 1e-3,
        "max_length": 8_192,
        "deepspeed_zero": 2,
    },
    2: {
        "name": "pretrain-2-multitask",
        "trainable": "all",
        "learning_rate": 2e-5,
        "max_length": 8_192,
        "deepspeed_zero": 2,
    },
    3: {
        "name": "pretrain-3-annealing",
        "trainable": "all",
        "learning_rate": 1e-5,
        "max_length": 131_072,
        "rope_theta": 8e6,
        "schedule": "linear",
        # Fully sharded (FSDP2: `keyeflow.training.sharding` says why not ZeRO-3) + Ulysses over 4 ranks of a
        # node: fits an 80 GiB GPU on 4 × 8 at 131,072 tokens, where ZeRO-1 with pipeline 2 needs 86.2 GiB
        # (`keyeflow plan --compare`, README).
        "fsdp": True,
        "sequence_parallel_size": 4,
    },
}


def pretrain_stage(stage: int, **overrides: Any) -> StageConfig:
    """The recipe's pre-training stage 1, 2 or 3 (bf16, DeepSpeed as SPEC §3 says), with fields replaced.
    `max_steps` and `window_size` default to 1000 steps of 256 samples (UNSTATED), warm-up to 3% of the
    steps."""
    if stage not in _PRETRAIN_STAGES:
        raise ValueError(f"no pre-training stage {stage!r}: stages 1–3 train (stage 4 is weight averaging)")
    base = {
        "max_steps": 1000, "window_size": 256, "bf16": True, "activation_checkpointing": "full",
        **_PRETRAIN_STAGES[stage],
    }  # fmt: skip
    base.update(overrides)
    base.setdefault("warmup_steps", max(1, round(0.03 * base["max_steps"])))
    return StageConfig.from_dict(base)


# ---------------------------------------------------------------------------------------------- post-training


@dataclass(frozen=True, kw_only=True)
class MPOStageConfig:
    """How the MPO stage trains (`keyeflow.training.preference.train_mpo`). `max_steps` optimizer steps of
    `pairs_per_step` pairs each (one batch); `max_length`: the longest chosen/rejected conversation in tokens
    (longer pairs are refused before training starts, naming them); `warmup_steps`: linear warm-up to
    `learning_rate`, constant after; `grad_clip`: max global gradient norm (None: none); `seed`: the per-epoch
    pair shuffles and the RNG. Learning rate and step counts are UNSTATED for Keye (override per run)."""

    learning_rate: float
    max_steps: int
    pairs_per_step: int
    max_length: int
    mpo: MPOConfig = field(default_factory=MPOConfig)
    seed: int = 0
    checkpoint_every: int = 100
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    activation_checkpointing: str = "off"  # as StageConfig's (not hashed)
    # As StageConfig's: the policy's parameters, gradients and AdamW state sharded over all ranks (FSDP2).
    # Left out of `to_dict` when False (configs and hashes from before the field existed stay the same).
    fsdp: bool = False

    def __post_init__(self) -> None:
        _check_checkpointing("MPOStageConfig", self.activation_checkpointing)
        check_flag("MPOStageConfig", "fsdp", self.fsdp)
        for name, minimum in (
            ("max_steps", 1),
            ("pairs_per_step", 1),
            ("max_length", 2),
            ("seed", 0),
            ("checkpoint_every", 1),
            ("warmup_steps", 0),
        ):
            object.__setattr__(
                self, name, check_int("MPOStageConfig", name, getattr(self, name), minimum=minimum)
            )
        if self.warmup_steps > self.max_steps:
            raise invalid(
                "MPOStageConfig",
                "warmup_steps",
                self.warmup_steps,
                f"must be <= max_steps ({self.max_steps})",
            )
        for name in ("learning_rate",) if self.grad_clip is None else ("learning_rate", "grad_clip"):
            object.__setattr__(
                self, name, check_number("MPOStageConfig", name, getattr(self, name), minimum=0, strict=True)
            )
        if not isinstance(self.mpo, MPOConfig):
            raise invalid("MPOStageConfig", "mpo", self.mpo, "must be an MPOConfig")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        return self.learning_rate

    def to_dict(self) -> dict[str, Any]:
        return _without_default_fsdp(_without_default_checkpointing(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MPOStageConfig:
        """The config `to_dict` wrote (a launched job's spec)."""
        data = _known_fields(cls, data)
        if isinstance(data.get("mpo"), dict):
            data["mpo"] = MPOConfig(**data["mpo"])
        return cls(**data)

    def config_hash(self) -> str:
        return config_hash(_unhashed_checkpointing(self.to_dict()), compact=True)


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
    return dict(data)


ROLLOUT_SYNC_DTYPES = ("bf16", "fp32")


@dataclass(frozen=True, kw_only=True)
class RolloutServerConfig:
    """GSPO rollouts through an OpenAI-compatible server, token ids in and out
    (`keyeflow.model.rollout_protocol`), with the policy's weights synced to it after every update
    (`keyeflow.training.rollout`).

    ``url``: the server's API root with ``/v1`` (vLLM, SGLang or ``keyeflow.model.serving`` started with
    ``--enable-weight-reload``), on a machine that reads the run's ``out_dir`` (the exports are loaded from
    there); None: the run starts our own server on 127.0.0.1 itself and stops it at the end (one machine,
    tests). ``served_model_name``: the name requests ask for. ``sync_dtype``: the dtype of the weights
    exported for the server ("bf16" as a serving engine runs; "fp32" keeps rollouts bit-equal to the trainer's
    on our server); it sets the log-prob tolerance of the sync check (`rollout.LOGPROB_TOLERANCE`).
    ``api_key_env``: the environment variable holding the server's bearer token (None: no token).
    ``max_concurrency``: conversations in flight at once. ``url_env``: instead of ``url``, the environment
    variable that holds it: a recipe whose server the user starts on machines of their own names the variable
    (the URL is known only where it runs), and `resolved_url` refuses a run where it is unset instead of
    falling back to a server on 127.0.0.1. Left out of `to_dict` when None (hashes stay the same).
    """

    url: str | None = None
    url_env: str | None = None
    served_model_name: str = "policy"
    sync_dtype: str = "bf16"
    api_key_env: str | None = None
    timeout_s: float = 600.0
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        if self.url is not None and not str(self.url).startswith(("http://", "https://")):
            raise invalid("RolloutServerConfig", "url", self.url, "must start with http:// or https://")
        if self.url_env is not None and (self.url is not None or not self.url_env):
            raise invalid("RolloutServerConfig", "url_env", self.url_env, "a variable name, with url unset")
        if not self.served_model_name:
            raise invalid("RolloutServerConfig", "served_model_name", self.served_model_name, "must be set")
        if self.sync_dtype not in ROLLOUT_SYNC_DTYPES:
            raise invalid(
                "RolloutServerConfig", "sync_dtype", self.sync_dtype, f"one of {ROLLOUT_SYNC_DTYPES}"
            )
        check_number("RolloutServerConfig", "timeout_s", self.timeout_s, minimum=0, strict=True)
        check_int("RolloutServerConfig", "max_concurrency", self.max_concurrency, minimum=1)

    def resolved_url(self) -> str | None:
        """The server's API root: `url`, or the value of `url_env` (an error naming the variable when it is
        unset or not a URL); None: the run starts its own server."""
        if self.url_env is None:
            return self.url
        value = os.environ.get(self.url_env, "").strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"RolloutServerConfig.url_env: set {self.url_env} to the rollout server's API root "
                f"(http://host:port/v1 of a vLLM, SGLang or `python -m keyeflow.model.serving "
                f"--enable-weight-reload` server that reads the run's out_dir); it is "
                f"{repr(value) if value else 'unset'}"
            )
        return value


@dataclass(frozen=True, kw_only=True)
class GSPOStageConfig:
    """One GSPO stage (`keyeflow.training.rl`). Counts are per optimizer step unless said otherwise.

    ``prompts_per_step``: prompts rolled out per step. ``group_size``: G, rollouts per prompt (>= 2: the
    advantages are normalised within the group). ``max_new_tokens``/``temperature``: sampling (temperature >
    0: greedy would give G identical responses and no signal). ``learning_rate``: AdamW's, constant (weight
    decay 0, as TRL's GRPO default: with LRs around 1e-6 over a few hundred steps, decay only pulls weights
    towards 0). ``max_steps``: the step the stage ends at (a resume continues up to it).
    ``mini_batches_per_step``: updates per rollout batch. ``grad_clip``: max gradient norm (0: no clipping).
    ``success_threshold``: a rollout passes when its reward reaches it (pass rates, "every rollout fails",
    hint levels). ``hints``: progressive hint sampling (None: off); its ``rollouts_per_level`` must be G (the
    step's rollouts are its level 0) and its ``success_threshold`` the stage's. ``checkpoint_every``: steps
    between checkpoints (and the last step). ``max_tokens_per_micro_batch``: cap on the tokens (prompt +
    completion) of one packed micro-batch of the update; a mini-batch then takes as many forward/backward
    passes as its responses need, accumulated to the same gradient, with the ViT run once per prompt (None:
    each rank's part of a mini-batch is one padded forward). ``rollout_server``: where rollouts are sampled
    (None: in process, by the policy itself; a `RolloutServerConfig`: over HTTP, weights synced after every
    update). ``max_reward_error_share``: a prompt whose
    reward failed for any of its responses is left out of its step's update (recorded in the step's hint
    file, counted in ``num_reward_errors``); more such prompts than this share of the step's stops the run
    (`keyeflow.quality.errors`). Not part of `config_hash`: it decides whether a run stops on failures (like a
    retry count), not what a step computes from its rewards.
    """

    prompts_per_step: int = 8
    group_size: int = 4
    max_new_tokens: int = 1024
    temperature: float = 1.0
    learning_rate: float = 1e-6
    max_steps: int = 100
    mini_batches_per_step: int = 1
    grad_clip: float = 1.0
    success_threshold: float = 0.5
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    hints: HintConfig | None = field(default_factory=HintConfig)
    seed: int = 0
    checkpoint_every: int = 10
    max_reward_error_share: float = DEFAULT_MAX_ERROR_SHARE
    activation_checkpointing: str = "off"  # as StageConfig's (not hashed); the policy trains in eval mode
    # None: left out of `to_dict`, so configs (and hashes) from before the field existed stay the same.
    max_tokens_per_micro_batch: int | None = None
    rollout_server: RolloutServerConfig | None = None  # None: left out of `to_dict` (hashes stay the same)
    # The policy sharded with FSDP2 (as StageConfig's); rollouts then come from an unsharded copy synced
    # from the shards before every step (`keyeflow.training.rl`). Left out of `to_dict` when False.
    fsdp: bool = False

    def __post_init__(self) -> None:
        _check_checkpointing("GSPOStageConfig", self.activation_checkpointing)
        check_flag("GSPOStageConfig", "fsdp", self.fsdp)
        if self.rollout_server is not None and not isinstance(self.rollout_server, RolloutServerConfig):
            raise invalid(
                "GSPOStageConfig", "rollout_server", self.rollout_server, "must be a RolloutServerConfig"
            )
        # Checked, not converted: the numbers are hashed as given (a stored hash must not change).
        for name, minimum in (
            ("prompts_per_step", 1),
            ("group_size", 2),
            ("max_new_tokens", 1),
            ("max_steps", 1),
            ("mini_batches_per_step", 1),
            ("seed", 0),
            ("checkpoint_every", 1),
        ):
            check_int("GSPOStageConfig", name, getattr(self, name), minimum=minimum)
        for name, strict in (
            ("temperature", True),
            ("learning_rate", True),
            ("grad_clip", False),
            ("success_threshold", True),
        ):
            check_number("GSPOStageConfig", name, getattr(self, name), minimum=0, strict=strict)
        if (
            not 0
            <= check_number("GSPOStageConfig", "max_reward_error_share", self.max_reward_error_share)
            < 1
        ):
            raise invalid(
                "GSPOStageConfig",
                "max_reward_error_share",
                self.max_reward_error_share,
                "must be in [0, 1) (a step whose every prompt failed has nothing to train on)",
            )
        if self.max_tokens_per_micro_batch is not None:
            check_int(
                "GSPOStageConfig", "max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, minimum=1
            )
        if self.mini_batches_per_step > self.prompts_per_step * self.group_size:
            raise invalid(
                "GSPOStageConfig",
                "mini_batches_per_step",
                self.mini_batches_per_step,
                f"more than the {self.prompts_per_step * self.group_size} responses of a step",
            )
        if self.success_threshold > 1.0:
            raise invalid(
                "GSPOStageConfig",
                "success_threshold",
                self.success_threshold,
                "must be <= 1 (rewards are in [0, 1])",
            )
        if not isinstance(self.gspo, GSPOConfig):
            raise invalid("GSPOStageConfig", "gspo", self.gspo, "must be a GSPOConfig")
        if self.hints is not None and not isinstance(self.hints, HintConfig):
            raise invalid("GSPOStageConfig", "hints", self.hints, "must be a HintConfig or None")
        if self.hints is not None:
            if self.hints.rollouts_per_level != self.group_size:
                raise ValueError(
                    f"GSPOStageConfig.hints.rollouts_per_level={self.hints.rollouts_per_level} must "
                    f"equal group_size={self.group_size}: the step's rollouts are hint level 0 and "
                    "the group trained at the level used"
                )
            if self.hints.success_threshold != self.success_threshold:
                raise ValueError(
                    f"GSPOStageConfig.hints.success_threshold={self.hints.success_threshold} differs "
                    f"from success_threshold={self.success_threshold}: one rule decides a success"
                )

    def to_dict(self) -> dict[str, Any]:
        out = _without_default_fsdp(_without_default_checkpointing(dataclasses.asdict(self)))
        if out["max_tokens_per_micro_batch"] is None:
            del out["max_tokens_per_micro_batch"]
        if out["rollout_server"] is None:
            del out["rollout_server"]
        elif out["rollout_server"]["url_env"] is None:
            del out["rollout_server"]["url_env"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GSPOStageConfig:
        """The config `to_dict` wrote (a launched job's spec)."""
        data = _known_fields(cls, data)
        for name, kind in (
            ("gspo", GSPOConfig),
            ("hints", HintConfig),
            ("rollout_server", RolloutServerConfig),
        ):
            if isinstance(data.get(name), dict):
                data[name] = kind(**data[name])
        return cls(**data)

    def config_hash(self) -> str:
        hashed = _unhashed_checkpointing(self.to_dict())
        hashed.pop("max_reward_error_share")  # stops a run, changes no step (class docstring)
        return config_hash(hashed, compact=True)
