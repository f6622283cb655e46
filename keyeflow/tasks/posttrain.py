"""Prefect tasks of post-training; each wraps one step of `keyeflow.steps.posttrain` (or the shared training
steps), reports what it did in the task log, and returns references (checkpoint paths, run ids, table
versions, small item lists), never weights or tensors."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from keyeflow import lineage
from keyeflow.datasets import tables
from keyeflow.datasets.conversations import add_conversations
from keyeflow.datasets.mixture import fixed_mixture
from keyeflow.datasets.tables import TableRef
from keyeflow.longcot.collect import referenced_media
from keyeflow.longcot.generate import GenerationConfig, media_configs
from keyeflow.longcot.rl_items import alignment_prompts, longcot_rl_items
from keyeflow.model.checkpoint import checkpoint_config
from keyeflow.model.merging import MergeConfig
from keyeflow.steps import posttrain, posttrain_job
from keyeflow.steps import stages as steps
from keyeflow.steps.stages import StageOutput
from keyeflow.tasks.common import PromotionBlocked, publish_memory_plan, report_step
from keyeflow.training import memory_plan, rl
from keyeflow.training.config import GSPOStageConfig, StageConfig
from keyeflow.training.heldout import PassRates, answer_pairs, paired_difference, rl_promotion
from keyeflow.training.launch import LaunchConfig
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
    report_step(output)
    return output


@task(**_NO_CACHE)
def check_memory(recipe: PosttrainRecipe, checkpoint: str, run_id: str) -> None:
    """Every post-training stage's memory per device for the policy `checkpoint` holds, and the rollout
    server every GSPO stage samples from is named (a URL variable the user must set: `resolved_url`);
    refuses the recipe before SFT when one cannot run."""
    for stage in (recipe.gspo, recipe.alignment):
        if stage.rollout_server is not None:
            stage.rollout_server.resolved_url()
    model = checkpoint_config(checkpoint)
    plans = memory_plan.plan_posttrain(recipe, model, memory_plan.local_cluster(recipe.launch))
    publish_memory_plan(plans, f"posttrain {recipe.name}", run_id)


@task(**_NO_CACHE)
def start_from(checkpoint: str, run_id: str) -> StageOutput:
    return _say(posttrain.start_from(checkpoint, parent_run_id=run_id))


@task(**_NO_CACHE)
def sft_data(
    start: StageOutput, samples: TableRef, recipe: PosttrainRecipe, items: list[dict], run_id: str
) -> dict:
    """Conversation samples of the SFT tasks, minus what the difficulty filter drops (reasons on the run),
    plus the reference responses of the recipe's share of RL items (`sft_rl_items`)."""
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
    kept = list(report.kept)
    answers = posttrain.rl_answer_conversations(items[: recipe.sft_rl_items])
    if answers:
        image_config, slowfast = media_configs(GenerationConfig())
        ids, bad = add_conversations(answers, "/", slowfast, image_config)
        for uri, why in bad.items():
            get_run_logger().warning("RL item answer %s not usable for SFT: %s", uri, why)
        kept += sorted(set(ids.values()) - set(kept))
        samples = tables.ref("train_samples")  # the version that holds the answers just added
        lineage.log_metrics(run_id, {"sft_rl_item_answers": len(ids)})
        get_run_logger().info("SFT also trains on the reference responses of %d RL items", len(ids))
    result = sft_mixture(samples, kept, name=f"sft-{recipe.name}", seed=recipe.sft.seed)
    return {"mixture": result.mixture, "mixture_id": result.mixture_id}


@task(**_NO_CACHE, tags=["training"])
def train_stage(
    stage: StageConfig,
    init: StageOutput,
    mixture: TableRef,
    mixture_id: str,
    run_id: str,
    data_from: list[StageOutput] = (),
    launch: LaunchConfig | None = None,
) -> StageOutput:
    return _say(
        steps.train_stage(
            stage,
            init=init,
            mixture=mixture,
            mixture_id=mixture_id,
            parent_run_id=run_id,
            data_from=list(data_from),
            launch=launch,
        )
    )


@task(**_NO_CACHE)
def question_media(questions: TableRef) -> dict[str, list[str]]:
    """The media the LongCoT questions show: post-training reads them pre-tokenised with the LongCoT
    generation defaults' configs, so they are ingested with those (a no-op for what is already in)."""
    ids = tables.dataset(questions.uri, version=questions.version).to_table(columns=["question_id"])
    return referenced_media(questions, ids.column("question_id").to_pylist())


@task(**_NO_CACHE)
def rl_items(questions: TableRef, mode: str) -> list[dict]:
    items = longcot_rl_items(questions, mode=mode)
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
    answers = answer_pairs(items, limit=settings.max_answer_pairs)
    pairs = teacher + sampled + answers
    lineage.log_dict(
        run_id,
        {"teacher": len(teacher), "sampled": len(sampled), "answers": len(answers), "no_pair": records},
        "preference_pairs.json",
    )
    get_run_logger().info(
        "preference pairs: %d from the LongCoT teacher's paths, %d sampled from the policy "
        "(%d items gave none), %d reference-vs-wrong answers of training items",
        len(teacher),
        len(sampled),
        len(records),
        len(answers),
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
def mpo(
    recipe: PosttrainRecipe, init: StageOutput, pairs: list[dict], run_id: str, inputs: list[TableRef] = ()
) -> StageOutput:
    return _say(
        posttrain.train_mpo(
            recipe.mpo, init=init, pairs=pairs, parent_run_id=run_id, launch=recipe.launch, inputs=inputs
        )
    )


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
    launch: LaunchConfig | None = None,
    reward: dict | None = None,
    inputs: list[TableRef] = (),
) -> StageOutput:
    """A general RL round, its ranks started by `launch` (None: in this process). `reward`: a reward spec
    (`posttrain_job.reward_from_spec`); None: the verifiable reward. `inputs`: the tables its items come
    from (the run's datasets)."""
    return _say(
        posttrain.train_gspo(
            config,
            name=name,
            init=init,
            items=items,
            reward=reward or {"name": "verifiable"},
            reward_spec={"kind": "verifiable"} if reward is None else dict(reward),
            extra_upstream=list(data_from),
            parent_run_id=run_id,
            launch=launch,
            inputs=inputs,
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
        max_new_tokens=recipe.rejection_max_new_tokens,
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
    """RL items for the next round: pass rate strictly between 0 and 1 under the policy. Fewer than a step's
    prompts left is an error (the round would have nothing to learn from)."""
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
    if len(result.kept) < config.prompts_per_step:
        # Training on all items instead would hide that the round has (almost) nothing to learn from: groups
        # that all pass or all fail carry no advantage.
        raise ValueError(
            f"pass-rate filter before GSPO round {round_number}: {len(result.kept)} of {len(items)} items "
            f"have a pass rate strictly between 0 and 1, fewer than the {config.prompts_per_step} prompts a "
            f"step takes; add RL items, or sample more per item (group_size={config.group_size})"
        )
    get_run_logger().info(
        "pass-rate filter before round %d: %d of %d items kept", round_number, len(result.kept), len(items)
    )
    return [{k: v for k, v in i.items() if k != "pass_rate"} for i in result.kept]


@task(**_NO_CACHE, tags=["training"])
def alignment_rl(
    recipe: PosttrainRecipe, init: StageOutput, rm: StageOutput, judge_model: StageOutput, run_id: str
) -> StageOutput:
    settings = recipe.alignment_rewards
    items = alignment_prompts(settings.num_prompts)
    # Alignment prompts have no reference answer: the judge and the reward model compare each response with
    # what the policy answered before alignment RL (greedy), so they reward improvement over the start.
    baseline = posttrain.baseline_responses(init, items, recipe.alignment.max_new_tokens)
    # The judges are rebuilt from their checkpoints where the stage runs (launched ranks or this process).
    reward = posttrain_job.alignment_reward_spec(
        settings, recipe.reward_model, judge=judge_model.checkpoint, reward_model=rm.checkpoint,
        baseline=baseline,
    )  # fmt: skip
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
            reward=reward,
            reward_spec=spec,
            extra_upstream=[rm, judge_model],
            parent_run_id=run_id,
            launch=recipe.gspo_launch,
        )
    )


@task(**_NO_CACHE)
def record_final(run_id: str, output: StageOutput, registered_model: str) -> None:
    """The flow's run names the checkpoint it ends with (`keyeflow lineage <flow run id>` starts there), and
    that checkpoint becomes the ``champion`` of the recipe's registered model: the flow reaches this point
    only when every gate before it passed (a refused RL round stops it)."""
    lineage.set_tags(
        run_id, {lineage.CHECKPOINT_TAG: output.checkpoint, "keyeflow.final_run_id": output.run_id}
    )
    version = lineage.register_checkpoint(registered_model, output.run_id)
    lineage.record_promotion(
        registered_model,
        version,
        True,
        f"{output.name}: the final checkpoint of post-training; every gate before it passed"
        f"\ncheckpoint {output.checkpoint}",
    )


# ---------------------------------------------------------------------------------------------- held-out


@task(**_NO_CACHE)
def heldout_set(paths: list[str], source_root: str, recipe: PosttrainRecipe, run_id: str) -> list[dict]:
    """The held-out items (asked in the recipe's RL mode): every learning signal below is measured on them."""
    items = posttrain.heldout_items(paths, source_root, recipe.rl_mode)
    lineage.log_params(run_id, {"heldout_items": len(items), "heldout_paths": json.dumps(paths)})
    get_run_logger().info("held-out set: %d items from %s", len(items), paths)
    return items


def items_media(items: list[dict]) -> dict[str, list[str]]:
    """The image and video files items show (absolute paths), for ingestion."""
    media: dict[str, set[str]] = {"image": set(), "video": set()}
    for item in items:
        content = item["messages"][-1]["content"]
        for part in content if isinstance(content, list) else ():
            if part.get("type") in media:
                media[part["type"]].add(part[part["type"]])
    return {kind: sorted(paths) for kind, paths in media.items()}


@task(**_NO_CACHE)
def sft_signal(start: StageOutput, sft: StageOutput, heldout: list[dict], run_id: str) -> dict:
    """SFT's learning signal: the held-out items' reference-response loss before → after."""
    before, after = posttrain.sft_heldout_loss(start, heldout), posttrain.sft_heldout_loss(sft, heldout)
    lineage.log_metrics(run_id, {"sft_heldout_loss_before": before, "sft_heldout_loss_after": after})
    get_run_logger().info("SFT held-out loss %.3f → %.3f", before, after)
    return {"before": before, "after": after}


@task(**_NO_CACHE)
def preference_signals(
    sft: StageOutput,
    mpo: StageOutput,
    rm: StageOutput,
    heldout: list[dict],
    recipe: PosttrainRecipe,
    run_id: str,
) -> dict:
    """MPO's held-out preference accuracy before → after, and the reward model's held-out accuracy, on the
    held-out answer pairs (the reference answer over each listed wrong answer)."""
    pairs = answer_pairs(heldout)
    before, after = posttrain.pair_accuracy(sft, pairs), posttrain.pair_accuracy(mpo, pairs)
    judged = posttrain.reward_model_accuracy(rm, recipe.reward_model, pairs)
    metrics = {
        "mpo_heldout_preference_accuracy_before": before.mean,
        "mpo_heldout_preference_accuracy_after": after.mean,
        "reward_model_heldout_failed": len(judged.failed),
        "heldout_pairs": len(pairs),
    }
    if judged.estimate is not None:
        metrics["reward_model_heldout_accuracy"] = judged.estimate.mean
    lineage.log_metrics(run_id, metrics)
    if judged.failed:
        get_run_logger().warning(
            "the reward model gave no usable verdict on %d of %d held-out pairs; first: %s",
            len(judged.failed), len(pairs), next(iter(judged.failed.values())),
        )  # fmt: skip
    get_run_logger().info(
        "held-out pairs %d: MPO preference accuracy %s → %s; reward model %s (%d judgements failed)",
        len(pairs), before, after, judged.estimate, len(judged.failed),
    )  # fmt: skip
    return {
        "pairs": len(pairs),
        "mpo_before": before.to_dict(),
        "mpo_after": after.to_dict(),
        "reward_model": judged.estimate.to_dict() if judged.estimate is not None else None,
        "reward_model_failed": len(judged.failed),
    }


@task(**_NO_CACHE)
def rl_pass_rates(
    policy: StageOutput, heldout: list[dict], recipe: PosttrainRecipe, run_id: str, rl_step: int
) -> dict:
    """Held-out pass rate of a policy, logged as `heldout_pass_rate` at `rl_step` (GSPO steps done so far: 0
    before RL) with its interval."""
    rates = posttrain.pass_rates(policy, heldout, recipe.heldout, recipe.gspo.success_threshold)
    e = rates.estimate
    lineage.log_metrics(
        run_id,
        {"heldout_pass_rate": e.mean, "heldout_pass_rate_low": e.low, "heldout_pass_rate_high": e.high},
        step=rl_step,
    )
    get_run_logger().info("held-out pass rate of %s after %d RL steps: %s", policy.name, rl_step, e)
    return rates.to_dict()


@task(**_NO_CACHE)
def rl_gate(before: dict, after: dict, recipe: PosttrainRecipe, candidate: StageOutput) -> dict:
    """The RL promotion gate (`heldout.rl_promotion`): the flow stops at a round that made the held-out pass
    rate significantly worse."""
    decision = rl_promotion(PassRates.from_dict(before), PassRates.from_dict(after), recipe.heldout)
    create_markdown_artifact(
        f"# RL promotion gate: {candidate.name}\n\n**{'promoted' if decision.promoted else 'refused'}**: "
        f"{decision.reason}.\n\nCheckpoint: `{candidate.checkpoint}`",
        key=f"rl-gate-{candidate.name}".lower()[:60],
    )
    verdict = "passed" if decision.promoted else "FAILED"
    version = lineage.register_checkpoint(recipe.name, candidate.run_id)
    lineage.record_promotion(
        recipe.name,
        version,
        decision.promoted,
        f"{candidate.name}: RL promotion gate {verdict}: {decision.reason}\n"
        f"checkpoint {candidate.checkpoint}",
    )
    if not decision.promoted:
        raise PromotionBlocked(
            f"{candidate.name} ({candidate.checkpoint}) is not promoted: {decision.reason}"
        )
    return {"reason": decision.reason, "difference": decision.difference.to_dict()}


@task(**_NO_CACHE)
def rl_gain(before: dict, after: dict, run_id: str) -> dict:
    """What all GSPO rounds together changed: the paired held-out pass-rate difference, last round − before
    RL, with its 95% interval (logged as `heldout_pass_rate_gain` and `…_half_width`)."""
    gain = paired_difference(PassRates.from_dict(before), PassRates.from_dict(after))
    lineage.log_metrics(
        run_id, {"heldout_pass_rate_gain": gain.mean, "heldout_pass_rate_gain_half_width": gain.half_width}
    )
    return gain.to_dict()


@task(**_NO_CACHE)
def hint_levels(gspo_output: StageOutput) -> dict[str, int]:
    """How many items each GSPO step of a round trained at each hint level (from `rl_hint_levels`), summed
    over the round's steps: level 0 = solved without a hint."""
    return posttrain.hint_level_counts(gspo_output.run_id)


@task(**_NO_CACHE)
def learning_report(run_id: str, signals: dict) -> dict:
    """Every stage's learning signal on one Prefect artifact and the posttrain MLflow run, with the chart of
    the held-out pass rate over RL steps (`heldout_pass_rate.png`)."""
    import matplotlib.pyplot as plt

    from keyeflow.training.learning_figures import pass_rate_chart

    rounds = signals.get("rl") or []
    if rounds:
        training, offset = [], 0
        for r in rounds[1:]:
            training += [(offset + s, v) for s, v in lineage.metric_history(r["run_id"], "pass_rate")]
            offset = r["step"]
        points = [{"step": r["step"], **r["pass_rate"]} for r in rounds]
        figure = pass_rate_chart(points, training)
        lineage.log_figure(run_id, figure, "heldout_pass_rate.png")
        plt.close(figure)
    lines = ["# What post-training learned (held-out items no stage trained on)", ""]
    lines += [f"- {line}" for line in signal_lines(signals)]
    if rounds:
        lines.append(f"\nChart: `heldout_pass_rate.png` on MLflow run `{run_id}`.")
    create_markdown_artifact("\n".join(lines), key="posttrain-learning-signals")
    lineage.log_dict(run_id, signals, "learning_signals.json")
    return signals


def _interval(e: dict) -> str:
    return f"{e['mean']:.3f} ± {e['half_width']:.3f}"


def signal_lines(signals: dict) -> list[str]:
    """The learning signals as sentences, one per stage (what `keyeflow run` prints)."""
    out = []
    if "sft" in signals:
        s = signals["sft"]
        out.append(f"SFT: held-out response loss {s['before']:.3f} → {s['after']:.3f}")
    if "preference" in signals:
        p = signals["preference"]
        out.append(
            f"MPO: held-out preference accuracy {_interval(p['mpo_before'])} → {_interval(p['mpo_after'])} "
            f"({p['pairs']} pairs)"
        )
        failed = (
            f"; no usable verdict on {p['reward_model_failed']} pairs" if p["reward_model_failed"] else ""
        )
        accuracy = _interval(p["reward_model"]) if p["reward_model"] else "none (no pair decided)"
        out.append(f"reward model: held-out accuracy {accuracy}{failed}")
    for r in signals.get("rl") or []:
        rate = f"{_interval(r['pass_rate'])} (95%, {r['pass_rate']['num_items']} items)"
        if r["round"] == 0:
            out.append(f"GSPO: held-out pass rate before RL {rate}")
            continue
        extra = []
        if r.get("rejection_replaced") is not None:
            extra.append(f"rejection sampling replaced {r['rejection_replaced']} cold-start responses")
        if r.get("pass_rate_filter_kept") is not None:
            extra.append(f"pass-rate filter kept {r['pass_rate_filter_kept']} items")
        levels = r.get("hint_levels") or {}
        hinted = sum(n for k, n in levels.items() if k not in ("0", "unsolved"))
        extra.append(
            f"hint levels {', '.join(f'{k}: {n}' for k, n in levels.items()) or 'none'} "
            f"({hinted} solved only with a hint)"
        )
        out.append(
            f"GSPO round {r['round']}: held-out pass rate {rate} after {r['step']} steps; " + "; ".join(extra)
        )
    if "rl_gain" in signals:
        g = signals["rl_gain"]
        verdict = "more than" if g["mean"] > g["half_width"] else "not more than"
        out.append(
            f"GSPO overall: held-out pass rate {g['mean']:+.3f} ± {g['half_width']:.3f} (paired, 95%, "
            f"{g['num_items']} items): {verdict} the interval's half-width"
        )
    return out
