"""Cost-aware packing and balancing vs an equal-count split, on a Keye-like annealing mix, 8 ranks.

    python benchmarks/bench_balance.py [--ranks 8] [--steps 30] [--micro-batches 4] [--max-length 131072]

The mix (SPEC §3, stage 3: 24% video, 50% image, 26% text tokens, 128K context):
- long videos of 200–700 sampled frames, 10–50% of them Slow; a vision budget of 16K–96K tokens per
  video sets the Slow frame size (48–768 tokens, Fast frames 30% of it), plus 100–1,000 text tokens;
- images of 4K–20K tokens (one grid of 4 patches per token) plus 20–500 text tokens;
- short texts, lognormal around 600 tokens (40–8,000).

Each step is one window of samples (drawn in the proportions that give the token shares), planned four
ways and scored with the same true cost (:class:`keyeflow.training.balance.CostModel`: LLM per sample
plus the vision encoder per Slow/Fast frame):

- ``equal-count split``: every rank takes every 8th sample (a DistributedSampler) and packs its own;
- ``LPT on tokens``: global packing, packs spread by token count (what a length-only balancer sees);
- ``LPT on text proxy``: spread by ``24576·L + L²`` per sample, no vision encoder;
- ``LPT on cost (ours)``: spread by the full cost; what :class:`keyeflow.training.loader.MixtureLoader` does.

Printed: mean and worst over steps of max/mean rank cost (the slowest rank sets the step time), ours
against the split's figure, the micro-batch max/mean within a rank, and the real-token share of the packs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keyeflow.training.balance import (
    CostModel,
    balance,
    balance_two_level,
    group_loads,
    imbalance,
    pack_lengths,
)

SHARES = {"video": 0.24, "image": 0.50, "text": 0.26}


def draw(modality: str, n: int, rng: np.random.Generator, model: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """(num_tokens, true cost) of ``n`` samples of one modality."""
    if modality == "video":
        frames = rng.integers(200, 701, n)
        num_slow = np.maximum(1, np.round(frames * rng.uniform(0.1, 0.5, n))).astype(np.int64)
        num_fast = frames - num_slow
        budget = rng.uniform(16_000, 96_000, n)
        slow_tokens = np.clip(np.floor(budget / (num_slow + 0.3 * num_fast)), 48, 768).astype(np.int64)
        fast_tokens = np.maximum(1, np.round(0.3 * slow_tokens)).astype(np.int64)
        tokens = num_slow * slow_tokens + num_fast * fast_tokens + rng.integers(100, 1_001, n)
        vit = model.grid_cost(4 * slow_tokens, num_slow) + model.grid_cost(4 * fast_tokens, num_fast)
    elif modality == "image":
        vision = np.exp(rng.uniform(np.log(4_000), np.log(20_000), n)).astype(np.int64)
        tokens = vision + rng.integers(20, 501, n)
        vit = model.grid_cost(4 * vision)
    else:
        tokens = np.clip(rng.lognormal(np.log(600), 0.9, n), 40, 8_000).astype(np.int64)
        vit = np.zeros(n)
    return tokens, model.llm_cost(tokens) + vit


def window(rng: np.random.Generator, tokens_per_step: float, model: CostModel):
    """One step's samples, shuffled: (tokens, true cost, text-proxy cost, modality)."""
    parts = []
    for modality, share in SHARES.items():
        mean = {"video": 50_700, "image": 9_200, "text": 795}[modality]  # measured means
        n = max(1, round(share * tokens_per_step / mean))
        tokens, cost = draw(modality, n, rng, model)
        parts.append((tokens, cost, np.full(n, modality)))
    tokens = np.concatenate([p[0] for p in parts])
    cost = np.concatenate([p[1] for p in parts])
    modality = np.concatenate([p[2] for p in parts])
    order = rng.permutation(len(tokens))
    return tokens[order], cost[order], model.llm_cost(tokens[order]), modality[order]


def pack_costs(packs, values) -> np.ndarray:
    return np.array([values[p].sum() for p in packs], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=131_072)
    parser.add_argument(
        "--packs-per-micro-batch",
        type=float,
        default=1.0,
        help="window size in packs per (rank, micro-batch); sets the tokens per step",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = CostModel()
    rng = np.random.default_rng(args.seed)
    tokens_per_step = args.ranks * args.micro_batches * args.packs_per_micro_batch * args.max_length * 0.97

    results: dict[str, list[float]] = {
        k: [] for k in ("split", "tokens", "proxy", "ours", "micro", "micro_split")
    }
    share_ours, share_split, counts, seconds, vit_share = [], [], [], [], []
    modality_tokens = dict.fromkeys(SHARES, 0)
    for _ in range(args.steps):
        tokens, cost, proxy, modality = window(rng, tokens_per_step, model)
        counts.append(len(tokens))
        for m in SHARES:
            modality_tokens[m] += int(tokens[modality == m].sum())
        vit_share.append(1 - proxy.sum() / cost.sum())

        # Equal-count split: rank r takes samples r, r + R, …; each rank packs its own.
        split_loads, split_packs, split_micro = [], 0, []
        for r in range(args.ranks):
            mine = np.arange(r, len(tokens), args.ranks)
            packs = pack_lengths(tokens[mine], args.max_length, cost[mine])
            split_packs += len(packs)
            split_loads.append(cost[mine].sum())
            # Its micro-batches: packs dealt round robin, as a plain loader would.
            micro = np.arange(len(packs)) % args.micro_batches
            split_micro.append(
                imbalance(group_loads(pack_costs(packs, cost[mine]), micro, args.micro_batches))
            )
        results["split"].append(imbalance(split_loads))
        results["micro_split"].append(float(np.mean(split_micro)))
        share_split.append(tokens.sum() / (split_packs * args.max_length))

        start = time.perf_counter()
        packs = pack_lengths(tokens, args.max_length, cost)
        true = pack_costs(packs, cost)
        rank, micro = balance_two_level(true, args.ranks, args.micro_batches)
        seconds.append(time.perf_counter() - start)
        results["ours"].append(imbalance(group_loads(true, rank, args.ranks)))
        results["micro"].append(
            float(
                np.mean(
                    [
                        imbalance(group_loads(true[rank == r], micro[rank == r], args.micro_batches))
                        for r in range(args.ranks)
                    ]
                )
            )
        )
        share_ours.append(tokens.sum() / (len(packs) * args.max_length))
        for name, values in (("tokens", tokens.astype(np.float64)), ("proxy", proxy)):
            results[name].append(
                imbalance(group_loads(true, balance(pack_costs(packs, values), args.ranks), args.ranks))
            )

    def row(label: str, values: list[float]) -> str:
        return f"| {label:<30} | {np.mean(values):>8.3f} | {np.max(values):>8.3f} |"

    print(
        f"{args.steps} steps × ~{np.mean(counts):.0f} samples (~{tokens_per_step / 1e6:.1f}M tokens), "
        f"{args.ranks} ranks × {args.micro_batches} micro-batches, max_length {args.max_length:,}; "
        f"vision encoder = {np.mean(vit_share):.1%} of the true cost"
    )
    total = sum(modality_tokens.values())
    print("token shares: " + ", ".join(f"{m} {t / total:.1%}" for m, t in modality_tokens.items()) + "\n")
    print("| rank cost max/mean             |     mean |    worst |")
    print("|---|---|---|")
    print(row("equal-count split", results["split"]))
    print(row("LPT on tokens", results["tokens"]))
    print(row("LPT on text proxy (no ViT)", results["proxy"]))
    print(row("LPT on cost (ours)", results["ours"]))
    print(
        f"\nours / split (max/mean): {np.mean(results['ours']):.3f} vs {np.mean(results['split']):.3f} "
        f"(target ours <= 1.05): {'PASS' if np.mean(results['ours']) <= 1.05 else 'FAIL'}"
    )
    print(
        "step time saved vs the split (slowest rank): "
        f"{1 - np.mean(results['ours']) / np.mean(results['split']):.1%}"
    )
    print(
        f"micro-batch cost max/mean within a rank: ours {np.mean(results['micro']):.3f}, "
        f"split dealt round robin {np.mean(results['micro_split']):.3f}"
    )
    print(
        f"real-token share after packing: ours {np.mean(share_ours):.2%} (min {np.min(share_ours):.2%}), "
        f"split packed per rank {np.mean(share_split):.2%} (target >= 95%): "
        f"{'PASS' if np.min(share_ours) >= 0.95 else 'FAIL'}"
    )
    print(
        f"planning time per step (pack + two-level LPT, {np.mean(counts):.0f} samples): "
        f"{np.mean(seconds) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
