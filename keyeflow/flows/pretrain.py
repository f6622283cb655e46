"""The `pretrain` flow: stage mixtures → stage 1 → 2 → 3 (one run per annealing variant) → 4 (fusion), with
an evaluation and promotion gate after each. Wiring only; each step returns a checkpoint path and its MLflow
run id, and skips itself when its inputs and config are unchanged (keyeflow.steps.stages)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from keyeflow.datasets.tables import TableRef, table_uri
from keyeflow.flows.data import build_mixture
from keyeflow.steps.stages import mean_metrics
from keyeflow.tasks import pretrain as t
from keyeflow.tasks.common import current_ref, lineage_run, recipe_params, record_recipe
from keyeflow.training.recipe_source import load_pretrain_recipe


@flow(name="pretrain")
def pretrain(
    recipe: str = "tiny",
    init: str | None = None,
    samples_version: int | None = None,
    parent_run_id: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> dict:
    """Pre-train with `recipe` (a built-in name, a YAML/TOML recipe file or `module:function`) changed by
    `overrides` (`["stage2.learning_rate=1e-5"]` or `{"stage2.learning_rate": 1e-5}`), from `init` (a
    checkpoint path; None = fresh weights) on train_samples (pinned `samples_version`, or the latest). A bad
    recipe or override stops the flow before anything runs."""
    r = load_pretrain_recipe(recipe, overrides, init)
    with lineage_run("pretrain", recipe_params(r, recipe, overrides), parent_run_id) as run_id:
        record_recipe(run_id, r, recipe, overrides)
        t.check_memory(r, run_id)
        samples = (
            TableRef("train_samples", table_uri("train_samples"), samples_version)
            if samples_version
            else current_ref("train_samples")
        )
        version = samples.version
        mixtures = {
            stage: build_mixture(stage, r.mixture_overrides(stage), version, parent_run_id=run_id)
            for stage in (1, 2)
        }
        annealing = {
            v.name: build_mixture(3, r.mixture_overrides(3, v), version, parent_run_id=run_id)
            for v in r.variants
        }
        heldout = t.heldout_set(samples, current_ref("quarantine"), r.evaluation)
        mcq = t.mcq_set(current_ref("video_samples"), r.evaluation)

        def evaluate(output, parent_metrics):
            return t.evaluate(output, r.evaluation, heldout, samples, mcq, parent_metrics, r.launch, r.name)

        init_out = t.prepare_init(r, run_id)
        metrics = evaluate(init_out, None)
        previous = init_out
        stages = {"init": init_out.to_dict()}
        for stage in (1, 2):
            m = mixtures[stage]
            previous = t.train_stage(
                r.stages[stage], previous, m["mixture"], m["mixture_id"], run_id, r.launch
            )
            metrics = evaluate(previous, metrics)
            stages[previous.name] = previous.to_dict()
        stage2, stage2_metrics = previous, metrics

        # Variants one after another: in one process they would share torch's global RNG and threads. Through
        # a multi-process launcher they can run side by side.
        annealed, annealed_metrics = [], []
        for variant in r.variants:
            m = annealing[variant.name]
            output = t.train_stage(
                r.variant_stage(variant), stage2, m["mixture"], m["mixture_id"], run_id, r.launch
            )
            annealed_metrics.append(evaluate(output, stage2_metrics))
            annealed.append(output)
            stages[output.name] = output.to_dict()

        fused = t.fuse(annealed, r.fusion(), stage2 if r.fusion_method != "average" else None, run_id)
        evaluate(fused, mean_metrics(annealed_metrics))
        stages[fused.name] = fused.to_dict()
        t.record_final(run_id, fused)
        return {
            "run_id": run_id,
            "checkpoint": fused.checkpoint,
            "final_run_id": fused.run_id,
            "stages": stages,
            "mixtures": {str(k): v["mixture_id"] for k, v in mixtures.items()}
            | {f"3-{k}": v["mixture_id"] for k, v in annealing.items()},
        }
