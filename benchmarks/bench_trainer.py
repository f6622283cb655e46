"""Our stage trainer vs a bare PyTorch loop: tokens/s on the same model and the same batches.

    python benchmarks/bench_trainer.py [--steps 12] [--skip 2] [--window 8] [--micro-batches 2]
                                       [--max-length 1024] [--image-tokens 256] [--repeats 3]

Data: the generated sample corpus (videos, images, text) → train_samples (images up to `--image-tokens`) → a
stage-2 mixture (video, image, text) of the samples that fit `--max-length`, in a temporary KEYEFLOW_HOME.
Model: the tiny recipe widened to "tiny but not trivial": LLM 4 layers × 256 (8 query / 4 KV heads of 32,
MLP 1024), ViT 4 layers × 128 (MLP 512), the shipped 4,096-token vocabulary; fp32, CPU.

- **bare**: the exact micro-batches the trainer trains on, read from Lance and collated beforehand, then a
  loop of forward (the model's mean loss / micro-batches), backward, clip, AdamW step, nothing else;
- **trainer**: `keyeflow.training.trainer.train` from the same initial weights: Lance reads and the processor
  inside the step, packing per the loader's plan, the token-weighted loss, metrics to MLflow and
  metrics.jsonl every step.

Throughput counts real (unpadded) tokens from the end of step `--skip` to the end of the last step, so
start-up (imports, model load, the loader's DuckDB planning) and the final checkpoint are left out; they are
printed apart. Runs alternate (bare, trainer, bare, trainer, …) so that load from other processes on the
machine falls on both; the best run of each is compared. Target: trainer ≥ 0.9 × bare.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_data(home: Path, max_length: int, image_tokens: int):
    from keyeflow.datasets import conversations, images, ingest, pretokenize, tables
    from keyeflow.datasets.images import ImageConfig
    from keyeflow.datasets.mixture import build_mixture, stage_mixture
    from keyeflow.datasets.slowfast import resolve_config
    from keyeflow.synthetic.corpus import generate_corpus
    from keyeflow.synthetic.images import generate_images
    from keyeflow.synthetic.videos import generate_videos

    media = home / "media"
    corpus = generate_corpus(
        media / "corpus", generate_videos(media / "videos"), generate_images(media / "images")
    )["conversations"].parent
    paper, image_config = resolve_config("paper"), ImageConfig(max_tokens=image_tokens)
    found = conversations.referenced_media([str(corpus)], str(media))
    ingest.ingest_shard(found["video"])
    pretokenize.pretokenize_shard(pretokenize.pending_videos(tables.ref("videos"), paper), paper)
    images.ingest_images_shard(found["image"], image_config)
    conversations.build_train_samples([str(corpus)], str(media), paper, image_config)
    config = stage_mixture(2, max_sample_tokens=max_length, upsample=True, max_repeats=4)
    return build_mixture(tables.ref("train_samples"), config, tables.ref("quarantine"))


def bench_model_config():
    from transformers import Qwen3Config

    from keyeflow.model.config import KeyeConfig, KeyeVisionConfig, tiny
    from keyeflow.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    ids = tiny(tokenizer)
    vision = KeyeVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_position_embeddings=16,
    )
    text = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return KeyeConfig(
        vision_config=vision,
        text_config=text,
        mrope_section=[4, 6, 6],
        image_token_id=ids.image_token_id,
        video_token_id=ids.video_token_id,
        vision_start_token_id=ids.vision_start_token_id,
        vision_end_token_id=ids.vision_end_token_id,
    )


def collated_steps(stage, mixture, mixture_id, pad_id):
    """The micro-batches `train` will see, collated, per step; and real tokens per step."""
    from keyeflow.datasets.sample_reader import LanceSampleReader
    from keyeflow.training.loader import MixtureLoader
    from keyeflow.training.trainer import micro_batch_inputs, tables_root, train_samples_of

    reader = LanceSampleReader(train_samples_of(mixture, mixture_id), root=tables_root(mixture))
    loader = MixtureLoader(
        mixture,
        mixture_id,
        rank=0,
        world_size=1,
        max_length=stage.max_length,
        micro_batches_per_step=stage.micro_batches_per_step,
        seed=stage.seed,
        sample_reader=reader,
        window_size=stage.window_size,
        num_epochs=None,
    )
    batches = iter(loader)
    steps, tokens = [], []
    for _ in range(stage.max_steps):
        mbs = [next(batches) for _ in range(stage.micro_batches_per_step)]
        steps.append([micro_batch_inputs(mb, pad_id, None) for mb in mbs])
        tokens.append(sum(mb.num_tokens for mb in mbs))
    return steps, tokens


def run_bare(stage, init: Path, steps) -> list[float]:
    """End time of every step."""
    import torch

    from keyeflow.model.checkpoint import load_keye_checkpoint

    model = load_keye_checkpoint(init).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, betas=stage.betas, weight_decay=0.0)
    ends = []
    for micro_batches in steps:
        for batch in micro_batches:
            if batch is not None:
                (model(**batch).loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the throughput")
    parser.add_argument("--window", type=int, default=8, help="samples per step")
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--image-tokens", type=int, default=256, help="largest image, in LLM tokens")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    os.environ["KEYEFLOW_HOME"] = str(home)
    import torch

    from keyeflow import lineage
    from keyeflow.model.modeling import KeyeForConditionalGeneration
    from keyeflow.training.config import StageConfig
    from keyeflow.training.engine import read_metrics
    from keyeflow.training.trainer import train

    started = time.perf_counter()
    built = build_data(home, args.max_length, args.image_tokens)
    print(
        f"data: mixture {built.mixture_id}, {built.report.num_rows} samples, "
        f"{built.report.reached_tokens:,} tokens ({time.perf_counter() - started:.1f} s)"
    )
    config = bench_model_config()
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(config)
    init = home / "init"
    model.save_pretrained(init)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    stage = StageConfig(
        name="bench",
        learning_rate=1e-3,
        max_steps=args.steps,
        max_length=args.max_length,
        window_size=args.window,
        micro_batches_per_step=args.micro_batches,
        schedule="constant",
        checkpoint_every=args.steps,
    )
    steps, tokens = collated_steps(
        stage, built.mixture, built.mixture_id, config.text_config.pad_token_id or 0
    )
    measured = sum(tokens[args.skip :])
    print(
        f"model: {num_params / 1e6:.1f}M parameters; {args.steps} steps of {args.window} samples, "
        f"{args.micro_batches} micro-batches, max_length {args.max_length}; {sum(tokens):,} tokens, "
        f"{measured:,} measured (steps {args.skip + 1}–{args.steps}); torch threads {torch.get_num_threads()}"
    )

    results: dict[str, list[float]] = {"bare": [], "trainer": []}
    for repeat in range(args.repeats):
        ends = run_bare(stage, init, steps)
        results["bare"].append(measured / (ends[-1] - ends[args.skip - 1]))

        out = home / f"trainer-{repeat}"
        run_id = lineage.start_run("bench-trainer")
        wall = time.perf_counter()
        train(
            stage,
            init=init,
            mixture=built.mixture,
            mixture_id=built.mixture_id,
            out_dir=out,
            sink=lineage.RunSink(run_id),
        )
        wall = time.perf_counter() - wall
        lineage.end_run(run_id)
        times = [m["time"] for m in read_metrics(out)]
        loop = times[-1] - times[args.skip - 1]
        results["trainer"].append(measured / loop)
        print(
            f"  run {repeat + 1}: bare {results['bare'][-1]:,.0f} tokens/s, trainer "
            f"{results['trainer'][-1]:,.0f} tokens/s (train() wall {wall:.1f} s, of which outside the "
            f"measured steps {wall - loop:.1f} s: start-up, warm-up steps, final checkpoint)"
        )

    bare, ours = max(results["bare"]), max(results["trainer"])
    print(f"\n{'':<10}{'tokens/s':>12}")
    print(f"{'bare':<10}{bare:>12,.0f}")
    print(f"{'trainer':<10}{ours:>12,.0f}")
    print(f"trainer / bare = {ours / bare:.3f}× (target ≥ 0.9×)")


if __name__ == "__main__":
    main()
