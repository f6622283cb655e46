"""Run a stage's training under a multi-process launcher: `torchrun` or the DeepSpeed launcher.

`train(stage, …)` trains in the calling process (one rank). `LaunchConfig` says how a stage's ranks start
instead, and `command(spec)` builds the launcher's command line; `keyeflow.steps.train_job.launch_train`
writes the trainer's JSON spec into the run's `out_dir`, starts `python -m keyeflow.steps.train_job SPEC.json`
under that launcher as a subprocess, streams its output into the log, and, when it exits, reads the result
back from `out_dir` (the checkpoint `latest` names and the `state.json` in it), so the caller gets the same
`TrainResult` as in-process training. The
ranks resume from `out_dir/latest` like any run of the trainer, so a launch killed midway goes on where it
stopped when it is started again, on any number of ranks.

On one machine without GPUs both launchers work on CPU: each rank joins a gloo group from the RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT the launcher sets (without them DeepSpeed would try MPI,
STACK.md). DeepSpeed JIT-builds its shared-memory op on first use (~35 s), cached in `TORCH_EXTENSIONS_DIR`.

Several nodes: DeepSpeed with a `hostfile` (`host slots=N` per line) starts the ranks over passwordless ssh
(pdsh). Every node then needs this package, the same paths (`out_dir`, the init checkpoint and the tables on
a shared disk or object storage) and the same `KEYEFLOW_*` settings: the launcher forwards only variables
named `MLFLOW*`, `PYTHON*` and a few more, plus the lines of `~/.deepspeed_env`, so put the `KEYEFLOW_*`
lines there. torchrun starts one node; run it on each node yourself for more.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from keyeflow.config import invalid, is_integer

log = logging.getLogger(__name__)

LAUNCHERS = ("inprocess", "torchrun", "deepspeed", "slurm")
# torchrun's c10d rendezvous port when none is given (torch's own default for c10d endpoints).
C10D_PORT = 29400
SPEC = "launch-spec.json"
# The module each rank runs (the steps layer: it reports to MLflow, which training code does not import).
TRAIN_JOB_MODULE = "keyeflow.steps.train_job"


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """How a stage's training processes start.

    `launcher`: "inprocess" (the calling process is the only rank), "torchrun", "deepspeed" or "slurm".
    `nproc_per_node`: ranks per machine (torchrun `--nproc_per_node`, DeepSpeed `--num_gpus`).
    `hostfile`: DeepSpeed only, the machines to run on (`host slots=N` lines); None: this machine.
    `num_nodes`: machines. DeepSpeed: the first `num_nodes` hosts of the hostfile (None: all of them).
    torchrun: more than one needs `rdzv_endpoint`; this process is one machine's agent and the same command
    (logged) must be started on each of the others. Slurm: None takes the allocation's
    `SLURM_JOB_NUM_NODES`.
    `rdzv_endpoint`: torchrun across machines, "host:port" of the c10d rendezvous (a machine of the job).
    Slurm finds its own: the allocation's first host.
    `master_port`: the rendezvous port; None: a free local port on one machine, DeepSpeed's default
    (29500) across machines, torchrun's c10d default (29400) under Slurm.

    "slurm" runs inside an allocation (`sbatch`/`salloc`): `srun` starts one torchrun agent per machine, and
    the agents meet in a c10d rendezvous on the allocation's first host, so the job's ranks are
    `num_nodes × nproc_per_node` whatever machine the flow runs on.
    How a stage is launched does not change what it learns (the step loss is a token mean over all ranks,
    `keyeflow.training.trainer`), so it is not part of a step's cache key."""

    launcher: str = "inprocess"
    nproc_per_node: int = 1
    hostfile: str | None = None
    num_nodes: int | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise invalid("LaunchConfig", "launcher", self.launcher, f"one of {list(LAUNCHERS)}")
        for name in ("nproc_per_node", "num_nodes", "master_port"):
            value = getattr(self, name)
            if value is None:  # unset
                continue
            if not (is_integer(value) and value >= 1):
                raise invalid("LaunchConfig", name, value, "must be an integer >= 1")
            object.__setattr__(self, name, int(value))
        if self.master_port is not None and self.master_port > 65535:
            raise invalid("LaunchConfig", "master_port", self.master_port, "must be a port number <= 65535")
        if self.launcher == "inprocess" and (
            self.nproc_per_node != 1 or self.hostfile or self.num_nodes or self.master_port
        ):
            raise ValueError(
                "LaunchConfig(launcher='inprocess') runs one rank in this process: nproc_per_node "
                "must be 1 and hostfile, num_nodes, master_port unset; use 'torchrun' or "
                "'deepspeed' for more ranks"
            )
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise ValueError(
                f"LaunchConfig.hostfile={self.hostfile!r} needs launcher='deepspeed' (torchrun across "
                "machines takes rdzv_endpoint; Slurm knows its machines)"
            )
        if self.launcher == "deepspeed" and self.num_nodes is not None and self.hostfile is None:
            raise ValueError(f"LaunchConfig.num_nodes={self.num_nodes} needs a hostfile naming the machines")
        if self.launcher == "torchrun" and (self.num_nodes or 1) > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"LaunchConfig.num_nodes={self.num_nodes} with torchrun needs rdzv_endpoint='host:port' (a "
                "machine of the job all of them reach)"
            )
        if self.rdzv_endpoint is not None:
            if self.launcher != "torchrun":
                raise invalid(
                    "LaunchConfig", "rdzv_endpoint", self.rdzv_endpoint, "is for launcher='torchrun' only"
                )
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) <= 65535):
                raise invalid("LaunchConfig", "rdzv_endpoint", self.rdzv_endpoint, "must be 'host:port'")
            if self.master_port is not None:
                raise ValueError(
                    "LaunchConfig: give the port in rdzv_endpoint, not master_port, with torchrun"
                )

    def to_dict(self) -> dict:
        out = asdict(self)
        if (
            out["rdzv_endpoint"] is None
        ):  # only when set, so the records of earlier launches stay as they were
            del out["rdzv_endpoint"]
        return out

    def nodes(self) -> int:
        """Machines the stage runs on (Slurm: the allocation's, when `num_nodes` is unset)."""
        if self.launcher == "slurm" and self.num_nodes is None:
            return int(_slurm_env("SLURM_JOB_NUM_NODES"))
        return self.num_nodes or 1

    def command(self, spec: Path, module: str = TRAIN_JOB_MODULE) -> list[str]:
        """The launcher's command line for `python -m module spec` on every rank (the trainer by default;
        `keyeflow.steps.eval_job` for an evaluation)."""
        job = [module, str(spec)]
        if self.launcher == "slurm":
            nodes = self.nodes()
            endpoint = f"{_slurm_first_host()}:{self.master_port or C10D_PORT}"
            allocation = _slurm_env("SLURM_JOB_ID")
            return [
                "srun",
                f"--nodes={nodes}",
                "--ntasks-per-node=1",  # one torchrun agent per machine; it starts the machine's ranks
                "--kill-on-bad-exit=1",  # one failed agent ends the job instead of leaving the others waiting
                *_torchrun(nodes, self.nproc_per_node, endpoint, f"keyeflow-{allocation}-{spec.parent.name}"),
                "-m",
                *job,
            ]
        if self.launcher == "torchrun":
            if self.rdzv_endpoint is not None:
                # The same id on every machine: the run's directory name, which they share.
                return [
                    *_torchrun(
                        self.num_nodes or 1,
                        self.nproc_per_node,
                        self.rdzv_endpoint,
                        f"keyeflow-{spec.parent.name}",
                    ),
                    "-m",
                    *job,
                ]
            # --standalone: a local rendezvous on a free port, as another job on this machine may hold any
            # fixed one.
            rendezvous = (
                ["--standalone"]
                if self.master_port is None
                else ["--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(self.master_port)]
            )
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *rendezvous,
                "--nproc_per_node",
                str(self.nproc_per_node),
                "-m",
                *job,
            ]
        if self.launcher == "deepspeed":
            port = self.master_port or (None if self.hostfile else _free_port())
            hosts = ["--hostfile", self.hostfile] if self.hostfile else []
            nodes = ["--num_nodes", str(self.num_nodes)] if self.num_nodes else []
            ports = ["--master_port", str(port)] if port is not None else []
            # --no_local_rank: each rank reads LOCAL_RANK from the environment and takes only the spec.
            return [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                *hosts,
                *nodes,
                "--num_gpus",
                str(self.nproc_per_node),
                *ports,
                "--no_local_rank",
                "--module",
                *job,
            ]
        raise ValueError(f"launcher {self.launcher!r} runs in this process: there is no command")


def _torchrun(nodes: int, per_node: int, endpoint: str, rdzv_id: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--nproc_per_node",
        str(per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        rdzv_id,
    ]


def _slurm_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ValueError(
            f"launcher 'slurm' runs inside a Slurm allocation (sbatch or salloc): {name} is not set"
        )
    return value


def _slurm_first_host() -> str:
    """The allocation's first machine (`scontrol show hostnames` expands Slurm's compressed node list)."""
    nodelist = _slurm_env("SLURM_JOB_NODELIST")
    done = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    hosts = done.stdout.split()
    if done.returncode != 0 or not hosts:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} failed: {done.stderr.strip()}")
    return hosts[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
