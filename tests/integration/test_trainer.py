"""The stage trainer on real train_samples and a real stage mixture (Lance, DuckDB, MLflow) with the tiny
model: the loss falls, the projector-only stage leaves ViT and LLM bit-identical, and a SIGKILLed run resumes
to the same losses, bit for bit, over the same samples. Stage configs and the DeepSpeed JSON they render are
checked here too (DeepSpeed itself runs in test_trainer_distributed.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from weights_match import assert_same_updates

from keyeflow import lineage
from keyeflow.datasets import conversations, images, ingest, pretokenize, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.mixture import build_mixture, stage_mixture
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.datasets.tables import TableRef
from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.training.config import StageConfig, pretrain_stage
from keyeflow.training.deepspeed_config import render_deepspeed_config
from keyeflow.training.engine import LATEST, read_metrics
from keyeflow.training.trainer import check_resumable, train

MAX_LENGTH = 1024
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TrainingData:
    home: Path
    mixture: TableRef
    mixture_id: str
    init: Path  # a fresh tiny model saved with save_pretrained: every run starts from the same weights


def build_training_data(home: Path, corpus_dir: Path, media_dir: Path) -> TrainingData:
    """train_samples from the sample corpus (images capped at 256 tokens) and a stage-2 mixture (video, image
    and text) of the samples that fit MAX_LENGTH; KEYEFLOW_HOME must point at `home`."""
    paper = resolve_config("paper")
    image_config = ImageConfig(max_tokens=256)
    media = conversations.referenced_media([str(corpus_dir)], str(media_dir))
    ingest.ingest_shard(media["video"])
    pretokenize.pretokenize_shard(pretokenize.pending_videos(tables.ref("videos"), paper), paper)
    images.ingest_images_shard(media["image"], image_config)
    conversations.build_train_samples([str(corpus_dir)], str(media_dir), paper, image_config)
    config = stage_mixture(2, max_sample_tokens=MAX_LENGTH, upsample=True, max_repeats=4)
    result = build_mixture(tables.ref("train_samples"), config, tables.ref("quarantine"))
    init = home / "init"
    torch.manual_seed(0)
    KeyeForConditionalGeneration(tiny()).save_pretrained(init)
    return TrainingData(home, result.mixture, result.mixture_id, init)


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_corpus, media_dir):
    home = tmp_path_factory.mktemp("trainer") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYEFLOW_HOME", str(home))
        for var in ("KEYEFLOW_TABLES_URI", "KEYEFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        yield build_training_data(home, sample_corpus["conversations"].parent, media_dir)


def stage(**overrides) -> StageConfig:
    base = {
        "name": "test",
        "learning_rate": 1e-3,
        "max_steps": 8,
        "max_length": MAX_LENGTH,
        "window_size": 8,
        "micro_batches_per_step": 2,
        "warmup_steps": 2,
        "checkpoint_every": 2,
    }
    return StageConfig(**{**base, **overrides})


def spec_file(path: Path, data: TrainingData, stage_config: StageConfig, out_dir: Path) -> Path:
    mixture = {"name": data.mixture.name, "uri": data.mixture.uri, "version": data.mixture.version}
    path.write_text(
        json.dumps(
            {
                "stage": stage_config.to_dict(),
                "init": str(data.init),
                "mixture": mixture,
                "mixture_id": data.mixture_id,
                "out_dir": str(out_dir),
            }
        )
    )
    return path


def trainer_command(spec: Path) -> list[str]:
    return [sys.executable, "-m", "keyeflow.steps.train_job", str(spec)]


def run_trainer(spec: Path) -> dict:
    done = subprocess.run(
        trainer_command(spec), check=False, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- configs


def test_stage_config_is_validated_with_clear_errors():
    with pytest.raises(ValueError, match=r"StageConfig.trainable='vision'"):
        stage(trainable="vision")
    with pytest.raises(ValueError, match=r"StageConfig.min_lr=0.1: must be <= learning_rate"):
        stage(min_lr=0.1)
    with pytest.raises(ValueError, match=r"StageConfig.schedule='step'"):
        stage(schedule="step")
    with pytest.raises(ValueError, match=r"StageConfig.deepspeed_zero=4"):
        stage(deepspeed_zero=4)
    with pytest.raises(ValueError, match=r"offload_params=True: needs DeepSpeed ZeRO stage 3"):
        stage(deepspeed_zero=2, offload_params=True)
    with pytest.raises(ValueError, match=r"warmup_steps=9: must be <= max_steps"):
        stage(warmup_steps=9)
    assert stage(trainable=["projector.", "language_model.layers.1"]).trainable == (
        "language_model.layers.1",
        "projector",
    )
    assert StageConfig.from_dict(stage(trainable=["projector"]).to_dict()) == stage(trainable=["projector"])
    assert stage().config_hash() != stage(learning_rate=2e-3).config_hash()
    # the schedule: linear warm-up, then cosine to min_lr
    s = stage(max_steps=10, warmup_steps=2, min_lr=1e-4)
    assert [s.lr_at(0), s.lr_at(1)] == [5e-4, 1e-3]
    assert s.lr_at(9) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert pretrain_stage(1).trainable == "projector" and pretrain_stage(3).rope_theta == 8e6
    # a token budget per micro-batch: at least one pack, absent from older configs' dicts
    with pytest.raises(ValueError, match=r"max_tokens_per_micro_batch=512: must be >= max_length \(1024\)"):
        stage(max_tokens_per_micro_batch=512)
    assert "max_tokens_per_micro_batch" not in stage().to_dict()
    budgeted = stage(max_tokens_per_micro_batch=2048)
    assert StageConfig.from_dict(budgeted.to_dict()) == budgeted
    assert budgeted.config_hash() != stage().config_hash()


def test_deepspeed_json_is_rendered_from_the_stage_config_and_deepspeed_accepts_it():
    from deepspeed.runtime.config import DeepSpeedConfig

    base = stage(deepspeed_zero=2, micro_batches_per_step=4, grad_clip=0.5, zero_bucket_size=1234567)
    rendered = render_deepspeed_config(base, world_size=1)
    assert rendered["gradient_accumulation_steps"] == 4 and rendered["train_batch_size"] == 4
    assert rendered["gradient_clipping"] == 0.5 and rendered["bf16"] == {"enabled": False}
    assert rendered["zero_optimization"]["reduce_bucket_size"] == 1234567
    assert render_deepspeed_config(base, world_size=8)["train_batch_size"] == 32
    parsed = DeepSpeedConfig(rendered)
    assert parsed.zero_optimization_stage == 2 and parsed.gradient_accumulation_steps == 4
    assert parsed.gradient_clipping == 0.5
    assert parsed.zero_config.reduce_bucket_size == 1234567 and parsed.zero_config.overlap_comm

    changed = {
        "micro_batches_per_step": ("gradient_accumulation_steps",),
        "grad_clip": ("gradient_clipping",),
        "bf16": ("bf16",),
        "deepspeed_zero": ("zero_optimization",),
        "zero_bucket_size": ("zero_optimization",),
        "offload_optimizer": ("zero_optimization",),
    }
    for field, new in (
        ("micro_batches_per_step", 2),
        ("grad_clip", None),
        ("bf16", True),
        ("deepspeed_zero", 1),
        ("zero_bucket_size", 99),
        ("offload_optimizer", True),
    ):
        other = render_deepspeed_config(stage(**{**base.to_dict(), field: new, "name": "x"}), world_size=1)
        differ = {k for k in rendered if rendered[k] != other.get(k)}
        assert set(changed[field]) <= differ, (field, differ)
        DeepSpeedConfig(other)
    zero3 = DeepSpeedConfig(
        render_deepspeed_config(stage(deepspeed_zero=3, offload_params=True), world_size=1)
    )
    assert zero3.zero_optimization_stage == 3 and zero3.zero_config.offload_param.device == "cpu"
    with pytest.raises(ValueError, match="does not train with DeepSpeed"):
        render_deepspeed_config(stage(), world_size=1)


# ---------------------------------------------------------------------------------------------- training


def test_loss_falls_and_metrics_reach_mlflow(data, tmp_path):
    run_id = lineage.start_run("train-test")
    result = train(
        stage(max_steps=30, checkpoint_every=30, schedule="constant"),
        init=data.init,
        mixture=data.mixture,
        mixture_id=data.mixture_id,
        out_dir=tmp_path / "run",
        sink=lineage.RunSink(run_id),
    )
    assert result.step == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, result.losses  # ln(4096) ≈ 8.3 at the start
    history = lineage.client().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(result.losses)
    for name in ("lr", "tokens", "tokens_per_s"):
        assert len(lineage.client().get_metric_history(run_id, name)) == 30
    assert (result.checkpoint_dir / "model" / "config.json").is_file()
    assert (tmp_path / "run" / LATEST).read_text().strip() == result.checkpoint_dir.name


def test_projector_stage_leaves_vit_and_llm_bit_identical(data, tmp_path):
    # weight decay on, rope theta changed: neither may touch a frozen tensor
    result = train(
        stage(trainable="projector", max_steps=3, weight_decay=0.1, rope_theta=8e6),
        init=data.init,
        mixture=data.mixture,
        mixture_id=data.mixture_id,
        out_dir=tmp_path / "run",
    )
    before = load_file(str(data.init / "model.safetensors"))
    after = load_file(str(result.checkpoint_dir / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith("projector.")]
    assert any(k.startswith("vision.") for k in frozen) and any(
        k.startswith("language_model.") for k in frozen
    )
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith("projector."))
    config = json.loads((result.checkpoint_dir / "model" / "config.json").read_text())
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 8e6


def test_a_token_budget_splits_steps_into_more_micro_batches_with_the_same_updates(data, tmp_path):
    def run(name, **overrides):
        result = train(
            stage(max_steps=3, micro_batches_per_step=1, checkpoint_every=3, **overrides),
            init=data.init, mixture=data.mixture, mixture_id=data.mixture_id, out_dir=tmp_path / name,
        )  # fmt: skip
        return (
            result,
            read_metrics(tmp_path / name),
            load_file(str(result.checkpoint_dir / "model" / "model.safetensors")),
        )

    plain, plain_metrics, plain_weights = run("plain")
    capped, capped_metrics, capped_weights = run("capped", max_tokens_per_micro_batch=MAX_LENGTH)
    # The same samples per step, so the same token-mean loss and update, summed in another order.
    for a, b in zip(plain_metrics, capped_metrics, strict=True):
        assert a["occurrences"] == b["occurrences"] and a["tokens"] == b["tokens"]
        assert a["micro_batches"] == 1 and b["micro_batches"] >= math.ceil(b["tokens"] / MAX_LENGTH) > 1
    assert capped.losses == pytest.approx(plain.losses, rel=1e-6)
    assert_same_updates(capped_weights, plain_weights, lr=stage().learning_rate, atol=1e-6)
    assert any(
        not torch.equal(plain_weights[k], load_file(str(data.init / "model.safetensors"))[k])
        for k in plain_weights
    )


def test_a_checkpoint_refuses_a_resume_it_cannot_honour():
    saved = {
        "format": 1,
        "mixture_id": "m1",
        "deepspeed_zero": 2,
        "world_size": 2,
        "stage": stage(deepspeed_zero=2).to_dict(),
        "stage_hash": stage(deepspeed_zero=2).config_hash(),
    }
    check_resumable(saved, stage(deepspeed_zero=2), "m1", world_size=2)
    with pytest.raises(ValueError, match="partitioned the optimizer state over 2 ranks, this run has 1"):
        check_resumable(saved, stage(deepspeed_zero=2), "m1", world_size=1)
    with pytest.raises(ValueError, match="trained on mixture 'm1', this run asks for 'm2'"):
        check_resumable(saved, stage(deepspeed_zero=2), "m2", world_size=2)
    with pytest.raises(ValueError, match="written with deepspeed_zero=2, this run has None"):
        check_resumable(saved, stage(), "m1", world_size=2)
    plain = {**saved, "deepspeed_zero": None}  # plain data parallelism: any world size
    check_resumable(plain, stage(), "m1", world_size=1)


def test_a_bad_trainable_prefix_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="trainable prefix 'projecter' matches no parameter"):
        train(
            stage(trainable=["projecter"], max_steps=1, warmup_steps=0),
            init=data.init,
            mixture=data.mixture,
            mixture_id=data.mixture_id,
            out_dir=tmp_path / "run",
        )


def test_sigkill_then_rerun_gives_the_uninterrupted_losses_bitwise_over_the_same_samples(data, tmp_path):
    config = stage(max_steps=8, checkpoint_every=2)
    reference = run_trainer(spec_file(tmp_path / "reference.json", data, config, tmp_path / "reference"))

    out = tmp_path / "killed"
    spec = spec_file(tmp_path / "killed.json", data, config, out)
    # SIGKILLed by itself after step 5's update, before its checkpoint: step 4 is the last one registered.
    env = {**os.environ, "KEYEFLOW_KILL_POINT": "stage.step@5"}
    done = subprocess.run(
        trainer_command(spec), check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL and "keyeflow kill point stage.step" in done.stderr
    assert (out / LATEST).read_text().strip() == "step-00000004"
    assert len(read_metrics(out)) == 5  # the step after the checkpoint was logged, then lost with the kill

    resumed = run_trainer(spec)
    assert resumed["step"] == 8
    assert resumed["losses"] == reference["losses"]  # the same floats, not just close
    steps = read_metrics(out)
    assert [m["step"] for m in steps] == list(range(1, 9))  # the lines after the checkpoint were dropped
    assert [m["loss"] for m in steps] == reference["losses"]
    assert [m["occurrences"] for m in steps] == [
        m["occurrences"] for m in read_metrics(tmp_path / "reference")
    ]
    consumed = [o for m in steps for o in m["occurrences"]]
    assert len(consumed) == len(set(consumed)) == 8 * config.window_size  # nothing repeated, nothing skipped
    state = json.loads((Path(resumed["checkpoint_dir"]) / "state.json").read_text())
    assert state["num_consumed_occurrences"] == len(consumed) and state["loader"]["window"] == 8
    assert not list(out.glob(".tmp-*"))
