"""The Slurm launcher: `srun` starts one torchrun agent per machine and the agents meet in a c10d rendezvous.

No Slurm runs here, so `srun` and `scontrol` are the one thing stood in for: two small programs on PATH that
do what Slurm does for this launch (expand the node list; start the command once per "machine" with its
SLURM_NODEID). Everything after them is real: two torchrun agents on this machine, a c10d rendezvous between
them, 2 gloo ranks training the stage, whose losses equal the stage trained in one process."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from test_deepspeed_launcher import RTOL, STAGE

from keyeflow.steps.train_job import launch_train
from keyeflow.training.engine import STATE
from keyeflow.training.launch import LaunchConfig
from keyeflow.training.trainer import train

SRUN = f"""#!{sys.executable}
# Stands in for srun: runs the command once per node of --nodes=N, in parallel, as Slurm would on N machines.
import os, subprocess, sys
args = sys.argv[1:]
nodes = 1
while args and args[0].startswith("--"):
    if args[0].startswith("--nodes="):
        nodes = int(args[0].split("=", 1)[1])
    args = args[1:]
with open(os.environ["SRUN_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
procs = [
    subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i)}})
    for i in range(nodes)
]
sys.exit(max(p.wait() for p in procs))
"""

SCONTROL = """#!/bin/sh
# Stands in for `scontrol show hostnames LIST`: this allocation's two machines are this one.
echo localhost
echo localhost
"""


@pytest.fixture()
def slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SRUN_LOG", str(tmp_path / "srun.log"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[01-02]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    return tmp_path / "srun.log"


def test_launch_configs_for_machines_are_checked():
    with pytest.raises(ValueError, match="num_nodes=2 with torchrun needs rdzv_endpoint"):
        LaunchConfig(launcher="torchrun", num_nodes=2)
    with pytest.raises(ValueError, match=r"rdzv_endpoint='node01': must be 'host:port'"):
        LaunchConfig(launcher="torchrun", num_nodes=2, rdzv_endpoint="node01")
    with pytest.raises(ValueError, match="rdzv_endpoint='node01:29400': is for launcher='torchrun' only"):
        LaunchConfig(launcher="slurm", rdzv_endpoint="node01:29400")
    command = LaunchConfig(
        launcher="torchrun", nproc_per_node=8, num_nodes=4, rdzv_endpoint="node01:29400"
    ).command(Path("/shared/run-7/launch-spec.json"))
    assert command[3:13] == [
        "--nnodes", "4", "--nproc_per_node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node01:29400",
        "--rdzv-id", "keyeflow-run-7",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES"):
            mp.delenv(name, raising=False)
        with pytest.raises(
            ValueError, match=r"inside a Slurm allocation \(sbatch or salloc\): SLURM_JOB_NUM"
        ):
            LaunchConfig(launcher="slurm").command(Path("/shared/run/launch-spec.json"))


@pytest.mark.slow
def test_slurm_launch_trains_across_two_agents_like_one_process(multirank_training_data, slurm, tmp_path):
    data = multirank_training_data
    reference = train(
        STAGE, init=data.init, mixture=data.mixture, mixture_id=data.mixture_id, out_dir=tmp_path / "one"
    ).losses
    result = launch_train(
        LaunchConfig(launcher="slurm", nproc_per_node=1),
        STAGE,
        init=data.init,
        mixture=data.mixture,
        mixture_id=data.mixture_id,
        out_dir=tmp_path / "run",
    )
    (srun_args,) = slurm.read_text().splitlines()
    assert srun_args.startswith("--nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 ")
    assert "--rdzv-endpoint localhost:29400 --rdzv-id keyeflow-4242-run" in srun_args
    assert srun_args.endswith(f"-m keyeflow.steps.train_job {tmp_path / 'run' / 'launch-spec.json'}")
    assert result.losses == pytest.approx(reference, rel=RTOL)  # 2 agents × 1 rank = 1 process
    assert json.loads((result.checkpoint_dir / STATE).read_text())["world_size"] == 2
