"""Stages trained through the real launchers as subprocesses: the DeepSpeed launcher (ZeRO-2, 2 CPU ranks on
gloo) inside the cached training step, and torchrun; both give the losses of the same stage trained in this
process, and a launch that fails says why."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from keyeflow import lineage
from keyeflow.model.config import tiny
from keyeflow.steps import stages as steps
from keyeflow.steps.train_job import LaunchFailed, launch_train
from keyeflow.training.config import StageConfig
from keyeflow.training.engine import LATEST, STATE, read_metrics
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.recipes import pretrain_recipe
from keyeflow.training.trainer import train

# 2 ranks × 2 micro-batches per step; the loss is a token mean over the step, whatever its split over ranks.
STAGE = StageConfig(
    name="launched",
    learning_rate=1e-3,
    max_steps=4,
    max_length=1024,
    window_size=8,
    micro_batches_per_step=2,
    schedule="constant",
    checkpoint_every=2,
)
RTOL = 1e-4


@pytest.fixture(scope="module")
def data(multirank_training_data):
    return multirank_training_data


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> list[float]:
    """The stage's losses on one rank, in this process, without DeepSpeed."""
    out = tmp_path_factory.mktemp("in-process")
    return train(STAGE, init=data.init, mixture=data.mixture, mixture_id=data.mixture_id, out_dir=out).losses


def test_launch_config_is_validated_with_the_field_named(tmp_path):
    assert LaunchConfig().launcher == "inprocess"
    with pytest.raises(ValueError, match=r"LaunchConfig.launcher='mpirun'"):
        LaunchConfig(launcher="mpirun")
    with pytest.raises(ValueError, match=r"LaunchConfig.nproc_per_node=0: must be an integer >= 1"):
        LaunchConfig(launcher="torchrun", nproc_per_node=0)
    with pytest.raises(ValueError, match="runs one rank in this process"):
        LaunchConfig(nproc_per_node=2)
    with pytest.raises(ValueError, match=r"hostfile='hosts' needs launcher='deepspeed'"):
        LaunchConfig(launcher="torchrun", hostfile="hosts")
    with pytest.raises(ValueError, match="num_nodes=2 needs a hostfile"):
        LaunchConfig(launcher="deepspeed", num_nodes=2)
    with pytest.raises(ValueError, match="master_port=70000"):
        LaunchConfig(launcher="deepspeed", master_port=70000)

    # A hostfile is passed through to the DeepSpeed launcher, with DeepSpeed's own port across machines.
    hosts = LaunchConfig(launcher="deepspeed", nproc_per_node=8, hostfile="/etc/keyeflow/hosts", num_nodes=2)
    command = hosts.command(tmp_path / "spec.json")
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert command[3:] == [
        "--hostfile",
        "/etc/keyeflow/hosts",
        "--num_nodes",
        "2",
        "--num_gpus",
        "8",
        "--no_local_rank",
        "--module",
        "keyeflow.steps.train_job",
        str(tmp_path / "spec.json"),
    ]
    local = LaunchConfig(launcher="deepspeed", nproc_per_node=2).command(tmp_path / "spec.json")
    assert "--master_port" in local  # a free port, not 29500 that another job may hold
    torchrun = LaunchConfig(launcher="torchrun", nproc_per_node=2, master_port=29911).command(
        tmp_path / "s.json"
    )
    assert torchrun[3:] == [
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        "29911",
        "--nproc_per_node",
        "2",
        "-m",
        "keyeflow.steps.train_job",
        str(tmp_path / "s.json"),
    ]
    # A recipe carries how its stages launch; unset, its record (and hash) is what it was before.
    recipe = pretrain_recipe("tiny")
    assert recipe.launch is None and "launch" not in recipe.to_dict()
    launched = dataclasses.replace(recipe, launch=LaunchConfig(launcher="deepspeed", nproc_per_node=2))
    assert launched.to_dict()["launch"] == {
        "launcher": "deepspeed",
        "nproc_per_node": 2,
        "hostfile": None,
        "num_nodes": None,
        "master_port": None,
    }

    # DeepSpeed only warns about a missing hostfile and trains on this machine alone: refuse instead.
    with pytest.raises(FileNotFoundError, match="no such file"):
        launch_train(
            LaunchConfig(launcher="deepspeed", hostfile=str(tmp_path / "nope")),
            STAGE,
            init="x",
            mixture=None,
            mixture_id="m",
            out_dir=tmp_path / "out",
        )


def test_deepspeed_launcher_trains_a_zero2_stage_on_two_cpu_ranks(data, reference, tmp_path):
    zero2 = StageConfig.from_dict({**STAGE.to_dict(), "deepspeed_zero": 2})
    init = steps.prepare_init(tiny(), init=str(data.init), seed=0, root=tmp_path)
    launch = LaunchConfig(launcher="deepspeed", nproc_per_node=2)

    output = steps.train_stage(
        zero2, init=init, mixture=data.mixture, mixture_id=data.mixture_id, root=tmp_path, launch=launch
    )
    assert output.trained
    out_dir = Path(output.checkpoint).parents[1]
    last = out_dir / (out_dir / LATEST).read_text().strip()
    assert output.checkpoint == str(last / "model") and (last / "model" / "model.safetensors").is_file()
    assert (last / "deepspeed" / "engine").is_dir()  # ZeRO's partitioned optimizer state
    state = json.loads((last / STATE).read_text())
    assert (state["step"], state["world_size"], state["deepspeed_zero"]) == (4, 2, 2)
    assert state["losses"] == pytest.approx(reference, rel=RTOL)  # 2 ZeRO-2 ranks = 1 plain rank
    assert [m["loss"] for m in read_metrics(out_dir)] == state["losses"]

    # The ranks logged to the step's MLflow run, and the step registered its checkpoint there.
    run = lineage.client().get_run(output.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[lineage.CHECKPOINT_TAG] == output.checkpoint
    assert run.data.params["world_size"] == "2"
    history = lineage.client().get_metric_history(output.run_id, "loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(reference, rel=RTOL)

    # Launched or not, the step's key is the same: done, so nothing is launched again.
    again = steps.train_stage(
        zero2, init=init, mixture=data.mixture, mixture_id=data.mixture_id, root=tmp_path
    )
    assert not again.trained and again.checkpoint == output.checkpoint


def test_torchrun_launch_returns_what_in_process_training_returns(data, reference, tmp_path):
    result = launch_train(
        LaunchConfig(launcher="torchrun", nproc_per_node=2),
        STAGE,
        init=data.init,
        mixture=data.mixture,
        mixture_id=data.mixture_id,
        out_dir=tmp_path / "run",
    )
    assert result.step == STAGE.max_steps and result.losses == pytest.approx(reference, rel=RTOL)
    assert result.checkpoint_dir == tmp_path / "run" / (tmp_path / "run" / LATEST).read_text().strip()
    assert json.loads((result.checkpoint_dir / STATE).read_text())["world_size"] == 2


def test_a_failing_launch_raises_with_the_tail_of_its_stderr(data, tmp_path):
    with pytest.raises(LaunchFailed) as failed:
        launch_train(
            LaunchConfig(launcher="torchrun"),
            STAGE,
            init=tmp_path / "no-such-checkpoint",
            mixture=data.mixture,
            mixture_id=data.mixture_id,
            out_dir=tmp_path / "run",
        )
    message = str(failed.value)
    assert "stage 'launched': torchrun exited with code 1" in message
    assert f"checkpoint path {tmp_path / 'no-such-checkpoint'} is not a local directory" in message
