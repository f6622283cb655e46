"""Peak memory per token of one training forward+backward, new path vs the old mask path, L = 2K … 32K.

    python benchmarks/bench_memory.py [--lengths 2048,4096,8192,16384,32768] [--sample-tokens 1024]
                                      [--mask-limit-gib 6]

- **new**: what training runs now: packed attention by segments (`KeyeConfig.attention = "packed"`, no
  [L, L] tensor) and the loss from `forward(logprob_labels=...)` (lm_head + log-softmax over chunks of 512
  positions, no [L, V] tensor);
- **mask**: what it ran before: the dense [1, 1, L, L] additive mask (`attention = "mask"`) and
  cross-entropy over the full fp32 logits.

Model: the tiny recipe's widths (LLM 2 layers × 64, 4 query / 2 KV heads, vocabulary 4,096; ViT unused), fp32,
CPU, one thread, activation checkpointing off. Input: one packed row of L text tokens made of samples of
`--sample-tokens` tokens, labels on every token.

Memory is measured on the process, not through Python (tracemalloc does not see torch's allocations and the
CPU allocator keeps no statistics): every point runs in a fresh subprocess, which builds the model and the
row, resets the kernel's peak-RSS mark (`/proc/self/clear_refs`), runs the step and reads `VmHWM`; peak memory
of the step = VmHWM − RSS before it. A point of the mask path whose estimate (the previous point's peak × the
square of the length ratio) exceeds `--mask-limit-gib` is skipped and says what it would need.

Target: the new path's bytes/token at 32K within 1.2× of its bytes/token at 2K (memory linear in L).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_point(length: int, path: str, sample_tokens: int) -> dict:
    """One forward+backward in this process; returns its peak bytes above the memory held before it."""
    import torch
    import torch.nn.functional as F

    from keyeflow.model.config import tiny
    from keyeflow.model.modeling import KeyeForConditionalGeneration

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = tiny()
    config.attention = "packed" if path == "new" else "mask"
    config.text_config.max_position_embeddings = max(length, config.text_config.max_position_embeddings)
    model = KeyeForConditionalGeneration(config).train()
    ids = torch.randint(0, config.image_token_id, (1, length))  # text ids, below the vision token ids
    starts = list(range(0, length, sample_tokens))
    sample_index = torch.cat([torch.full((min(sample_tokens, length - s),), k) for k, s in enumerate(starts)])
    positions = torch.cat([torch.arange(min(sample_tokens, length - s)) for s in starts])
    inputs = {
        "input_ids": ids,
        "sample_index": sample_index[None],
        "position_ids": positions[None, None].expand(3, 1, -1),
    }

    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    if path == "new":
        loss = -model(**inputs, logprob_labels=ids).token_logprobs.sum()
    else:
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
    loss.backward()
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    return {"peak_bytes": (peak - before) * 1024, "seconds": seconds}


def measure(length: int, path: str, sample_tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--point", f"{length},{path}", "--sample-tokens", str(sample_tokens)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    parser.add_argument("--sample-tokens", type=int, default=1024)
    parser.add_argument("--mask-limit-gib", type=float, default=6.0)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        length, path = args.point.split(",")
        print(json.dumps(run_point(int(length), path, args.sample_tokens)))
        return

    lengths = [int(v) for v in args.lengths.split(",")]
    print(f"one forward+backward, tiny widths, fp32, CPU, 1 thread, samples of {args.sample_tokens} tokens")
    print(f"{'L':>6} | {'new: peak MiB':>13} {'B/token':>8} {'s':>6} | {'mask: peak MiB':>14} {'B/token':>8} "
          f"{'s':>6} | mask/new")  # fmt: skip
    new_per_token, last_mask = {}, None
    for length in lengths:
        new = measure(length, "new", args.sample_tokens)
        new_per_token[length] = new["peak_bytes"] / length
        mib, seconds = new["peak_bytes"] / 2**20, new["seconds"]
        row = f"{length:>6} | {mib:>13.1f} {new_per_token[length]:>8.0f} {seconds:>6.2f} | "
        estimate = None if last_mask is None else last_mask[1] * (length / last_mask[0]) ** 2
        if estimate is not None and estimate > args.mask_limit_gib * 2**30:
            row += f"skipped (would need {estimate / 2**30:.0f} GB)"
        else:
            mask = measure(length, "mask", args.sample_tokens)
            last_mask = (length, mask["peak_bytes"])
            mib, per_token, seconds = mask["peak_bytes"] / 2**20, mask["peak_bytes"] / length, mask["seconds"]
            ratio = mask["peak_bytes"] / new["peak_bytes"]
            row += f"{mib:>14.1f} {per_token:>8.0f} {seconds:>6.2f} | {ratio:.1f}×"
        print(row, flush=True)
    first, last = lengths[0], lengths[-1]
    ratio = new_per_token[last] / new_per_token[first]
    verdict = "meets" if ratio <= 1.2 else "misses"
    print(f"new path bytes/token at {last} / at {first}: {ratio:.2f} ({verdict} the ≤ 1.2 target)")


if __name__ == "__main__":
    main()
