"""A stage's training as a job: in this process, or its ranks started by torchrun or the DeepSpeed launcher
(`keyeflow.training.launch.LaunchConfig`), each rank running this module's `main` on a JSON spec.

`launch_train` writes the spec into the run's `out_dir`, starts the launcher as a subprocess, streams its
output into this module's logger, and, when it exits, reads the result back from `out_dir`
(`trainer.read_result`: the checkpoint `latest` names and its `state.json`), so the caller gets the same
`TrainResult` as in-process training. The ranks resume from `out_dir/latest` like any run of the trainer, so
a launch killed midway goes on where it stopped when it is started again, on any number of ranks. Each rank
reports to the step's MLflow run through `lineage.RunSink` (the trainer only sees a metrics sink).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from keyeflow import lineage
from keyeflow.datasets.tables import TableRef
from keyeflow.model.config import KeyeConfig
from keyeflow.training.config import StageConfig
from keyeflow.training.launch import SPEC, TRAIN_JOB_MODULE, LaunchConfig
from keyeflow.training.trainer import TrainResult, read_result, train

log = logging.getLogger(__name__)

TAIL_LINES = (
    40  # of stderr, in the error of a failed launch: enough for a traceback and the launcher's summary
)


class LaunchFailed(RuntimeError):
    """A launched job (training, or an evaluation: `eval_job`) exited with an error (its stderr's last lines
    are in the message)."""


def launch_train(
    launch: LaunchConfig,
    stage: StageConfig,
    *,
    init: str | Path | KeyeConfig,
    mixture: TableRef,
    mixture_id: str,
    out_dir: str | Path,
    run_id: str | None = None,
) -> TrainResult:
    """`trainer.train` with the same arguments, its ranks started by `launch` (module docstring); `run_id`:
    the MLflow run every rank reports to (None: only `out_dir/metrics.jsonl`)."""
    out_dir = Path(out_dir)
    if launch.launcher == "inprocess":
        return train(
            stage,
            init=init,
            mixture=mixture,
            mixture_id=mixture_id,
            out_dir=out_dir,
            sink=lineage.RunSink(run_id) if run_id else None,
        )
    check_hostfile(launch)
    launch_job(
        launch,
        out_dir,
        {
            "stage": stage.to_dict(),
            "init": init.to_dict() if isinstance(init, KeyeConfig) else str(init),
            "mixture": {"name": mixture.name, "uri": mixture.uri, "version": mixture.version},
            "mixture_id": mixture_id,
            "out_dir": str(out_dir.resolve()),
            "run_id": run_id,
        },
        module=TRAIN_JOB_MODULE,
        name=f"stage {stage.name!r}",
    )
    try:
        return read_result(out_dir)
    except FileNotFoundError as error:
        raise LaunchFailed(
            f"the launched training exited cleanly but registered no checkpoint in {out_dir}"
        ) from error


def check_hostfile(launch: LaunchConfig) -> None:
    """Refuse a hostfile that is not there, before anything is written: DeepSpeed would only warn and train
    on this machine alone."""
    if launch.hostfile is not None and not Path(launch.hostfile).is_file():
        raise FileNotFoundError(f"LaunchConfig.hostfile={launch.hostfile!r}: no such file")


def launch_job(launch: LaunchConfig, job_dir: Path, spec: dict, *, module: str, name: str) -> None:
    """Write `spec` to `job_dir/SPEC` and run `python -m module SPEC` on every rank `launch` starts, their
    output streamed into the log (the training, evaluation and post-training jobs all launch this way). A
    non-zero exit raises, named by `name`, with the command and stderr's tail."""
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / SPEC
    path.write_text(json.dumps(spec, indent=2) + "\n")
    command = launch.command(path, module=module)
    log.info("%s: launching %s", name, " ".join(command))
    returncode, tail = run_launcher(command)
    if returncode != 0:
        raise LaunchFailed(
            f"{name}: {launch.launcher} exited with code {returncode} "
            f"(command: {' '.join(command)}); last lines of its stderr:\n" + "\n".join(tail)
        )


def run_launcher(command: list[str]) -> tuple[int, list[str]]:
    """Run `command`, every line of its output into the log as it comes; its exit code and stderr's tail."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def pump(stream: IO[str], keep: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            log.info("%s", line)
            if keep:
                tail.append(line)

    # Unbuffered children: their lines arrive as they are written, not when a buffer fills.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, errors="replace"
    ) as process:
        readers = [
            threading.Thread(target=pump, args=(process.stdout, False), daemon=True),
            threading.Thread(target=pump, args=(process.stderr, True), daemon=True),
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        returncode = process.wait()
    return returncode, list(tail)


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node N -m keyeflow.steps.train_job SPEC.json` (or `python -m …` for one process).

    SPEC.json: {"stage": {StageConfig fields}, "init": "checkpoint/dir" or {KeyeConfig dict},
    "mixture": {"name": "mixtures", "uri": …, "version": …}, "mixture_id": …, "out_dir": …,
    "run_id": null or the MLflow run to report to}. Rank 0 prints the result as one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m keyeflow.steps.train_job SPEC.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(args[0]).read_text())
    init = spec["init"]
    run_id = spec.get("run_id")
    result = train(
        StageConfig.from_dict(spec["stage"]),
        init=KeyeConfig.from_dict(init) if isinstance(init, dict) else init,
        mixture=TableRef(**spec["mixture"]),
        mixture_id=spec["mixture_id"],
        out_dir=spec["out_dir"],
        sink=lineage.RunSink(run_id) if run_id else None,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {"checkpoint_dir": str(result.checkpoint_dir), "step": result.step, "losses": result.losses}
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
