"""Prefect tasks of pre-training; each wraps one step of `keyeflow.steps.stages`.

No Prefect result caching here: a step's cache is its checkpoint directory (`done.json`, keyed on its inputs'
versions and config hash), which outlives any Prefect database and is what the trainer resumes from.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from keyeflow import lineage
from keyeflow.datasets import mixture
from keyeflow.datasets.tables import TableRef
from keyeflow.model.merging import MergeConfig
from keyeflow.steps import stages as steps
from keyeflow.steps.stages import StageOutput
from keyeflow.tasks.common import PromotionBlocked, publish_memory_plan, report_step
from keyeflow.training import memory_plan
from keyeflow.training.config import StageConfig
from keyeflow.training.evaluate import generate_mcq_set
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.recipes import EvalConfig, PretrainRecipe


def _say(output: StageOutput) -> None:
    report_step(output)


@task(cache_policy=NO_CACHE)
def check_memory(recipe: PretrainRecipe, run_id: str) -> None:
    """Every stage's memory per device on the recipe's launch layout here; refuses the recipe before stage 1
    when one cannot run."""
    cluster = memory_plan.local_cluster(recipe.launch)
    publish_memory_plan(memory_plan.plan_pretrain(recipe, cluster), f"pretrain {recipe.name}", run_id)


@task(cache_policy=NO_CACHE)
def prepare_init(recipe: PretrainRecipe, run_id: str) -> StageOutput:
    output = steps.prepare_init(
        recipe.model_config(), init=recipe.init, seed=recipe.stages[1].seed, parent_run_id=run_id
    )
    _say(output)
    return output


@task(cache_policy=NO_CACHE, tags=["training"])
def train_stage(
    stage: StageConfig,
    init: StageOutput,
    mixture_ref: TableRef,
    mixture_id: str,
    run_id: str,
    launch: LaunchConfig | None = None,
) -> StageOutput:
    output = steps.train_stage(
        stage, init=init, mixture=mixture_ref, mixture_id=mixture_id, parent_run_id=run_id, launch=launch
    )
    _say(output)
    return output


@task(cache_policy=NO_CACHE)
def fuse(inputs: list[StageOutput], merge: MergeConfig, base: StageOutput | None, run_id: str) -> StageOutput:
    output = steps.fuse(inputs, merge, base=base, parent_run_id=run_id)
    _say(output)
    return output


@task(cache_policy=NO_CACHE)
def heldout_set(samples: TableRef, quarantine: TableRef, config: EvalConfig) -> dict[str, list[str]]:
    return mixture.heldout_sample_ids(
        samples, quarantine, config.holdout_per_mille, config.max_tokens, config.heldout_per_modality
    )


@task(cache_policy=NO_CACHE)
def mcq_set(video_samples: TableRef, config: EvalConfig) -> list[dict]:
    rows = steps.mcq_source_rows(video_samples)
    return generate_mcq_set(rows, min(config.num_mcq, 5 * len(rows)), seed=config.seed)


@task(cache_policy=NO_CACHE)
def evaluate(
    output: StageOutput,
    config: EvalConfig,
    heldout: dict[str, list[str]],
    samples: TableRef,
    mcq: list[dict],
    parent_metrics: dict | None,
    launch: LaunchConfig | None = None,
    registered_model: str | None = None,
) -> dict:
    """Evaluate (on the ranks `launch` starts, like the stage's training; None: in this process), report in
    Prefect and in the Model Registry (`registered_model`: the recipe's name), and stop the flow when the
    promotion gate fails."""
    result = steps.evaluate_stage(
        output,
        config=config,
        heldout=heldout,
        samples=samples,
        mcq_records=mcq,
        parent_metrics=parent_metrics,
        launch=launch,
        registered_model=registered_model,
    )
    losses = result.metrics["heldout_loss"]
    lines = [
        f"# {output.name}: promotion gate {'passed' if result.passed else 'FAILED'}",
        "",
        "| metric | value | parent |",
        "|---|---|---|",
    ]
    for modality, value in losses.items():
        parent = (parent_metrics or {}).get("heldout_loss", {}).get(modality)
        lines.append(
            f"| held-out loss, {modality} | {value:.4f} | {'' if parent is None else f'{parent:.4f}'} |"
        )
    parent_acc = (parent_metrics or {}).get("mcq_accuracy")
    lines.append(
        f"| MCQ accuracy | {result.metrics['mcq_accuracy']:.3f} | "
        f"{'' if parent_acc is None else f'{parent_acc:.3f}'} |"
    )
    lines += [
        "",
        *[f"- {r}" for r in result.reasons],
        "",
        f"Checkpoint `{output.checkpoint}`, MLflow run `{output.run_id}`.",
    ]
    create_markdown_artifact("\n".join(lines), key=f"eval-{output.name}".lower()[:60])
    if not result.passed:
        raise PromotionBlocked(
            f"{output.name} ({output.checkpoint}) is not promoted: " + "; ".join(result.reasons)
        )
    return result.metrics


@task(cache_policy=NO_CACHE)
def record_final(run_id: str, output: StageOutput) -> None:
    """The flow's run names the checkpoint it ends with, so `keyeflow lineage <flow run id>` starts there."""
    lineage.set_tags(
        run_id, {lineage.CHECKPOINT_TAG: output.checkpoint, "keyeflow.final_run_id": output.run_id}
    )
