"""The `posttrain` flow, in SPEC §4's order: SFT (difficulty filter, then a low-LR annealing phase) → reward
model → MPO → LongCoT SFT with expert merging → GSPO rounds (round ≥ 2: rejection sampling by the RL model and
the reward model, a retrained cold start, the pass-rate filter) → alignment RL. Wiring only; every step
returns a checkpoint path and its MLflow run, chained into the lineage of the checkpoint it started from, and
skips itself when its inputs and config are unchanged."""

from __future__ import annotations

from prefect import flow

from keyeflow.datasets.tables import TableRef, table_uri
from keyeflow.flows.data import ingest_images
from keyeflow.flows.video import video_pipeline
from keyeflow.longcot.generate import GenerationConfig
from keyeflow.tasks import posttrain as t
from keyeflow.tasks.common import current_ref, lineage_run
from keyeflow.training.posttrain_recipe import posttrain_recipe


@flow(name="posttrain")
def posttrain(
    checkpoint: str,
    recipe: str = "tiny",
    samples_version: int | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Post-train from `checkpoint` (pre-training's fused checkpoint) with the named recipe, on train_samples
    (pinned `samples_version`, or the latest) and the LongCoT tables."""
    r = posttrain_recipe(recipe)
    params = {"checkpoint": checkpoint, "recipe": r.to_dict(), "recipe_hash": r.config_hash()}
    with lineage_run("posttrain", params, parent_run_id) as run_id:
        samples = (
            TableRef("train_samples", table_uri("train_samples"), samples_version)
            if samples_version
            else current_ref("train_samples")
        )
        longcot, paths, questions = (
            current_ref("longcot"),
            current_ref("longcot_paths"),
            current_ref("longcot_questions"),
        )
        media, gen = t.question_media(questions), GenerationConfig()
        if media["image"]:
            ingest_images(media["image"], max_tokens=gen.max_image_tokens, parent_run_id=run_id)
        if media["video"]:
            video_pipeline(
                media["video"],
                preset=gen.video_preset,
                overrides={"total_token_budget": gen.max_video_tokens},
                parent_run_id=run_id,
            )
        start = t.start_from(checkpoint, run_id)
        stages = {"start": start}

        sft_mix = t.sft_data(start, samples, r, run_id)
        sft = t.train_stage(r.sft, start, sft_mix["mixture"], sft_mix["mixture_id"], run_id)
        sft = stages["sft"] = t.train_stage(
            r.sft_anneal, sft, sft_mix["mixture"], sft_mix["mixture_id"], run_id
        )

        items = t.rl_items(questions)
        pairs = t.preference_pairs(sft, paths, questions, items, r, run_id)
        rm = stages["reward_model"] = t.reward_model(r, sft, pairs, run_id)
        mpo = stages["mpo"] = t.mpo(r, sft, pairs, run_id)

        cold_mix = t.longcot_data(longcot, f"longcot-{r.name}", None)
        cold = stages["longcot"] = t.train_stage(
            r.longcot, mpo, cold_mix["mixture"], cold_mix["mixture_id"], run_id
        )
        expert_mix = t.longcot_data(longcot, f"expert-{r.expert_domain}", r.expert_domain)
        expert = t.train_stage(r.expert, cold, expert_mix["mixture"], expert_mix["mixture_id"], run_id)
        policy = stages["expert_merge"] = t.merge_expert(expert, cold, r.expert_weight, run_id)

        t.check_rl_inputs(policy, items)
        for n in range(1, r.rounds + 1):
            init, data_from = policy, []
            if n > 1:
                rows = t.rejection_sampling(policy, rm, longcot, r, n, run_id)
                init = t.train_stage(
                    r.cold_start_stage(n),
                    mpo,
                    rows["mixture"],
                    rows["mixture_id"],
                    run_id,
                    data_from=[policy, rm],
                )
                items = t.pass_rate_filter(policy, items, r.gspo, n)
                data_from = [policy]
            policy = stages[f"gspo_round_{n}"] = t.gspo(
                r.gspo, f"posttrain-5-gspo-round-{n}", init, items, run_id, data_from
            )

        final = stages["alignment"] = t.alignment_rl(r, policy, rm, sft, run_id)
        t.record_final(run_id, final)
        return {
            "run_id": run_id,
            "checkpoint": final.checkpoint,
            "final_run_id": final.run_id,
            "stages": {k: v.to_dict() for k, v in stages.items()},
        }
