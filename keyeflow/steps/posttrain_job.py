"""MPO and GSPO as jobs: in this process, or their ranks started by torchrun, DeepSpeed or Slurm
(`keyeflow.training.launch.LaunchConfig`), each rank running this module's `main` on a JSON spec, as the
SFT-style stages run `keyeflow.steps.train_job`.

`launch_posttrain` writes the stage's pairs (MPO) or items (GSPO) and the spec into the run's `out_dir`,
starts the launcher (`train_job.run_launcher`: output streamed into the log, a failure raised as
`LaunchFailed` with its stderr's tail) and, when it exits, returns the checkpoint `out_dir/latest` names:
the one the stage's loop registered, as in process. A launch killed midway resumes from `out_dir/latest`
when started again, like any run of the loops.

A GSPO reward reaches the ranks by name, never pickled (`reward_from_spec`): {"name": "verifiable"} is general
RL's rule reward; {"name": "alignment", …} alignment RL's rule + judge + reward model, the two judges rebuilt
from their checkpoints and the baseline answers carried in the spec; {"name": "function", "function":
"module:attribute"} a reward function every rank imports (a reward of one's own; the tests' rewards). The
in-process path builds its reward from the same spec, so both paths score alike.

One sharded run per process: a second FSDP2 run in the process of a finished one was seen to hang
(tests/integration/test_sharded_posttrain.py runs each in processes of its own), so a stage with
`fsdp=True` is launched, a process per run; in the flow's process it is refused before it starts.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keyeflow import lineage
from keyeflow.datasets.tables import table_uri
from keyeflow.longcot.generate import GenerationConfig, StoredMediaLookup, media_configs
from keyeflow.longcot.rl_items import reward_item
from keyeflow.model.generation import LocalGenerator
from keyeflow.quality.reward_model import RewardModelConfig, RewardModelJudge
from keyeflow.quality.rewards import Reward, RewardCombiner, RewardConfig
from keyeflow.steps.train_job import LaunchFailed, check_hostfile, launch_job
from keyeflow.training.config import GSPOStageConfig, MPOStageConfig
from keyeflow.training.engine import resume_point
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.posttrain_recipe import AlignmentSettings
from keyeflow.training.preference import train_mpo
from keyeflow.training.rl import train_gspo

log = logging.getLogger(__name__)

MODULE = "keyeflow.steps.posttrain_job"
DATA = "launch-data.json"  # the pairs or items, beside the spec
KINDS = ("mpo", "gspo")

RewardFn = Callable[[Mapping[str, Any], str], Any]


_MEDIA_LOOKUPS: dict[str, StoredMediaLookup] = {}


def media_lookup(root: str | None = None) -> StoredMediaLookup:
    """The media lookup of a tables root, one per root in this process: every stage's generator asks for the
    same held-out and RL pictures, and the lookup keeps what it read (`StoredMediaLookup`)."""
    key = table_uri("image_samples", root)
    if key not in _MEDIA_LOOKUPS:
        _MEDIA_LOOKUPS[key] = StoredMediaLookup(*media_configs(GenerationConfig()), root=root)
    return _MEDIA_LOOKUPS[key]


def local_generator(checkpoint: str) -> LocalGenerator:
    return LocalGenerator(checkpoint, media_lookup=media_lookup())


# ---------------------------------------------------------------------------------------------- rewards


def verifiable_reward(item: Mapping[str, Any], response: str) -> Reward:
    """General RL's reward: the rule rewards (answer check + output format) of the item."""
    return RewardCombiner()(reward_item(item), response)


def judge_for(
    checkpoint: str,
    config: RewardModelConfig,
    max_new_tokens: int | None = None,
    baseline: Mapping[str, str] | None = None,
) -> RewardModelJudge:
    """A reward-model judge around a checkpoint in this process. A served judge (vLLM or
    `python -m keyeflow.model.serving`) goes through `RewardModelJudge(OpenAICompatibleGenerator(...))`: the
    same interface. `baseline`: prompt text → a competing response, for items without a reference."""
    lookup = None
    if baseline is not None:

        def lookup(item) -> str | None:
            return baseline.get(json.dumps(item.prompt, sort_keys=True))

    return RewardModelJudge(
        local_generator(checkpoint), config, max_new_tokens=max_new_tokens, baseline=lookup
    )


def alignment_reward(
    settings: AlignmentSettings, *, judge: RewardModelJudge | None, reward_model: RewardModelJudge | None
):
    """Alignment RL's reward: rule-based, generative judge and reward model combined by the recipe's weights
    (a component without a model gets weight 0)."""
    weights = {
        k: w
        for k, w in settings.weights.items()
        if w > 0 and (k == "rule" or {"judge": judge, "reward_model": reward_model}[k] is not None)
    }
    combiner = RewardCombiner(
        RewardConfig(weights=weights, reward_model_only_without_reference=False),
        judge=judge.reward if judge and "judge" in weights else None,
        reward_model=reward_model.reward if reward_model and "reward_model" in weights else None,
    )
    return lambda item, response: combiner(reward_item(item), response)


def alignment_reward_spec(
    settings: AlignmentSettings,
    config: RewardModelConfig,
    *,
    judge: str,
    reward_model: str,
    baseline: Mapping[str, str],
) -> dict[str, Any]:
    """The spec `reward_from_spec` rebuilds alignment RL's reward from: the judge's and the reward model's
    checkpoints, the recipe's settings and the baseline answers they compare with."""
    return {
        "name": "alignment",
        "settings": {
            "num_prompts": settings.num_prompts,
            "weights": dict(settings.weights),
            "judge_max_new_tokens": settings.judge_max_new_tokens,
        },
        "reward_model_config": {
            **{k: getattr(config, k) for k in config.__dataclass_fields__},
            "train_modes": list(config.train_modes),
            "dimension_weights": dict(config.dimension_weights),
        },
        "judge": judge,
        "reward_model": reward_model,
        "baseline": dict(baseline),
    }


def reward_from_spec(spec: Mapping[str, Any]) -> RewardFn:
    """The GSPO reward a spec names (module docstring)."""
    name = spec.get("name")
    if name == "verifiable":
        return verifiable_reward
    if name == "alignment":
        settings = AlignmentSettings(**spec["settings"])
        config = RewardModelConfig(**spec["reward_model_config"])
        tokens, baseline = settings.judge_max_new_tokens, spec["baseline"]
        return alignment_reward(
            settings,
            judge=judge_for(spec["judge"], config, tokens, baseline),
            reward_model=judge_for(spec["reward_model"], config, tokens, baseline),
        )
    if name == "function":
        module, sep, attribute = str(spec.get("function", "")).partition(":")
        if not (module and sep and attribute):
            raise ValueError(f"reward spec {dict(spec)}: 'function' must be 'module:attribute'")
        return getattr(importlib.import_module(module), attribute)
    raise ValueError(f"no GSPO reward named {name!r}; known: verifiable, alignment, function")


# ---------------------------------------------------------------------------------------------- the job


def launch_posttrain(
    launch: LaunchConfig | None,
    kind: str,
    config: MPOStageConfig | GSPOStageConfig,
    *,
    init: str | Path,
    data: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    reward: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """Train an MPO stage on pairs (`data`) or a GSPO stage on items (`data`, `reward`: a spec for
    `reward_from_spec`) from `init` into `out_dir`, in this process (`launch` None or "inprocess") or on
    the ranks `launch` starts; the last checkpoint. `run_id`: the MLflow run every rank reports to."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {list(KINDS)}")
    if (kind == "gspo") != (reward is not None):
        raise ValueError("a GSPO stage needs its reward spec, an MPO stage none")
    out_dir = Path(out_dir)
    stage = "GSPO" if kind == "gspo" else "MPO"
    if launch is None or launch.launcher == "inprocess":
        if config.fsdp:
            raise ValueError(
                f"{stage} with fsdp=True is trained by launched ranks (a recipe's `launch`), never in the "
                "flow's process: a second sharded run in one process hangs (keyeflow.steps.posttrain_job)"
            )
        return run(kind, config, init=init, data=data, reward=reward, out_dir=out_dir, run_id=run_id)
    check_hostfile(launch)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DATA).write_text(json.dumps(list(data)) + "\n")
    launch_job(
        launch,
        out_dir,
        {
            "kind": kind,
            "config": config.to_dict(),
            "init": str(init),
            "data": str((out_dir / DATA).resolve()),
            "reward": dict(reward) if reward is not None else None,
            "out_dir": str(out_dir.resolve()),
            "run_id": run_id,
        },
        module=MODULE,
        name=f"{stage} in {out_dir}",
    )
    checkpoint, state = resume_point(out_dir)
    if checkpoint is None or state["step"] < config.max_steps:
        raise LaunchFailed(
            f"the launched {stage} exited cleanly but registered no checkpoint of step {config.max_steps} "
            f"in {out_dir} (last: {state['step'] if state else 'none'})"
        )
    return checkpoint


def run(
    kind: str,
    config: MPOStageConfig | GSPOStageConfig,
    *,
    init: str | Path,
    data: Sequence[Mapping[str, Any]],
    reward: Mapping[str, Any] | None,
    out_dir: Path,
    run_id: str | None,
) -> Path:
    """The stage's loop in this process (one rank of a launch, or the only one); its last checkpoint."""
    sink = lineage.RunSink(run_id) if run_id else None
    if kind == "mpo":
        assert isinstance(config, MPOStageConfig)
        result = train_mpo(
            config, init=init, pairs=data, out_dir=out_dir, sink=sink, media_lookup=media_lookup()
        )
        return result.checkpoint_dir
    assert isinstance(config, GSPOStageConfig) and reward is not None
    result = train_gspo(
        config,
        init=init,
        items=data,
        reward_fn=reward_from_spec(reward),
        out_dir=out_dir,
        sink=sink,
        media_lookup=media_lookup(),
    )
    return result.checkpoint_dir


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node N -m keyeflow.steps.posttrain_job SPEC.json` (what `launch_posttrain`
    starts). SPEC.json: {"kind": "mpo" | "gspo", "config": {the stage config's to_dict}, "init": checkpoint
    dir, "data": the JSON file of pairs or items, "reward": null or a reward spec, "out_dir": …, "run_id":
    null or the MLflow run}. Rank 0 prints the last checkpoint as one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {MODULE} SPEC.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(args[0]).read_text())
    kind = spec["kind"]
    config_class = GSPOStageConfig if kind == "gspo" else MPOStageConfig
    checkpoint = run(
        kind,
        config_class.from_dict(spec["config"]),
        init=spec["init"],
        data=json.loads(Path(spec["data"]).read_text()),
        reward=spec.get("reward"),
        out_dir=Path(spec["out_dir"]),
        run_id=spec.get("run_id"),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint_dir": str(checkpoint)}), flush=True)


if __name__ == "__main__":
    main()
