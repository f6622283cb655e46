"""Can the tiny model learn to be a reference-guided judge? A measurement behind the README's issue-16 notes.

It fine-tunes the tiny model (a checkpoint, or a fresh random one) on a reward-model target for prompts made
of a reference answer and two one-token responses, and prints every 100 steps the training accuracy of the
A/B label tokens (the A-vs-B logit wherever the target has one):

- `--pairs wrong`: the rejected response is another well-formed answer (a wrong count or colour), so the
  verdict needs "which response equals the reference", a comparison of two tokens at two places;
- `--pairs garbled`: the rejected response is malformed text, so the verdict can be read off one response
  alone;
- `--target verdict`: the reference first, the responses after it, and the verdict line alone as the target
  (the reward model's no_think target before it restated the reference);
- `--target restated`: the responses first, the reference last, and the target the reward model writes now
  (`keyeflow.quality.reward_model.reference_line`, then the verdict line): it restates the reference and
  names the response that gives it, a look-up instead of a comparison.

The prompts are short text (no picture, no instructions) so that what is measured is the judgement itself.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import collate, encode_sample
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.quality.reward_model import reference_line

ANSWERS = [str(i) for i in range(1, 13)] + ["red", "blue", "green", "yellow", "purple"]
GARBLED = ["zq xv", "the the the", "<answer>", "??", "Ãĥ kk", "12 red 3 blue"]


def conversation(rng: random.Random, pairs: str, target: str, tokenizer) -> object:
    reference = rng.choice(ANSWERS)
    other = rng.choice(GARBLED if pairs == "garbled" else [a for a in ANSWERS if a != reference])
    chosen_first = rng.random() < 0.5
    a, b = (reference, other) if chosen_first else (other, reference)
    verdict = "A" if chosen_first else "B"
    responses = f"Response A:\n{a}\n\nResponse B:\n{b}"
    if target == "verdict":
        messages = [
            {"role": "user", "content": f"Reference answer:\n{reference}\n\n{responses}"},
            {"role": "assistant", "content": f"Verdict: {verdict}"},
        ]
    else:  # garbled answers never equal the reference: the chosen response is the one that gives it
        messages = [
            {"role": "user", "content": f"{responses}\n\nReference answer:\n{reference}"},
            {"role": "assistant", "content": f"{reference_line(reference, verdict)}\nVerdict: {verdict}"},
        ]
    return encode_sample(messages, tokenizer, None, spatial_merge_size=2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", choices=("wrong", "garbled"), required=True)
    parser.add_argument("--target", choices=("verdict", "restated"), required=True)
    parser.add_argument("--checkpoint", help="a model directory (default: a fresh random tiny model)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    model = (
        load_keye_checkpoint(args.checkpoint)
        if args.checkpoint
        else KeyeForConditionalGeneration(tiny(tokenizer))
    )
    id_a, id_b = (tokenizer.encode(f" {v}", add_special_tokens=False)[-1] for v in ("A", "B"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng, right, started = random.Random(0), [], time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        batch = collate(
            [conversation(rng, args.pairs, args.target, tokenizer) for _ in range(args.batch)], pack=True
        )
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            labels, logits = batch["labels"][:, 1:], out.logits[:, :-1]
            at = (labels == id_a) | (labels == id_b)
            said_b = logits[at][:, id_b] > logits[at][:, id_a]
            right.append(float((said_b == (labels[at] == id_b)).float().mean()))
        if step % 100 == 0:
            print(
                f"{args.pairs} pairs, {args.target} target, step {step}: "
                f"label accuracy over the last 100 steps "
                f"{sum(right[-100:]) / 100:.3f}, loss {out.loss.item():.4f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
