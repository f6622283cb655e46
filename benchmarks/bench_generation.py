"""`LocalGenerator.generate` decoding all conversations together against the same conversations sampled one
after another (`generate_one` each with its derived seed: what `generate` did before), in one process.

    python benchmarks/bench_generation.py [--size tiny|small] [--conversations 16] [--n 4]
                                          [--max-new-tokens 8] [--repeats 3] [--threads N]

Prompts are short questions of different lengths (so the batched cache pads every row by a different
amount). Both ways are timed `--repeats` times after one warm-up each; the fastest run of each is printed
with the ratio, and the completions' token ids are checked to be the same both ways. `--size tiny` is the
test model (LLM 2 layers × 64); `small` is LLM 4 × 256 (as benchmarks/bench_rl_step.py). fp32, CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from keyeflow.model.config import tiny
from keyeflow.model.generation import LocalGenerator, conversation_seed
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.tokenizer import load_tokenizer

WORDS = [
    "how",
    "many",
    "apples",
    "are",
    "on",
    "the",
    "table",
    "and",
    "why",
    "is",
    "the",
    "sky",
    "blue",
    "in",
    "the",
    "late",
    "afternoon",
    "light",
]


def build_model(size: str, tokenizer) -> KeyeForConditionalGeneration:
    config = tiny(tokenizer)
    if size == "small":
        text = config.text_config
        text.hidden_size, text.intermediate_size, text.num_hidden_layers = 256, 1024, 4
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = 8, 4, 32
        config.mrope_section = [4, 6, 6]
    torch.manual_seed(0)
    return KeyeForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    generator = LocalGenerator(build_model(args.size, tokenizer), tokenizer)
    batch = [
        [{"role": "user", "content": " ".join(WORDS[: 3 + i % len(WORDS)]) + f"? ({i})"}]
        for i in range(args.conversations)
    ]
    sampling = {"n": args.n, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "logprobs": True}
    seed = 7

    def one_after_another():
        return [generator.generate_one(m, seed=conversation_seed(seed, m), **sampling) for m in batch]

    def together():
        return generator.generate(batch, seed=seed, **sampling)

    timings = {}
    results = {}
    for name, run in (("one_after_another", one_after_another), ("together", together)):
        run()  # warm-up: torch's lazy initialisation
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[name] = run()
            times.append(time.perf_counter() - start)
        timings[name] = min(times)
    same = [[c.token_ids for c in group] for group in results["one_after_another"]] == [
        [c.token_ids for c in group] for group in results["together"]
    ]
    print(
        f"generate {args.conversations} conversations x n={args.n} x {args.max_new_tokens} new tokens "
        f"({args.size}, {torch.get_num_threads()} threads): one after another "
        f"{timings['one_after_another']:.3f} s, together {timings['together']:.3f} s, "
        f"{timings['one_after_another'] / timings['together']:.1f}x faster; same token ids: {same}"
    )


if __name__ == "__main__":
    main()
