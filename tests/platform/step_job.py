"""A pre-training stage then an MPO stage, each a cached step as the `pretrain` and `posttrain` flows run them
(`keyeflow.steps`: an MLflow run, `run.json`, resume from `latest`, `done.json`), for the kill tests:
`python step_job.py` with KEYEFLOW_HOME holding a stage-2 mixture. Prints both steps' outputs as one JSON
line.

The flows themselves train four pre-training stages and six post-training ones before the step of interest;
this runs the same step functions on a tiny model for a few steps, so a kill and its rerun take seconds."""

from __future__ import annotations

import json

import pyarrow.compute as pc

from keyeflow.datasets import tables
from keyeflow.model.config import tiny
from keyeflow.steps.posttrain import train_mpo
from keyeflow.steps.stages import prepare_init, train_stage
from keyeflow.training.config import MPOStageConfig, StageConfig

STAGE = StageConfig(
    name="pretrain-2-kill",
    learning_rate=1e-3,
    max_steps=4,
    max_length=2304,  # the longest sample of the kill tests' mixture (a clip) fits
    window_size=2,
    warmup_steps=1,
    checkpoint_every=1,
)
MPO = MPOStageConfig(learning_rate=1e-3, max_steps=4, pairs_per_step=2, max_length=128, checkpoint_every=1)
PAIRS = [
    {
        "pair_id": f"pair-{k}",
        "messages": [{"role": "user", "content": question}],
        "chosen": chosen,
        "rejected": rejected,
    }
    for k, (question, chosen, rejected) in enumerate(
        [
            ("Name a colour.", "Blue.", "A number: 7"),
            ("Say hi.", "Hi!", "42 42 42"),
            ("What comes after one?", "Two.", "Maybe a fish."),
            ("Is ice cold?", "Yes, it is cold.", "No idea at all."),
        ]
    )
]


def main() -> None:
    mixtures = tables.ref("mixtures")
    (mixture_id,) = pc.unique(tables.open_table("mixtures").to_table().column("mixture_id")).to_pylist()
    init = prepare_init(tiny(), init=None, seed=0)
    stage = train_stage(STAGE, init=init, mixture=mixtures, mixture_id=mixture_id)
    mpo = train_mpo(MPO, init=stage, pairs=PAIRS)
    print(json.dumps({"stage": stage.to_dict(), "mpo": mpo.to_dict()}), flush=True)


if __name__ == "__main__":
    main()
