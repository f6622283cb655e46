"""Post-training steps, each a `steps.cached_step` (skipped when done, resumed after a kill, one MLflow run
chained to the runs of the checkpoints it started from): SFT data and filter, preference pairs, the reward
model, MPO, GSPO rounds with rejection sampling, alignment RL. The flow `keyeflow.flows.posttrain` wires them
in SPEC §4's order; `keyeflow.training.posttrain_recipe` holds every setting.

MPO and GSPO train in this process, or, with a launch config (the recipe's `launch`, `rl_launch` for GSPO),
on ranks started by torchrun, DeepSpeed or Slurm (`keyeflow.steps.posttrain_job`), as the SFT-style stages
do; a sharded (`fsdp=True`) stage is always launched, a process per run.

Media: RL and preference prompts name images/videos by path (LongCoT questions); they resolve to the patches
their ingestion stored (`StoredMediaLookup`, by content hash and the LongCoT generation defaults' media
configs), so rollouts and training read the same pixels as every other stage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from keyeflow import lineage
from keyeflow.datasets import tables
from keyeflow.datasets.mixture import RL_ANSWER_TASK
from keyeflow.datasets.tables import TableRef
from keyeflow.longcot.generate import GenerationConfig, media_configs, user_content
from keyeflow.longcot.rl_items import question_file_items
from keyeflow.model.generation import Generator
from keyeflow.quality.errors import DEFAULT_MAX_ERROR_SHARE, ScoringError
from keyeflow.quality.reward_model import (
    ComparisonRequest,
    RewardModelConfig,
    RewardModelJudge,
    build_reward_model_data,
)
from keyeflow.quality.rewards import answer_reward
from keyeflow.steps.posttrain_job import (
    judge_for,
    launch_posttrain,
    local_generator,
    verifiable_reward,
)
from keyeflow.steps.stages import (
    KEY_TAG,
    StageOutput,
    cached_step,
    log_loss_curve,
    path_fingerprint,
    step_key,
)
from keyeflow.training import preference, rl
from keyeflow.training.config import GSPOStageConfig, MPOStageConfig
from keyeflow.training.heldout import (
    Estimate,
    HeldoutConfig,
    JudgeAccuracy,
    PassRates,
    heldout_pass_rate,
    judge_accuracy,
    preference_accuracy,
    reference_response,
    response_loss,
)
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.posttrain_recipe import PreferenceSettings
from keyeflow.training.reward_model_trainer import train_reward_model as train_rm

LATEST_PRETRAIN = "latest-pretrain"


def start_from(checkpoint: str, *, parent_run_id: str | None = None) -> StageOutput:
    """The checkpoint post-training starts from, as a step: the run that made it when keyeflow did (so the
    chain continues into pre-training's lineage), else a step recording the path. "latest-pretrain": the
    checkpoint the newest finished `pretrain` flow run ended with."""
    if checkpoint == LATEST_PRETRAIN:
        checkpoint = lineage.latest_checkpoint("pretrain")
    path = Path(checkpoint).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"start checkpoint {path} is not a directory")
    try:
        run_id = lineage.resolve_run(str(path))
    except LookupError:
        return cached_step(
            "posttrain-0-start",
            step_key("start", path_fingerprint(path)),
            lambda out, run: str(path),
            params={"checkpoint": str(path)},
            parent_run_id=parent_run_id,
        )
    tags = lineage.run_tags(run_id)
    key = tags.get(KEY_TAG) or path_fingerprint(path)
    return StageOutput(tags.get("mlflow.runName", "start"), str(path), run_id, key, False)


# ---------------------------------------------------------------------------------------------- preference


def teacher_pairs(paths: TableRef, questions: TableRef, limit: int) -> list[dict[str, Any]]:
    """Preference pairs from the LongCoT teacher's own paths: per question, a kept path (chosen) over a path
    whose answer was wrong (rejected). The paths were sampled from the teacher and checked against the
    reference, which is how MPO pairs are made (SPEC §4); these come for free from the LongCoT flow."""
    rows = (
        tables.dataset(paths.uri, version=paths.version)
        .to_table(columns=["path_id", "question_id", "text", "response", "status", "answer_ok"])
        .to_pylist()
    )
    chosen: dict[str, dict] = {}
    rejected: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["path_id"]):
        if row["status"] == "kept" and row["response"]:
            chosen.setdefault(row["question_id"], row)
        elif row["answer_ok"] is False and row["text"]:
            rejected.setdefault(row["question_id"], row)
    wanted = sorted(set(chosen) & set(rejected))[:limit]
    qs = (
        {
            q["question_id"]: q
            for q in tables.dataset(questions.uri, version=questions.version)
            .to_table(filter=pc.field("question_id").isin(wanted) if wanted else None)
            .to_pylist()
        }
        if wanted
        else {}
    )
    return [
        {
            "pair_id": f"teacher/{q}",
            "item_id": q,
            "messages": [{"role": "user", "content": user_content(qs[q], " /think")}],
            "chosen": chosen[q]["response"],
            "rejected": rejected[q]["text"],
            "reference": qs[q]["reference"],
            "chosen_score": 1.0,
            "rejected_score": 0.0,
            "reason": "teacher path kept vs wrong answer",
        }
        for q in wanted
        if q in qs
    ]


def policy_pairs(
    policy: StageOutput, items: Sequence[Mapping[str, Any]], settings: PreferenceSettings, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Pairs from `num_responses` samples of the policy per verifiable item, scored against the reference."""
    use = [
        {k: v for k, v in i.items() if k in ("id", "messages", "reference", "task")}
        for i in items[: settings.max_policy_items]
    ]
    return preference.build_preference_pairs(
        local_generator(policy.checkpoint),
        use,
        n=settings.num_responses,
        scorer=preference.make_scorer(),
        min_margin=settings.min_margin,
        seed=seed,
        max_new_tokens=settings.max_new_tokens,
    )


def train_reward_model(
    config: RewardModelConfig,
    stage,
    *,
    init: StageOutput,
    pairs: list[dict],
    parent_run_id: str | None = None,
    tables_ref: dict[str, TableRef] | None = None,
) -> StageOutput:
    """The think/no_think judge, fine-tuned on judgements built from the pairs (order-swapped,
    length-debiased)."""
    conversations, report = build_reward_model_data(pairs, config, modes=config.train_modes)

    def body(out_dir: Path, run_id: str) -> str:
        lineage.log_dict(
            run_id, report.__dict__ if hasattr(report, "__dict__") else report, "reward_data.json"
        )
        for ref in (tables_ref or {}).values():
            lineage.log_input(run_id, ref, context="training")
        # The media configs every post-training step reads with (what the flow ingested the questions'
        # pictures and clips with); with the trainer's defaults (a 20,480-token picture) every pair on a task
        # item's picture was "not ingested" and left out, and the judge trained without its task pairs.
        image_config, slowfast = media_configs(GenerationConfig())
        result = train_rm(
            conversations,
            stage,
            init=init.checkpoint,
            out_dir=out_dir,
            sink=lineage.RunSink(run_id),
            slowfast=slowfast,
            image_config=image_config,
        )
        lineage.log_params(run_id, {"mixture_id": result.mixture_id})
        lineage.log_input(run_id, result.mixture, context="training")
        lineage.log_metrics(run_id, {"unusable_judgements": len(result.unusable)})
        if result.unusable:
            lineage.log_dict(run_id, dict(result.unusable), "reward_data_unusable.json")
        log_loss_curve(run_id, out_dir, stage.name)
        return str(result.checkpoint_dir / "model")

    key = step_key(
        "reward-model",
        stage.config_hash(),
        repr(config),
        init.key,
        [(p["pair_id"], p["chosen"], p["rejected"]) for p in pairs],
    )
    return cached_step(
        stage.name,
        key,
        body,
        upstream=[init],
        parent_run_id=parent_run_id,
        params={"reward_model": repr(config), "num_pairs": len(pairs)},
    )


def train_mpo(
    config: MPOStageConfig,
    *,
    init: StageOutput,
    pairs: list[dict],
    parent_run_id: str | None = None,
    launch: LaunchConfig | None = None,
    inputs: Sequence[TableRef] = (),
) -> StageOutput:
    """The MPO stage, in this process or on the ranks `launch` starts (`posttrain_job`; how it is launched
    is not part of the key, as for the SFT-style stages). `inputs`: the tables the pairs were built from,
    logged as the run's training datasets (the pairs themselves are in the key)."""

    def body(out_dir: Path, run_id: str) -> str:
        for ref in inputs:
            lineage.log_input(run_id, ref, context="training")
        checkpoint = launch_posttrain(
            launch, "mpo", config, init=init.checkpoint, data=pairs, out_dir=out_dir, run_id=run_id
        )
        log_loss_curve(run_id, out_dir, "posttrain-3-mpo")
        return str(checkpoint / "model")

    key = step_key(
        "mpo", config.config_hash(), init.key, [(p["pair_id"], p["chosen"], p["rejected"]) for p in pairs]
    )
    return cached_step(
        "posttrain-3-mpo",
        key,
        body,
        upstream=[init],
        parent_run_id=parent_run_id,
        params={"mpo": config.to_dict(), "num_pairs": len(pairs)},
    )


# ---------------------------------------------------------------------------------------------- RL


def baseline_responses(
    policy: StageOutput, items: Sequence[Mapping[str, Any]], max_new_tokens: int
) -> dict[str, str]:
    """The policy's greedy answer to each item, keyed by its prompt (what `judge_for(baseline=…)` reads)."""
    generator = local_generator(policy.checkpoint)
    answers = generator.generate(
        [list(i["messages"]) for i in items],
        n=1,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        seed=0,
        logprobs=False,
    )
    return {
        json.dumps(i["messages"][-1]["content"], sort_keys=True): a[0].text for i, a in zip(items, answers)
    }


def train_gspo(
    config: GSPOStageConfig,
    *,
    name: str,
    init: StageOutput,
    items: list[dict],
    reward: Mapping[str, Any],
    reward_spec: dict,
    extra_upstream: Sequence[StageOutput] = (),
    parent_run_id: str | None = None,
    launch: LaunchConfig | None = None,
    inputs: Sequence[TableRef] = (),
) -> StageOutput:
    """One GSPO stage (general RL round or alignment RL), in this process or on the ranks `launch` starts
    (`posttrain_job`). `reward`: the reward's spec, rebuilt by name where the stage runs
    (`posttrain_job.reward_from_spec`); `reward_spec`: what the reward is made of, by the keys of the steps
    that made its models (part of the key: a different judge or weight is a different stage). `inputs`: the
    tables the items were drawn from, logged as the run's training datasets (the items are in the key);
    the `rl_hint_levels` rows the run adds are logged as its output."""

    def body(out_dir: Path, run_id: str) -> str:
        for ref in inputs:
            lineage.log_input(run_id, ref, context="training")
        checkpoint = launch_posttrain(
            launch, "gspo", config, init=init.checkpoint, data=items, reward=reward, out_dir=out_dir,
            run_id=run_id,
        )  # fmt: skip
        log_loss_curve(run_id, out_dir, name, metric="reward_mean")
        hints = sorted(out_dir.glob("hints/step-*.json"))
        if hints:
            lineage.log_file(run_id, hints[-1], "hints")
        if record_hint_levels(out_dir, run_id, name):
            lineage.log_output(run_id, tables.ref("rl_hint_levels"))
        return str(checkpoint / "model")

    key = step_key(
        "gspo",
        config.config_hash(),
        init.key,
        reward_spec,
        # An item's hints shape what it trains on (a failed group trains under its hinted prompt): other
        # hints are another stage. Items without hints keep the key they had.
        [[i["id"], i["hints"]] if i.get("hints") else i["id"] for i in items],
        [u.key for u in extra_upstream],
    )
    return cached_step(
        name,
        key,
        body,
        upstream=[init, *extra_upstream],
        parent_run_id=parent_run_id,
        params={"gspo": config.to_dict(), "num_items": len(items), "reward": reward_spec},
    )


def hint_level_rows(out_dir: Path, run_id: str, stage: str) -> list[dict[str, Any]]:
    """The ``rl_hint_levels`` rows of a GSPO run's per-step hint files (``out_dir/hints/step-*.json``)."""
    rows = []
    for path in sorted(Path(out_dir).glob("hints/step-*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        step = int(record["step"])
        for item_id, entry in sorted(record["items"].items()):
            rates = json.dumps(entry["pass_rates"], sort_keys=True) if "pass_rates" in entry else None
            rows.append({
                "record_id": f"{run_id}/{step}/{item_id}", "run_id": run_id, "stage": stage, "step": step,
                "item_id": item_id, "level": entry.get("level"), "hint": entry.get("hint"),
                "pass_rates": rates,
                "note": entry.get("note") or entry.get("reward_error"), "created_at": tables.now(),
            })  # fmt: skip
    return rows


def record_hint_levels(out_dir: Path, run_id: str, stage: str) -> int:
    """Write the hint level every step trained each item on into ``rl_hint_levels`` (queryable with
    ``keyeflow sql``; a rerun adds nothing it already holds); returns the number of rows."""
    rows = hint_level_rows(out_dir, run_id, stage)
    tables.upsert("rl_hint_levels", rows)
    return len(rows)


def cold_start_rows(longcot: TableRef) -> list[dict[str, Any]]:
    """The LongCoT cold-start set as rows for rejection sampling: the conversation ending with the reference
    response, and the reference answer its samples are verified against."""
    rows = (
        tables.dataset(longcot.uri, version=longcot.version)
        .to_table(columns=["sample_id", "domain", "source", "messages", "reference", "repeats"])
        .to_pylist()
    )
    return [
        {
            "id": r["sample_id"],
            "domain": r["domain"],
            "source": r["source"],
            "repeats": int(r["repeats"]),
            "messages": json.loads(r["messages"]),
            "reference": r["reference"],
        }
        for r in rows
    ]


def rejection_sampling(
    policy: StageOutput,
    rows: list[dict],
    judge: RewardModelJudge,
    k: int,
    *,
    max_new_tokens: int,
    seed: int = 0,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
) -> rl.RejectionRound:
    """The RL model re-samples the cold-start set; a verified sample the reward model prefers replaces the
    reference response. A judgement that fails is not "not preferred": the row keeps its reference, recorded
    as failed, and more failed rows than `max_error_share` of the set raise ErrorShareExceeded."""

    def verify(row: Mapping[str, Any], response: str) -> bool:
        return answer_reward(response, row["reference"]).value >= 1.0

    def prefer(challenges: Sequence[tuple[Mapping[str, Any], str, str]]) -> list[bool | Exception]:
        # The judge is told which question the two responses answer (the row's user turn) and its reference;
        # a position's challenges of every row are decoded together (`judge.compare` asks one generate call).
        comparisons = judge.compare(
            [
                ComparisonRequest(row["messages"][-2]["content"], candidate, held, reference=row["reference"])
                for row, candidate, held in challenges
            ]
        )
        return [
            ScoringError(f"row {row['id']!r}: {c.reason}") if c.value is None else c.value > 0.5
            for (row, _, _), c in zip(challenges, comparisons)
        ]

    generator: Generator = local_generator(policy.checkpoint)
    # Every row's k samples in one generate call (decoded together), the judge once per challenge position.
    return rl.rejection_sampling_round(
        generator,
        rows,
        verify,
        None,
        k,
        max_new_tokens=max_new_tokens,
        seed=seed,
        max_error_share=max_error_share,
        rows_prefer_fn=prefer,
    )


# ---------------------------------------------------------------------------------------------- held-out


HELDOUT_STAGE = "heldout"  # the quarantine stage of held-out question lines that could not be read


def heldout_items(paths: Sequence[str], source_root: str, mode: str) -> list[dict[str, Any]]:
    """The held-out RL items of question files (no stage trains on them), asked in `mode`. A line that cannot
    be read is quarantined with its reason and the others are used."""
    items, bad = question_file_items(paths, source_root, mode)
    tables.upsert("quarantine", [tables.quarantine_row(uri, why, HELDOUT_STAGE) for uri, why in bad])
    if not items:
        raise ValueError(f"no usable held-out question in {list(paths)} ({len(bad)} lines quarantined)")
    return items


def rl_answer_conversations(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each RL item's reference response in its thinking mode, as a conversation for `add_conversations`."""
    return [
        {
            "uri": f"rl-answer#{i['id']}",
            "source": "rl-answers",
            "task": RL_ANSWER_TASK,  # kept out of pre-training mixtures, as every post-training row
            "messages": [
                *i["messages"],
                {"role": "assistant", "content": reference_response(i, i["reference"])},
            ],
        }
        for i in items
        if i.get("reference")
    ]


def pass_rates(
    output: StageOutput, items: Sequence[Mapping[str, Any]], config: HeldoutConfig, success_threshold: float
) -> PassRates:
    """The held-out pass rates of a checkpoint, scored by general RL's reward."""
    return heldout_pass_rate(
        local_generator(output.checkpoint),
        items,
        verifiable_reward,
        config,
        success_threshold=success_threshold,
    )


def sft_heldout_loss(output: StageOutput, items: Sequence[Mapping[str, Any]]) -> float:
    """Mean token loss of the held-out items' reference responses under a checkpoint."""
    g = local_generator(output.checkpoint)
    return response_loss(g.model, g.tokenizer, g.media_lookup, items)


def pair_accuracy(output: StageOutput, pairs: Sequence[Mapping[str, Any]]) -> Estimate:
    """Held-out preference accuracy of a policy checkpoint (mean log-probability per token)."""
    g = local_generator(output.checkpoint)
    return preference_accuracy(g.model, g.tokenizer, g.media_lookup, pairs)


def reward_model_accuracy(
    rm: StageOutput, config: RewardModelConfig, pairs: Sequence[Mapping[str, Any]]
) -> JudgeAccuracy:
    return judge_accuracy(judge_for(rm.checkpoint, config), pairs)


def hint_level_counts(run_id: str) -> dict[str, int]:
    """Over a GSPO run's steps, how many item trainings used each hint level (``rl_hint_levels``): "0" solved
    without a hint, "k" solved only with hint level k, "unsolved" not solved up to the last level."""
    ds = tables.open_table("rl_hint_levels")
    rows = ds.to_table(columns=["level"], filter=pc.field("run_id") == run_id).column("level").to_pylist()
    counts: dict[str, int] = {}
    for level in rows:
        key = "unsolved" if level is None else str(level)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
