"""Does a checkpoint tell the two A/B orders of a reward-model pair apart? A measurement behind the README's
note on why the tiny reward model stays at chance.

For the first `--pairs` training answer pairs of a home (the pairs post-training's reward model trains on), it
builds the reward model's no_think conversations in both orders (`build_reward_model_data`), runs the
checkpoint on each, and takes, per LLM layer, the hidden state at the position that predicts the giver (the
first target token where the orders differ: `Response A's` / `Response B's`). It prints how well a linear
probe fitted on the first half of the pairs reads the giver off those states on the other half (0.5: the
information a verdict needs is not there to read linearly), and the mean cosine similarity of a pair's two
orders after centring the states. `--no-query` keeps only the responses and the reference in the prompt.

    KEYEFLOW_HOME=HOME python scripts/reward_model_order_similarity.py CHECKPOINT_MODEL_DIR HOME/samples
"""

from __future__ import annotations

import argparse

import torch

from keyeflow.model.processor import collate, encode_sample
from keyeflow.quality import reward_model as rm
from keyeflow.steps.posttrain import heldout_items
from keyeflow.steps.posttrain_job import local_generator
from keyeflow.training.heldout import answer_pairs


def responses_and_reference_only(task_definition, query, a, b, mode, config=None, *, reference=None):
    shown = rm.reference_text(reference)
    text = f"Response A:\n{a}\n\nResponse B:\n{b}\n\nReference answer:\n{shown}\n\n/{mode}"
    return [{"role": "user", "content": text}]


def probe_rightness(x_train: torch.Tensor, y_train: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """A logistic-regression probe fitted on (x_train, y_train): 1 where it labels a row of x as y, else 0."""
    probe = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(probe(x_train).squeeze(1), y_train)
        value = value + 1e-3 * probe.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return ((probe(x).squeeze(1) > 0).float() == y).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint's model folder")
    parser.add_argument("samples", help="the home's samples folder (its tasks/train question files)")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--no-query", action="store_true")
    args = parser.parse_args()

    items = heldout_items([f"{args.samples}/tasks/train"], args.samples, "no_think")
    pairs = answer_pairs(items)[: args.pairs]
    if args.no_query:
        rm.build_prompt = responses_and_reference_only  # read by build_reward_model_data at call time
    config = rm.RewardModelConfig(mode="no_think", train_modes=("no_think",))
    conversations, _ = rm.build_reward_model_data(pairs, config, modes=("no_think",))
    generator = local_generator(args.checkpoint)
    model = generator.model.eval()
    merge = model.config.vision_config.spatial_merge_size
    layers = [m for m in model.modules() if type(m).__name__ == "Qwen3DecoderLayer"]

    def states(conversation: dict) -> tuple[list[torch.Tensor], list[int]]:
        encoded = encode_sample(
            conversation["messages"], generator.tokenizer, generator.media_lookup, spatial_merge_size=merge
        )
        batch = collate([encoded], pack=False, pad_token_id=0)
        caught: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_hook(
                lambda _m, _i, out: caught.append(out[0] if isinstance(out, tuple) else out)
            )
            for layer in layers
        ]
        try:
            with torch.no_grad():
                model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            for hook in hooks:
                hook.remove()
        return [c[0] if c.dim() == 3 else c for c in caught], batch["input_ids"][0].tolist()

    features: list[list[torch.Tensor]] = [[] for _ in layers]
    labels: list[float] = []
    # build_reward_model_data writes each pair's two orders one after the other
    for first, second in zip(conversations[0::2], conversations[1::2]):
        assert first["pair_id"] == second["pair_id"] and first["order"] != second["order"]
        (hidden_a, ids_a), (hidden_b, ids_b) = states(first), states(second)
        target = len(generator.tokenizer(first["messages"][-1]["content"])["input_ids"])
        # counted from the end: the farthest-back differing token within the target is the giver
        back = max(t for t in range(1, target + 3) if ids_a[-t] != ids_b[-t])
        for k in range(len(layers)):
            features[k] += [hidden_a[k][len(ids_a) - back - 1], hidden_b[k][len(ids_b) - back - 1]]
        labels += [1.0 if first["verdict"] == "A" else 0.0, 1.0 if second["verdict"] == "A" else 0.0]
    y = torch.tensor(labels)
    half = len(labels) // 4 * 2  # whole pairs on each side: a pair's two orders never straddle the split
    for k, rows in enumerate(features):
        x = torch.stack(rows).float()
        x = (x - x[:half].mean(0)) / (x[:half].std(0) + 1e-6)
        centred = x - x.mean(0)
        a_b = torch.nn.functional.cosine_similarity(centred[0::2], centred[1::2], dim=1).mean().item()
        right = probe_rightness(x[:half], y[:half], x, y)
        print(
            f"layer {k}: which response gives the reference, read off linearly: "
            f"train {right[:half].mean():.3f}, held-out pairs {right[half:].mean():.3f}; "
            f"centred cosine of a pair's two orders {a_b:.3f} "
            f"({len(labels) // 2} pairs)"
        )


if __name__ == "__main__":
    main()
