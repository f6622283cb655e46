"""Prefect tasks of post-training; each wraps one step of `keyeflow.steps.posttrain` (or the shared training
steps), reports what it did in the task log, and returns references (checkpoint paths, run ids, table
versions, small item lists), never weights or tensors."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from keyeflow import lineage
from keyeflow.datasets import tables
from keyeflow.datasets.mixture import fixed_mixture
from keyeflow.datasets.tables import TableRef
from keyeflow.longcot.collect import referenced_media
from keyeflow.longcot.generate import GenerationConfig, media_configs
from keyeflow.longcot.rl_items import alignment_prompts, longcot_rl_items
from keyeflow.model.merging import MergeConfig
from keyeflow.steps import posttrain
from keyeflow.steps import stages as steps
from keyeflow.steps.stages import StageOutput
from keyeflow.training import rl
from keyeflow.training.config import GSPOStageConfig, StageConfig
from keyeflow.training.posttrain_data import (
    POSTTRAIN_STAGE,
    conversation_samples,
    difficulty_filter,
    longcot_mixture,
    sft_mixture,
)
from keyeflow.training.posttrain_recipe import PosttrainRecipe

_NO_CACHE = {"cache_policy": NO_CACHE}


def _say(output: StageOutput) -> StageOutput:
    verb = "trained" if output.trained else "unchanged, skipped"
    get_run_logger().info("%s: %s → %s (MLflow run %s)", output.name, verb, output.checkpoint, output.run_id)
    return output


@task(**_NO_CACHE)
def start_from(checkpoint: str, run_id: str) -> StageOutput:
    return _say(posttrain.start_from(checkpoint, parent_run_id=run_id))


@task(**_NO_CACHE)
def sft_data(start: StageOutput, samples: TableRef, recipe: PosttrainRecipe, run_id: str) -> dict:
    """Conversation samples of the SFT tasks, minus what the difficulty filter drops (reasons on the run)."""
    rows = conversation_samples(samples, recipe.sft_tasks, recipe.sft.max_length)[: recipe.sft_max_items]
    if not rows:
        raise ValueError(
            f"train_samples@v{samples.version} has no conversation samples of tasks "
            f"{list(recipe.sft_tasks)} within {recipe.sft.max_length} tokens"
        )
    report = difficulty_filter(posttrain.local_generator(start.checkpoint), rows, recipe.difficulty)
    lineage.log_dict(run_id, report.to_dict(), "sft_difficulty_filter.json")
    lineage.log_metrics(
        run_id,
        {
            "sft_candidates": len(rows),
            "sft_kept": len(report.kept),
            "sft_dropped_too_easy": len(report.dropped),
        },
    )
    get_run_logger().info(
        "difficulty filter: %d candidates, %d kept (%d not checkable), %d dropped as too easy",
        len(rows),
        len(report.kept),
        len(report.unchecked),
        len(report.dropped),
    )
    result = sft_mixture(samples, report.kept, name=f"sft-{recipe.name}", seed=recipe.sft.seed)
    return {"mixture": result.mixture, "mixture_id": result.mixture_id}


@task(**_NO_CACHE, tags=["training"])
def train_stage(
    stage: StageConfig,
    init: StageOutput,
    mixture: TableRef,
    mixture_id: str,
    run_id: str,
    data_from: list[StageOutput] = (),
) -> StageOutput:
    return _say(
        steps.train_stage(
            stage,
            init=init,
            mixture=mixture,
            mixture_id=mixture_id,
            parent_run_id=run_id,
            data_from=list(data_from),
        )
    )


@task(**_NO_CACHE)
def question_media(questions: TableRef) -> dict[str, list[str]]:
    """The media the LongCoT questions show: post-training reads them pre-tokenised with the LongCoT
    generation defaults' configs, so they are ingested with those (a no-op for what is already in)."""
    ids = tables.dataset(questions.uri, version=questions.version).to_table(columns=["question_id"])
    return referenced_media(questions, ids.column("question_id").to_pylist())


@task(**_NO_CACHE)
def rl_items(questions: TableRef) -> list[dict]:
    items = longcot_rl_items(questions)
    if not items:
        raise ValueError(
            f"{questions.uri}@v{questions.version} has no questions with a reference answer to RL on"
        )
    return items


@task(**_NO_CACHE)
def preference_pairs(
    policy: StageOutput,
    paths: TableRef,
    questions: TableRef,
    items: list[dict],
    recipe: PosttrainRecipe,
    run_id: str,
) -> list[dict]:
    settings = recipe.preference
    teacher = posttrain.teacher_pairs(paths, questions, settings.max_teacher_pairs)
    sampled, records = posttrain.policy_pairs(policy, items, settings)
    pairs = teacher + sampled
    lineage.log_dict(
        run_id,
        {"teacher": len(teacher), "sampled": len(sampled), "no_pair": records},
        "preference_pairs.json",
    )
    get_run_logger().info(
        "preference pairs: %d from the LongCoT teacher's paths, %d sampled from the policy "
        "(%d items gave none)",
        len(teacher),
        len(sampled),
        len(records),
    )
    if not pairs:
        raise ValueError(
            "no preference pairs: the LongCoT paths hold no kept/wrong pair and the policy's samples "
            "never differ enough; run the LongCoT flow first"
        )
    return pairs


@task(**_NO_CACHE, tags=["training"])
def reward_model(recipe: PosttrainRecipe, init: StageOutput, pairs: list[dict], run_id: str) -> StageOutput:
    return _say(
        posttrain.train_reward_model(
            recipe.reward_model, recipe.reward_model_stage, init=init, pairs=pairs, parent_run_id=run_id
        )
    )


@task(**_NO_CACHE, tags=["training"])
def mpo(recipe: PosttrainRecipe, init: StageOutput, pairs: list[dict], run_id: str) -> StageOutput:
    return _say(posttrain.train_mpo(recipe.mpo, init=init, pairs=pairs, parent_run_id=run_id))


@task(**_NO_CACHE)
def longcot_data(longcot: TableRef, name: str, domain: str | None) -> dict:
    image_config, slowfast = media_configs(GenerationConfig())
    # The general LongCoT mix follows the scores' repeats; a domain expert trains on all of its domain.
    result, bad = longcot_mixture(
        longcot,
        name=name,
        slowfast=slowfast,
        image_config=image_config,
        domain=domain,
        min_repeats=1 if domain else 0,
    )
    for uri, why in bad.items():
        get_run_logger().warning("LongCoT sample %s not usable: %s", uri, why)
    return {"mixture": result.mixture, "mixture_id": result.mixture_id}


@task(**_NO_CACHE)
def merge_expert(expert: StageOutput, cold_start: StageOutput, weight: float, run_id: str) -> StageOutput:
    """Expert merging: cold start + weight·(expert − cold start), the fusion code's task arithmetic."""
    merge = MergeConfig(method="task_arithmetic", weights=(weight,))
    return _say(
        steps.fuse([expert], merge, name="posttrain-4-expert-merge", base=cold_start, parent_run_id=run_id)
    )


@task(**_NO_CACHE)
def check_rl_inputs(policy: StageOutput, items: list[dict]) -> str:
    """Before RL: rollout and trainer must build identical multimodal inputs (first item with media, else the
    first item)."""
    item = next((i for i in items if isinstance(i["messages"][-1]["content"], list)), items[0])
    generator = posttrain.local_generator(policy.checkpoint)
    rl.check_rollout_training_inputs(
        generator, item["messages"], str(item.get("reference") or "ok"), media_lookup=generator.media_lookup
    )
    get_run_logger().info("rollout and training inputs agree on item %s", item["id"])
    return item["id"]


@task(**_NO_CACHE, tags=["training"])
def gspo(
    config: GSPOStageConfig,
    name: str,
    init: StageOutput,
    items: list[dict],
    run_id: str,
    data_from: list[StageOutput] = (),
) -> StageOutput:
    return _say(
        posttrain.train_gspo(
            config,
            name=name,
            init=init,
            items=items,
            reward_fn=posttrain.verifiable_reward,
            reward_spec={"kind": "verifiable"},
            extra_upstream=list(data_from),
            parent_run_id=run_id,
        )
    )


@task(**_NO_CACHE)
def rejection_sampling(
    policy: StageOutput,
    rm: StageOutput,
    longcot: TableRef,
    recipe: PosttrainRecipe,
    round_number: int,
    run_id: str,
) -> dict:
    """The RL model re-samples the cold-start set; reward-model-preferred samples replace references; the new
    set becomes train_samples rows and a mixture with the rows' repeats."""
    rows = posttrain.cold_start_rows(longcot)
    judge = posttrain.judge_for(
        rm.checkpoint, recipe.reward_model, recipe.alignment_rewards.judge_max_new_tokens
    )
    result = posttrain.rejection_sampling(
        policy,
        rows,
        judge,
        recipe.rejection_samples,
        max_new_tokens=recipe.gspo.max_new_tokens,
        seed=round_number,
    )
    create_table_artifact(
        [
            {"row": r.row_id, "replaced": r.replaced, "verified": r.num_verified, "reason": r.reason}
            for r in result.records
        ],
        key=f"rejection-sampling-round-{round_number}",
    )
    lineage.log_metrics(run_id, {f"rejection_round_{round_number}_replaced": result.num_replaced})
    from keyeflow.datasets.conversations import add_conversations

    image_config, slowfast = media_configs(GenerationConfig())
    items = [
        {
            "uri": f"rejection-{round_number}#{r['id']}",
            "source": f"longcot-{r['domain']}",
            "task": "longcot",
            "messages": r["messages"],
        }
        for r in result.rows
    ]
    ids, _ = add_conversations(items, "/", slowfast, image_config)
    repeats = {
        ids[i["uri"]]: r["repeats"]
        for i, r in zip(items, result.rows)
        if i["uri"] in ids and r["repeats"] >= 1
    }
    mixture = fixed_mixture(
        tables.ref("train_samples"), repeats, name=f"cold-start-round-{round_number}", stage=POSTTRAIN_STAGE
    )
    return {"mixture": mixture.mixture, "mixture_id": mixture.mixture_id, "num_replaced": result.num_replaced}


@task(**_NO_CACHE)
def pass_rate_filter(
    policy: StageOutput, items: list[dict], config: GSPOStageConfig, round_number: int
) -> list[dict]:
    """RL items for the next round: pass rate strictly between 0 and 1 under the policy. When fewer than a
    step's prompts remain, all items stay: groups whose rollouts all pass or all fail have zero advantage and
    change nothing, so the fallback costs compute, not correctness."""
    result = rl.pass_rate_filter(
        posttrain.local_generator(policy.checkpoint),
        items,
        config.group_size,
        posttrain.verifiable_reward,
        max_new_tokens=config.max_new_tokens,
        seed=round_number,
        success_threshold=config.success_threshold,
    )
    create_markdown_artifact(
        f"# Pass-rate filter before GSPO round {round_number}\n\n"
        f"{len(result.kept)} of {len(items)} items have a "
        "pass rate strictly between 0 and 1.\n\n"
        + "\n".join(f"- {r.item_id}: {r.pass_rate} ({r.reason})" for r in result.records),
        key=f"pass-rate-filter-round-{round_number}",
    )
    if len(result.kept) >= config.prompts_per_step:
        return [{k: v for k, v in i.items() if k != "pass_rate"} for i in result.kept]
    get_run_logger().warning(
        "pass-rate filter kept %d items (< %d prompts per step): round %d trains on all %d items",
        len(result.kept),
        config.prompts_per_step,
        round_number,
        len(items),
    )
    return items


@task(**_NO_CACHE, tags=["training"])
def alignment_rl(
    recipe: PosttrainRecipe, init: StageOutput, rm: StageOutput, judge_model: StageOutput, run_id: str
) -> StageOutput:
    settings = recipe.alignment_rewards
    items = alignment_prompts(settings.num_prompts)
    # Alignment prompts have no reference answer: the judge and the reward model compare each response with
    # what the policy answered before alignment RL (greedy), so they reward improvement over the start.
    baseline = posttrain.baseline_responses(init, items, recipe.alignment.max_new_tokens)
    judge = posttrain.judge_for(
        judge_model.checkpoint, recipe.reward_model, settings.judge_max_new_tokens, baseline
    )
    reward_model = posttrain.judge_for(
        rm.checkpoint, recipe.reward_model, settings.judge_max_new_tokens, baseline
    )
    reward_fn = posttrain.alignment_reward(settings, judge=judge, reward_model=reward_model)
    spec = {
        "kind": "alignment",
        "weights": settings.weights,
        "judge": judge_model.key,
        "reward_model": rm.key,
    }
    return _say(
        posttrain.train_gspo(
            recipe.alignment,
            name="posttrain-6-alignment-rl",
            init=init,
            items=items,
            reward_fn=reward_fn,
            reward_spec=spec,
            extra_upstream=[rm, judge_model],
            parent_run_id=run_id,
        )
    )


@task(**_NO_CACHE)
def record_final(run_id: str, output: StageOutput) -> None:
    lineage.set_tags(
        run_id, {lineage.CHECKPOINT_TAG: output.checkpoint, "keyeflow.final_run_id": output.run_id}
    )
