"""Our GSPO update vs TRL's (GRPO with importance_sampling_level="sequence"), same model, same rollouts.

    python benchmarks/bench_gspo.py [--prompts 8] [--group 8] [--prompt-length 64] [--completion-length 192]
                                    [--hidden 256] [--layers 4] [--repeats 5] [--device cpu]

One update = forward log-probs of every rollout's completion tokens + the GSPO loss + backward; generation,
rewards and the optimizer step are left out (they are the same work on both sides). The batch is `--prompts`
prompts × `--group` rollouts of random token ids: prompts left-padded to 50–100% of `--prompt-length`,
completions right-padded to 10–100% of `--completion-length`; rewards are 0/1 at random, behaviour-policy
log-probs are the current ones plus N(0, 3e-3) noise per token, so both sides clip some responses.

- **ours**: `model(input_ids, attention_mask, logits_to_keep=C + 1)`,
  `keyeflow.training.losses.token_logprobs` on the completion positions, `group_advantages`, `gspo_loss`;
- **TRL**: TRL's own code path: `add_fused_lm_head(model, outputs=("log_probs", "entropy"))` as
  `GRPOTrainer.__init__` installs it, then `GRPOTrainer._compute_loss` (which calls TRL's
  `_get_per_token_logps_and_entropies`) with `importance_sampling_level="sequence"`, `loss_type="grpo"`,
  ε = 3e-4 / 4e-4, β = 0. A full `GRPOTrainer` needs a dataset, reward functions and generation, so the two
  methods are called unbound on a stand-in trainer that holds only the attributes they read (the accelerator
  reduced to one process). TRL's path always computes per-token entropy (its GRPO logs it), and off Triton
  (CPU) its fused head scores every position in tiles rather than only the completion.

The model is a tiny `Qwen3ForCausalLM` (the Keye LLM's architecture) built from a config with the shipped
4,096-token vocabulary; keyeflow's `KeyeForConditionalGeneration` cannot take TRL's fused head (it has no
separate base model to call, and computes mRoPE positions from the ids). fp32. Both sides start from the same
weights; their losses are printed to show they agree. Runs alternate (ours, TRL, ours, …) so that load from
other processes falls on both; the best of each is compared.

The backbone (embedding + decoder layers, forward and backward) is the same work on both sides and dominates a
whole update of a small model on a CPU, so a second table times only what differs: from fixed final hidden
states (a leaf tensor), the LM head on the completion positions, the token log-probs, the loss and the
backward to the hidden states. TRL's side there runs the same fused head and `_compute_loss`, on a stand-in
model whose `base_model` returns those hidden states.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keyeflow.training.losses import GSPOConfig, group_advantages, gspo_loss, token_logprobs

EPS_LOW, EPS_HIGH = 3e-4, 4e-4
GSPO = GSPOConfig(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)


def build_model(vocab_size: int, hidden: int, layers: int, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(hidden // 32, 1)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).to(device).train()


def build_batch(args, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded prompts, right-padded completions (the layout TRL's GRPO uses), advantages, ratio noise."""
    gen = torch.Generator().manual_seed(1)
    n, p, c = args.prompts * args.group, args.prompt_length, args.completion_length
    prompt_lengths = torch.randint(p // 2, p + 1, (args.prompts,), generator=gen).repeat_interleave(
        args.group
    )
    completion_lengths = torch.randint(max(c // 10, 1), c + 1, (n,), generator=gen)
    prompt_mask = (torch.arange(p)[None, :] >= p - prompt_lengths[:, None]).long()
    completion_mask = (torch.arange(c)[None, :] < completion_lengths[:, None]).long()
    prompt_ids = torch.randint(1, vocab_size, (n, p), generator=gen) * prompt_mask  # pad id 0
    completion_ids = torch.randint(1, vocab_size, (n, c), generator=gen) * completion_mask
    rewards = torch.randint(0, 2, (args.prompts, args.group), generator=gen).float()
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": group_advantages(rewards).flatten(),
        "noise": torch.randn(n, c, generator=gen) * 3e-3,
    }
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
        "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
    }


def our_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    c = batch["completion_ids"].shape[1]
    # logits_to_keep = C + 1: the LM head runs only on the last prompt position and the completion; the logit
    # at position t scores token t + 1, so the last one (after the final token) is dropped.
    logits = model(**model_inputs(batch), logits_to_keep=c + 1).logits[:, :-1]
    return token_logprobs(logits, batch["completion_ids"])


def our_loss(logps: torch.Tensor, batch, old_logps) -> tuple[float, float]:
    out = gspo_loss(GSPO, logps, batch["advantages"], batch["completion_mask"].bool(), old_logps=old_logps)
    out.loss.backward()
    return out.loss.item(), out.clip_fraction.item()


class OneProcessAccelerator:
    """The `accelerator` calls TRL's two methods make, for one process."""

    is_main_process = True
    num_processes = 1

    def __init__(self, device: torch.device):
        self.device = device

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return contextlib.nullcontext()


def trl_trainer(device: torch.device):
    """A stand-in GRPOTrainer holding what `_compute_loss` and `_get_per_token_logps_and_entropies` read, set
    to TRL's GSPO: sequence-level importance sampling, the "grpo" reduction, the paper's ε, no KL."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = types.SimpleNamespace(
        accelerator=OneProcessAccelerator(device), model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="sequence", beta=0.0, loss_type="grpo", epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH, args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False),
        use_vllm=False, current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    trainer._get_per_token_logps_and_entropies = types.MethodType(
        GRPOTrainer._get_per_token_logps_and_entropies, trainer
    )

    def update(model, batch, old_logps) -> tuple[float, float]:
        inputs = {
            k: batch[k]
            for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
        }
        inputs["old_per_token_logps"] = old_logps
        loss = GRPOTrainer._compute_loss(trainer, model, inputs)
        loss.backward()
        return loss.item(), trainer._metrics["train"]["clip_ratio/region_mean"][-1]

    return update


class FixedBackbone(torch.nn.Module):
    """Returns the given final hidden states whatever it is called with (the head-only timing)."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return types.SimpleNamespace(last_hidden_state=self.hidden)


class HeadOnly(torch.nn.Module):
    """Just enough of a causal LM for TRL's `add_fused_lm_head`: a config, a backbone, an output embedding."""

    def __init__(self, config, lm_head: torch.nn.Linear):
        super().__init__()
        self.config = config
        self.base_model = FixedBackbone()
        self.lm_head = lm_head

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head

    def forward(self, *args, **kwargs):
        raise NotImplementedError("only the fused-head path (fused_lm_head=True) is used")


def best_of(runs: dict, repeats: int, device: torch.device) -> tuple[dict[str, list[float]], dict]:
    """Alternating timed runs after one warm-up each: seconds per run and each side's last result."""

    def timed(setup, fn):
        setup()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    for setup, fn in runs.values():  # warm-up: allocator, kernels, lazy imports
        timed(setup, fn)
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):
        for name, (setup, fn) in runs.items():
            elapsed, results[name] = timed(setup, fn)
            times[name].append(elapsed)
    return times, results


def report(title: str, times: dict[str, list[float]], results: dict, tokens: int, grad_diff: float) -> None:
    print(f"\n{title}")
    print(
        f"  loss: ours {results['ours'][0]:.9f}, TRL {results['TRL'][0]:.9f}; clipped responses: ours "
        f"{results['ours'][1]:.3f}, TRL {results['TRL'][1]:.3f}; gradient relative difference {grad_diff:.1e}"
    )
    print(f"  {'':<6}{'best ms':>10}{'median ms':>11}{'tokens/s':>11}")
    for name, values in times.items():
        values = sorted(values)
        print(
            f"  {name:<6}{values[0] * 1e3:>10.1f}{values[len(values) // 2] * 1e3:>11.1f}"
            f"{tokens / values[0]:>11,.0f}"
        )
    print(f"  TRL / ours time = {min(times['TRL']) / min(times['ours']):.2f}× (> 1: ours is faster)")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8, help="rollouts per prompt (G)")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from trl.trainer.utils import add_fused_lm_head

    from keyeflow.model.tokenizer import load_tokenizer

    device = torch.device(args.device)
    vocab_size = len(load_tokenizer())
    ours_model = build_model(vocab_size, args.hidden, args.layers, device)
    trl_model = copy.deepcopy(ours_model)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy"))  # what GRPOTrainer.__init__ installs
    batch = build_batch(args, vocab_size, device)
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        old_logps = torch.where(mask, our_logps(ours_model, batch) + batch["noise"], 0.0)
    trl_update = trl_trainer(device)

    n, tokens = args.prompts * args.group, int(mask.sum())
    params = sum(p.numel() for p in ours_model.parameters())
    print(
        f"model: Qwen3 {args.layers} layers × {args.hidden}, vocab {vocab_size}, "
        f"{params / 1e6:.1f}M parameters; "
        f"{device}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"batch: {args.prompts} prompts × {args.group} rollouts = {n} responses, "
        f"prompt ≤ {args.prompt_length}, "
        f"completion ≤ {args.completion_length}; {tokens:,} completion tokens; {args.repeats} timed runs each"
    )

    # The whole update: backbone + head + log-probs + loss + backward to every parameter.
    runs = {
        "ours": (
            lambda: ours_model.zero_grad(set_to_none=True),
            lambda: our_loss(our_logps(ours_model, batch), batch, old_logps),
        ),
        "TRL": (
            lambda: trl_model.zero_grad(set_to_none=True),
            lambda: trl_update(trl_model, batch, old_logps),
        ),
    }
    times, results = best_of(runs, args.repeats, device)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (ours_model, trl_model)]
    report(
        "whole update (forward log-probs, loss, backward)",
        times,
        results,
        tokens,
        relative_difference(grads[0], grads[1]),
    )

    # Only what differs: head, log-probs, loss, backward to fixed final hidden states.
    with torch.no_grad():
        hidden = ours_model.model(**model_inputs(batch)).last_hidden_state
    c = batch["completion_ids"].shape[1]
    leaves = {"ours": hidden.clone(), "TRL": hidden.clone()}
    head_only = HeadOnly(trl_model.config, trl_model.lm_head)
    add_fused_lm_head(head_only, outputs=("log_probs", "entropy"))

    def reset(name):
        leaves[name] = leaves[name].detach().requires_grad_(True)
        if name == "TRL":
            head_only.base_model.hidden = leaves[name]

    def ours_head():
        logits = ours_model.lm_head(leaves["ours"][:, -(c + 1) : -1])
        return our_loss(token_logprobs(logits, batch["completion_ids"]), batch, old_logps)

    runs = {
        "ours": (lambda: reset("ours"), ours_head),
        "TRL": (lambda: reset("TRL"), lambda: trl_update(head_only, batch, old_logps)),
    }
    times, results = best_of(runs, args.repeats, device)
    report(
        "LM head + log-probs + loss + backward, from fixed hidden states",
        times,
        results,
        tokens,
        relative_difference(leaves["ours"].grad, leaves["TRL"].grad),
    )


if __name__ == "__main__":
    main()
