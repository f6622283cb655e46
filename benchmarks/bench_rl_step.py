"""Where the time of one GSPO step goes: rollouts, rewards, the update, the weight sync; rollouts in process
beside rollouts over HTTP, in one run.

    python benchmarks/bench_rl_step.py [--size tiny|small] [--prompts 4] [--group 8] [--max-new-tokens 64]
                                       [--images 1] [--mini-batches 2] [--steps 3] [--repeats 2] [--threads N]
                                       [--backends in_process,http]

For each backend, `keyeflow.training.rl.train_gspo` runs `--steps` steps from the same initial weights,
`--repeats` times, each in a fresh output directory; the first step of a run is warm-up (lazy initialisation
in torch) and left out; the split of every later step is read from the step's own timers in metrics.jsonl,
and the split of the fastest step (the one other processes disturbed least) and of the median step is
printed:

- **rollout**: G completions per prompt, hint-level rollouts included. `in_process`: `LocalGenerator` on the
  policy itself (KV-cached decode; all conversations of a generate call, G samples each, decoded
  together). `http`: `HTTPRolloutGenerator` against our model server, which the run starts itself on
  127.0.0.1 (`GSPOStageConfig.rollout_server`, fp32 sync): the same sampler in another process, plus
  encoding the request (ids, base64 patches), HTTP and JSON; conversations in flight at once, but our server
  samples one at a time (a lock), so this measures the protocol's overhead, not an engine's batching;
- **sync** (`http` only): exporting the policy in the serving layout, the server's reload and the log-prob
  check on a fixed prompt, after every step;
- **reward**: the reward function over every completion;
- **update**: prompt encoding, teacher-forced log-probs (old, then one forward + backward per mini-batch),
  the GSPO loss and the AdamW steps;
- **other**: the rest of the step (picking prompts, advantages, the hint bookkeeping, metrics and the per-step
  hint JSON); checkpoints are written after the step's timer stops and are reported beside it.

Model: `--size tiny` is the test model (`keyeflow.model.config.tiny`: LLM 2 layers × 64, ViT 2 × 64); `small`
widens it to LLM 4 layers × 256 (8 query / 4 KV heads of 32, MLP 1024) and ViT 4 × 128 (MLP 512), the
benchmarks' "tiny but not trivial" model. fp32, CPU. Prompts are short questions; `--images` of them carry a
56×84-pixel image (6 LLM tokens). A random policy never answers right, so a verifiable reward alone would give
every group the same reward and the update would have nothing to do: the reward is half the real rule reward
(`rl.rule_reward_fn`, the graders run as in training) and half the share of ASCII letters in the response,
which varies between random completions so every group has a signal and every response is trained.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("rollout", "reward", "update", "sync", "other")
BACKENDS = ("in_process", "http")


def model_config(size: str):
    """The tiny model, or the 7.3M-parameter one the trainer benchmark also measures (one definition)."""
    from bench_trainer import bench_model_config

    from keyeflow.model.config import tiny
    from keyeflow.model.tokenizer import load_tokenizer

    return tiny(load_tokenizer()) if size == "tiny" else bench_model_config()


def build_items(num_prompts: int, num_images: int) -> list[dict]:
    items = []
    for k in range(num_prompts):
        question = f"What is {k + 2} times {k + 3}? Answer with the number. /think"
        content = (
            [{"type": "image", "seed": k}, {"type": "text", "text": question}] if k < num_images else question
        )
        items.append(
            {
                "id": f"q{k}",
                "messages": [{"role": "user", "content": content}],
                "reference": str((k + 2) * (k + 3)),
                "task": "math",
            }
        )
    return items


def media_lookup(part):
    import numpy as np

    from keyeflow.datasets.pretokenize import patchify
    from keyeflow.model.processor import MediaPatches

    pixels = np.random.default_rng(part["seed"]).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    return MediaPatches(patchify(pixels, 14, 2), [(1, 4, 6)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G, rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=1, help="prompts that carry an image")
    parser.add_argument("--mini-batches", type=int, default=2, help="updates per rollout batch")
    parser.add_argument("--steps", type=int, default=3, help="steps per run; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated, of " + ", ".join(BACKENDS)
    )
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in BACKENDS for b in backends):
        parser.error(f"--backends: a comma-separated list of {BACKENDS}")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from keyeflow.model.modeling import KeyeForConditionalGeneration
    from keyeflow.training.config import GSPOStageConfig, RolloutServerConfig
    from keyeflow.training.losses import GSPOConfig
    from keyeflow.training.rl import rule_reward_fn, train_gspo

    rule = rule_reward_fn()

    def reward(item, response: str) -> float:
        letters = sum(ch.isascii() and ch.isalpha() for ch in response) / len(response) if response else 0.0
        return 0.5 * rule(item, response).value + 0.5 * letters

    home = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    config = model_config(args.size)
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(config)
    num_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(home / "init")
    del model
    items = build_items(args.prompts, args.images)
    stage = GSPOStageConfig(
        prompts_per_step=args.prompts,
        group_size=args.group,
        max_new_tokens=args.max_new_tokens,
        learning_rate=1e-5,
        max_steps=args.steps,
        mini_batches_per_step=args.mini_batches,
        gspo=GSPOConfig(),
        hints=None,
        checkpoint_every=args.steps,
    )
    print(
        f"model {args.size}: {num_params / 1e6:.1f}M parameters; "
        f"{args.prompts} prompts ({args.images} with an "
        f"image) × G={args.group}, up to {args.max_new_tokens} new tokens, {args.mini_batches} mini-batches; "
        f"{args.steps} steps × {args.repeats} runs; torch threads {torch.get_num_threads()}"
    )

    try:
        for backend in backends:
            run_backend(
                backend, args, stage, home, items, reward, media_lookup, train_gspo, RolloutServerConfig
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)  # checkpoints and weight exports of every run


def run_backend(backend, args, stage, home, items, reward, lookup, train_gspo, rollout_server_config) -> None:
    import dataclasses

    if backend == "http":
        # Our server, started by the run on 127.0.0.1; fp32 sync keeps its samples the in-process ones.
        stage = dataclasses.replace(stage, rollout_server=rollout_server_config(sync_dtype="fp32"))
    print(f"\n== rollouts {backend} ==")
    splits: dict[str, list[float]] = {part: [] for part in (*PARTS, "step")}
    tokens = []
    for repeat in range(args.repeats):
        wall = time.perf_counter()
        result = train_gspo(
            stage,
            init=home / "init",
            items=items,
            reward_fn=reward,
            out_dir=home / f"run-{backend}-{repeat}",
            media_lookup=lookup,
        )
        wall = time.perf_counter() - wall
        for record in result.history[1:]:
            timed = {
                "rollout": record["time_rollout"],
                "reward": record["time_reward"],
                "update": record["time_update"],
                "sync": record.get("time_sync", 0.0),
            }
            timed["other"] = record["time_step"] - sum(timed.values())
            for part, seconds in timed.items():
                splits[part].append(seconds)
            splits["step"].append(record["time_step"])
            tokens.append(record["completion_tokens_mean"] * args.prompts * args.group)
        steps_time = sum(r["time_step"] for r in result.history)
        step_times = ", ".join(f"{r['time_step']:.2f}" for r in result.history)
        print(
            f"  run {repeat + 1}: steps {step_times} s (first = warm-up); train_gspo wall {wall:.1f} s, "
            f"of which {wall - steps_time:.1f} s outside the steps (model load, input check, server start, "
            "checkpoint)"
        )

    # The fastest step is the one least disturbed by other processes; the median shows how much they moved.
    order = sorted(range(len(splits["step"])), key=lambda i: splits["step"][i])
    best, middle = order[0], order[(len(order) - 1) // 2]
    print(
        f"one step: fastest {splits['step'][best]:.3f} s, median {splits['step'][middle]:.3f} s "
        f"(of {len(order)} measured); {tokens[best]:.0f} completion tokens sampled in the fastest"
    )
    print(f"{'part':<10}{'fastest s':>11}{'share':>8}{'median-step s':>15}{'share':>8}")
    for part in PARTS:
        fast, mid = splits[part][best], splits[part][middle]
        print(
            f"{part:<10}{fast:>11.3f}{fast / splits['step'][best]:>8.1%}{mid:>15.3f}"
            f"{mid / splits['step'][middle]:>8.1%}"
        )
    print(
        f"rollout throughput (fastest step): {tokens[best] / splits['rollout'][best]:,.0f} sampled tokens/s"
    )


if __name__ == "__main__":
    main()
