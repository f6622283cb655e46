"""One MPO or GSPO run as its own process, for the engine tests: `python posttrain_job.py SPEC.json`, or the
same under torchrun for several ranks. SPEC: {"kind": "mpo" | "gspo", "init": dir, "out_dir": dir,
"max_steps": N}. Rank 0 prints the run's losses (MPO) or metric history (GSPO) as one JSON line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from keyeflow.datasets.pretokenize import patchify
from keyeflow.model.processor import MediaPatches
from keyeflow.training.config import GSPOStageConfig, MPOStageConfig
from keyeflow.training.losses import GSPOConfig
from keyeflow.training.preference import train_mpo
from keyeflow.training.rl import train_gspo


def image_lookup(part: dict) -> MediaPatches:
    """A fixed 56×84 random picture per seed (6 merged tokens)."""
    pixels = np.random.default_rng(part["seed"]).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    return MediaPatches(patchify(pixels, 14, 2), [(1, 4, 6)])


def picture_prompt(seed: int, question: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "seed": seed}, {"type": "text", "text": question}]}
    ]


PAIRS = [
    {
        "messages": picture_prompt(1, "What is shown?"),
        "chosen": "A red square.",
        "rejected": "Nothing, maybe.",
    },
    {
        "messages": picture_prompt(2, "How many dots?"),
        "chosen": "Three.",
        "rejected": "I cannot tell at all.",
    },
    {
        "messages": [{"role": "user", "content": "Name a colour."}],
        "chosen": "Blue.",
        "rejected": "A number: 7",
    },
    {
        "messages": picture_prompt(3, "Which side?"),
        "chosen": "The left one.",
        "rejected": "Up, I think, or 9.",
    },
    {"messages": [{"role": "user", "content": "Say hi."}], "chosen": "Hi!", "rejected": "42 42 42"},
]
ITEMS = [
    {
        "id": f"item-{k}",
        "messages": picture_prompt(k, q) if k % 2 else [{"role": "user", "content": q}],
        "reference": "x",
    }
    for k, q in enumerate(
        ["Describe it.", "Count them.", "What colour?", "Where is it?", "Name it.", "How big?"]
    )
]
MPO = {"learning_rate": 1e-3, "pairs_per_step": 4, "max_length": 256, "checkpoint_every": 2, "seed": 1}
GSPO = {
    "prompts_per_step": 4,
    "group_size": 4,
    "max_new_tokens": 8,
    "learning_rate": 1e-3,
    "mini_batches_per_step": 2,
    "hints": None,
    "seed": 3,
    "checkpoint_every": 2,
}


def letter_share(item, response: str) -> float:
    """A reward that varies between random completions, so every group carries an advantage."""
    return sum(ch.isascii() and ch.isalpha() for ch in response) / len(response) if response else 0.0


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["kind"] == "mpo":
        result = train_mpo(
            MPOStageConfig(**MPO, max_steps=spec["max_steps"]),
            init=spec["init"],
            pairs=PAIRS,
            out_dir=spec["out_dir"],
            media_lookup=image_lookup,
        )
        out = {"losses": result.losses, "metrics": result.metrics}
    else:
        result = train_gspo(
            GSPOStageConfig(**GSPO, gspo=GSPOConfig(), max_steps=spec["max_steps"]),
            init=spec["init"],
            items=ITEMS,
            reward_fn=letter_share,
            out_dir=spec["out_dir"],
            media_lookup=image_lookup,
        )
        out = {"metrics": result.history}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint_dir": str(result.checkpoint_dir), **out}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
