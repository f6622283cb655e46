"""The `posttrain` flow, in SPEC §4's order: SFT (difficulty filter, then a low-LR annealing phase) → reward
model → MPO → LongCoT SFT with expert merging → GSPO rounds (round ≥ 2: rejection sampling by the RL model and
the reward model, a retrained cold start, the pass-rate filter) → alignment RL. Wiring only; every step
returns a checkpoint path and its MLflow run, chained into the lineage of the checkpoint it started from, and
skips itself when its inputs and config are unchanged."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from keyeflow.config import get_settings
from keyeflow.datasets.tables import TableRef, table_uri
from keyeflow.flows.data import ingest_images
from keyeflow.flows.video import video_pipeline
from keyeflow.longcot.generate import GenerationConfig
from keyeflow.tasks import posttrain as t
from keyeflow.tasks.common import current_ref, lineage_run, recipe_params, record_recipe
from keyeflow.training.recipe_source import load_posttrain_recipe


@flow(name="posttrain")
def posttrain(
    checkpoint: str,
    recipe: str = "tiny",
    samples_version: int | None = None,
    parent_run_id: str | None = None,
    heldout: list[str] | None = None,
    source_root: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> dict:
    """Post-train from `checkpoint` (pre-training's fused checkpoint) with the named recipe, on train_samples
    (pinned `samples_version`, or the latest) and the LongCoT tables. `heldout`: question files (JSONL in the
    LongCoT conversation format, media inside `source_root`, default the samples folder) no stage trains on:
    every stage's learning signal is measured on them and a GSPO round that makes their pass rate
    significantly worse stops the flow. Without them nothing is measured or gated (a warning says so).
    `recipe`: a built-in name, a YAML/TOML recipe file or `module:function`, changed by `overrides`
    (`["sft.learning_rate=1e-5"]` or a mapping); a bad one stops the flow before anything runs."""
    r = load_posttrain_recipe(recipe, overrides)
    params = {"checkpoint": checkpoint, **recipe_params(r, recipe, overrides)}
    if heldout:
        params["heldout"] = list(heldout)
    with lineage_run("posttrain", params, parent_run_id) as run_id:
        record_recipe(run_id, r, recipe, overrides)
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
        held = (
            t.heldout_set(list(heldout), source_root or str(get_settings().samples_dir), r, run_id)
            if heldout
            else None
        )
        if held is None:
            get_run_logger().warning(
                "no held-out questions: no learning signal is measured and no RL gate runs"
            )
        media, gen = t.question_media(questions), GenerationConfig()
        for kind, paths_ in t.items_media(held or []).items():
            media[kind] = sorted(set(media[kind]) | set(paths_))
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
        t.check_memory(r, start.checkpoint, run_id)
        stages, signals = {"start": start}, {}

        items = t.rl_items(questions, r.rl_mode)
        sft_mix = t.sft_data(start, samples, r, items, run_id)
        sft = t.train_stage(r.sft, start, sft_mix["mixture"], sft_mix["mixture_id"], run_id, launch=r.launch)
        sft = stages["sft"] = t.train_stage(
            r.sft_anneal, sft, sft_mix["mixture"], sft_mix["mixture_id"], run_id, launch=r.launch
        )
        if held:
            signals["sft"] = t.sft_signal(start, sft, held, run_id)

        pairs = t.preference_pairs(sft, paths, questions, items, r, run_id)
        rm = stages["reward_model"] = t.reward_model(r, sft, pairs, run_id)
        mpo = stages["mpo"] = t.mpo(r, sft, pairs, run_id, inputs=[paths, questions])
        if held:
            signals["preference"] = t.preference_signals(sft, mpo, rm, held, r, run_id)

        cold_mix = t.longcot_data(longcot, f"longcot-{r.name}", None)
        cold = stages["longcot"] = t.train_stage(
            r.longcot, mpo, cold_mix["mixture"], cold_mix["mixture_id"], run_id, launch=r.launch
        )
        expert_mix = t.longcot_data(longcot, f"expert-{r.expert_domain}", r.expert_domain)
        expert = t.train_stage(
            r.expert, cold, expert_mix["mixture"], expert_mix["mixture_id"], run_id, launch=r.launch
        )
        policy = stages["expert_merge"] = t.merge_expert(expert, cold, r.expert_weight, run_id)

        t.check_rl_inputs(policy, items)
        rl_step, accepted = 0, None
        if held:
            accepted = baseline = t.rl_pass_rates(policy, held, r, run_id, rl_step)
            signals["rl"] = [{"round": 0, "step": 0, "pass_rate": accepted["estimate"]}]
        for n in range(1, r.rounds + 1):
            init, data_from, round_signal = policy, [], {"round": n}
            if n > 1:
                rows = t.rejection_sampling(policy, rm, longcot, r, n, run_id)
                round_signal["rejection_replaced"] = rows["num_replaced"]
                init = t.train_stage(
                    r.cold_start_stage(n),
                    mpo,
                    rows["mixture"],
                    rows["mixture_id"],
                    run_id,
                    data_from=[policy, rm],
                    launch=r.launch,
                )
                items = t.pass_rate_filter(policy, items, r.gspo, n)
                round_signal["pass_rate_filter_kept"] = len(items)
                data_from = [policy]
            policy = stages[f"gspo_round_{n}"] = t.gspo(
                r.gspo, f"posttrain-5-gspo-round-{n}", init, items, run_id, data_from, launch=r.gspo_launch,
                inputs=[questions],
            )  # fmt: skip
            rl_step += r.gspo.max_steps
            if held:
                rates = t.rl_pass_rates(policy, held, r, run_id, rl_step)
                round_signal |= {
                    "step": rl_step,
                    "run_id": policy.run_id,
                    "pass_rate": rates["estimate"],
                    "gate": t.rl_gate(accepted, rates, r, policy)["reason"],
                    "hint_levels": t.hint_levels(policy),
                }
                signals["rl"].append(round_signal)
                accepted = rates

        if held:
            signals["rl_gain"] = t.rl_gain(baseline, accepted, run_id)
        final = stages["alignment"] = t.alignment_rl(r, policy, rm, sft, run_id)
        t.record_final(run_id, final, r.name)
        if signals:
            t.learning_report(run_id, signals)
        return {
            "run_id": run_id,
            "checkpoint": final.checkpoint,
            "final_run_id": final.run_id,
            "stages": {k: v.to_dict() for k, v in stages.items()},
            "signals": signals,
        }
