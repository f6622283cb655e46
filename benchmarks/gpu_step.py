"""One training step of the keye-8b widths on one GPU: does the packed path agree with the mask path, and what
does a step cost at 8K, 32K and 128K tokens (issue 14, "When a GPU machine is lent").

    python benchmarks/gpu_step.py [--lengths 8192,32768,131072] [--check-length 4096] [--sample-tokens 4096]
                                  [--warmup-steps 1] [--timed-steps 2]
    python benchmarks/gpu_step.py --smoke      # tiny widths, short rows, fp32; runs on a CPU in seconds

Model: `keye_8b()`'s widths (Qwen3-8B layers: hidden 4096, MLP 12288, 32/8 heads of 128, vocabulary 151,936;
SigLIP-400M layers) with 4 LLM and 4 ViT layers, bf16 weights, activation checkpointing "full", AdamW (fused
on CUDA). Rows: packed samples of `--sample-tokens` tokens, each a 448×448 image (32×32 patches, 256 LLM
tokens) between a question and an answer; the answer tokens are the labels; the loss is the trainer's
(chunked log-probs, `forward(logprob_labels=...)`).

Measurements, one JSON line each (and all of them in `$OUT/gpu_step.json` when `OUT` is set, rewritten after
each line so that a run cut short keeps what it measured):
- "setup": card, versions, parameter counts, the packed-attention kernel this machine picks;
- "agreement" at `--check-length`: each packed kernel against the dense mask path on one packed row: logits
  and loss (forward), and the gradients of every parameter (forward + backward); `agree` says whether they are
  within the dtype's tolerance (bf16: loss 1 %, mean |Δlogit| 2 % of mean |logit|, gradient norm 5 %);
- "step" per length: one forward + backward + AdamW step after `--warmup-steps` (flex compilation, optimizer
  state): seconds, tokens/s, peak memory (`torch.cuda.max_memory_allocated`) and what the weights, gradients
  and optimizer state hold before the step, model FLOPs and MFU (step, and forward + backward alone).

Model FLOPs per step (checkpointing's recomputation not counted, as MFU is defined): 6 × parameters × the
tokens each part sees (LLM layers: every token; lm_head: the labelled positions, all the chunked head
computes; ViT: patches; projector: merged tokens; embeddings: none) + attention: 6·n(n+1)·head_dim·heads per
LLM layer and causal segment of n tokens, 12·p²·head_dim·heads per ViT layer and frame of p patches. MFU
divides by the card's dense bf16 peak: 989 TFLOP/s for an H100 SXM or an H200 (756 for an H100 PCIe); none on
other devices.

Imports only torch and `keyeflow.model` (the GPU image has torch, transformers and tokenizers, none of the
platform's other dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers
from transformers import Qwen3Config

from keyeflow.model.config import KeyeConfig, KeyeVisionConfig, keye_8b, tiny
from keyeflow.model.modeling import (
    IGNORE_INDEX,
    KeyeForConditionalGeneration,
    count_parameters,
    mrope_position_ids,
)
from keyeflow.model.packed_attention import PACKED_KERNEL_ENV, packed_kernel

# Dense bf16 peak (TFLOP/s) by a fragment of `torch.cuda.get_device_name`, most specific first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0))
# Agreement tolerances by compute dtype: relative loss, mean |Δlogit| / mean |logit|, |Δgrad| / |grad|.
TOLERANCES = {
    torch.bfloat16: {"loss": 1e-2, "logits": 2e-2, "grads": 5e-2},
    torch.float32: {"loss": 1e-5, "logits": 1e-5, "grads": 1e-4},
}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS if fragment in name), None)


def model_config(smoke: bool) -> KeyeConfig:
    """keye-8b widths with 4 LLM and 4 ViT layers, or the tiny recipe (2 + 2 layers of 64) for --smoke."""
    if smoke:
        return tiny()
    full = keye_8b()
    text = full.text_config.to_dict()
    text.pop("layer_types", None)  # derived from the number of layers
    vision = full.vision_config.to_dict()
    return KeyeConfig(
        vision_config=KeyeVisionConfig(**{**vision, "num_hidden_layers": 4}),
        text_config=Qwen3Config(**{**text, "num_hidden_layers": 4, "max_position_embeddings": 131072}),
        mrope_section=full.mrope_section,
    )


def packed_row(config: KeyeConfig, length: int, sample_tokens: int, grid_side: int, seed: int) -> dict:
    """One row of `length` tokens: samples of `sample_tokens` (the last one shorter if need be), each
    question (16 text tokens), one image of grid_side × grid_side patches, answer (the rest, labelled)."""
    generator = torch.Generator().manual_seed(seed)
    merge = config.vision_config.spatial_merge_size
    num_image_tokens = (grid_side // merge) ** 2
    vision_ids = {
        "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
        "spatial_merge_size": merge,
    }  # fmt: skip
    ids, labels, index, positions, grids = [], [], [], [], []
    for sample, start in enumerate(range(0, length, sample_tokens)):
        n = min(sample_tokens, length - start)
        text = torch.randint(0, config.image_token_id, (n,), generator=generator)  # below the vision ids
        label = text.clone()
        sample_grids = []
        if n >= 16 + num_image_tokens + 2 + 1:
            image = [config.vision_start_token_id] + [config.image_token_id] * num_image_tokens
            text[16 : 16 + len(image) + 1] = torch.tensor([*image, config.vision_end_token_id])
            label[: 16 + len(image) + 1] = IGNORE_INDEX  # the question and the image are not trained
            sample_grids = [(1, grid_side, grid_side)]
        else:
            label[:16] = IGNORE_INDEX
        ids.append(text)
        labels.append(label)
        index.append(torch.full((n,), sample))
        positions.append(mrope_position_ids(text, sample_grids, **vision_ids))
        grids.extend(sample_grids)
    num_patches = len(grids) * grid_side * grid_side
    patch_dim = config.vision_config.patch_dim
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "sample_index": torch.cat(index)[None],
        "position_ids": torch.cat(positions, dim=1)[:, None],
        "pixel_values": torch.randint(
            0, 256, (num_patches, patch_dim), dtype=torch.uint8, generator=generator
        ),
        "grid_thw": torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
    }


def to_device(row: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in row.items()}


def step_loss(model: KeyeForConditionalGeneration, row: dict) -> torch.Tensor:
    """The trainer's loss: mean next-token NLL over the labels, through the chunked head."""
    inputs = {k: v for k, v in row.items() if k != "labels"}
    logps = model(**inputs, logprob_labels=row["labels"]).token_logprobs
    return -logps.sum() / (row["labels"][:, 1:] != IGNORE_INDEX).sum()


def model_flops(config: KeyeConfig, counts: dict, row: dict) -> float:
    text, vision = config.text_config, config.vision_config
    tokens = row["input_ids"].numel()
    scored = int((row["labels"][:, 1:] != IGNORE_INDEX).sum())
    patches = int(row["grid_thw"].prod(dim=1).sum()) if row["grid_thw"].numel() else 0
    merged = patches // vision.spatial_merge_size**2
    embed = text.vocab_size * text.hidden_size
    pos_embed = vision.num_position_embeddings * vision.hidden_size
    flops = 6 * (counts["language_model"] - embed) * tokens + 6 * counts["lm_head"] * scored
    flops += 6 * (counts["vision"] - pos_embed) * patches + 6 * counts["projector"] * merged
    _, lengths = row["sample_index"][0].unique_consecutive(return_counts=True)
    per_layer = sum(6 * n * (n + 1) for n in lengths.tolist()) * text.head_dim * text.num_attention_heads
    flops += per_layer * text.num_hidden_layers
    frames = [int(h * w) for _, h, w in row["grid_thw"].tolist()]
    per_vit_layer = sum(12 * p * p for p in frames) * vision.head_dim * vision.num_attention_heads
    return float(flops + per_vit_layer * vision.num_hidden_layers)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(model, row: dict, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Each packed kernel this device runs against the mask path: forward logits/loss and all gradients."""

    def run(path: str, kernel: str | None) -> dict:
        model.config.attention = path
        if kernel is None:
            os.environ.pop(PACKED_KERNEL_ENV, None)
        else:
            os.environ[PACKED_KERNEL_ENV] = kernel
        inputs = {k: v for k, v in row.items() if k != "labels"}
        with torch.no_grad():
            out = model(**inputs, labels=row["labels"])
        model.zero_grad(set_to_none=True)
        step_loss(model, row).backward()
        grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        os.environ.pop(PACKED_KERNEL_ENV, None)
        model.config.attention = "packed"
        return {"logits": out.logits.float(), "loss": float(out.loss), "grads": grads}

    probe = torch.zeros(1, 1, 1, 1, device=device, dtype=dtype)
    kernels = [packed_kernel(probe)]
    if kernels[0] != "sdpa_loop":
        kernels.append("sdpa_loop")  # the CPU path, run here too: its gradients check the GPU kernel's
    reference = run("mask", None)
    real = row["sample_index"][0] >= 0
    tolerance = TOLERANCES[dtype]
    records = []
    for kernel in kernels:
        got = run("packed", kernel)
        logits_diff = (got["logits"][0, real] - reference["logits"][0, real]).abs()
        result = {
            "loss_rel_diff": abs(got["loss"] - reference["loss"]) / abs(reference["loss"]),
            "logits_rel_mean_diff": float(logits_diff.mean() / reference["logits"][0, real].abs().mean()),
            "logits_max_abs_diff": float(logits_diff.max()),
            "grads_rel_diff": float((got["grads"] - reference["grads"]).norm() / reference["grads"].norm()),
        }
        checks = {"loss_rel_diff": "loss", "logits_rel_mean_diff": "logits", "grads_rel_diff": "grads"}
        agree = all(result[name] <= tolerance[key] for name, key in checks.items())
        records.append({
            "measure": "agreement", "length": row["input_ids"].shape[1], "kernel": kernel,
            "reference": "mask", "loss": got["loss"], "reference_loss": reference["loss"], **result,
            "tolerance": tolerance, "agree": agree,
        })  # fmt: skip
        del got
    del reference
    return records


def timed_step(model, optimizer, row: dict, device: torch.device) -> tuple[float, float]:
    """(forward + backward seconds, whole step seconds) of one step."""
    synchronize(device)
    start = time.perf_counter()
    loss = step_loss(model, row)
    loss.backward()
    synchronize(device)
    backward_done = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return backward_done - start, time.perf_counter() - start


def measure_step(model, optimizer, config, counts, row: dict, args, device: torch.device) -> dict:
    length = row["input_ids"].shape[1]
    record = {
        "measure": "step",
        "length": length,
        "kernel": None,
        "samples": int(row["sample_index"].max()) + 1,
    }
    probe = torch.zeros(1, 1, 1, 1, device=device, dtype=next(model.parameters()).dtype)
    record["kernel"] = packed_kernel(probe)
    try:
        for _ in range(args.warmup_steps):
            timed_step(model, optimizer, row, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            record["model_state_bytes"] = torch.cuda.memory_allocated(device)  # weights + optimizer state
            torch.cuda.reset_peak_memory_stats(device)
        times = [timed_step(model, optimizer, row, device) for _ in range(args.timed_steps)]
    except torch.OutOfMemoryError as error:
        optimizer.zero_grad(set_to_none=True)
        return {**record, "error": "out of memory", "detail": str(error).splitlines()[0]}
    fwd_bwd = sum(t[0] for t in times) / len(times)
    step = sum(t[1] for t in times) / len(times)
    flops = model_flops(config, counts, row)
    peak = peak_tflops(device)
    record.update({
        "step_s": step, "fwd_bwd_s": fwd_bwd, "tokens_per_s": length / step, "model_flops": flops,
        "achieved_tflops": flops / step / 1e12,
        "mfu": None if peak is None else flops / step / (peak * 1e12),
        "mfu_fwd_bwd": None if peak is None else flops / fwd_bwd / (peak * 1e12),
    })  # fmt: skip
    if device.type == "cuda":
        record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        record["peak_memory_gib"] = record["peak_memory_bytes"] / 2**30
    return record


class Report:
    """Prints each record as one JSON line and keeps `$OUT/gpu_step.json` (a JSON list) up to date."""

    def __init__(self):
        out = os.environ.get("OUT")
        self.path = Path(out) / "gpu_step.json" if out else None
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)
        print(json.dumps(record), flush=True)
        if self.path is not None:
            self.path.write_text(json.dumps(self.records, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths, short rows, fp32 (runs on a CPU)")
    parser.add_argument("--lengths", help="row lengths of the step measurements (default 8192,32768,131072)")
    parser.add_argument("--check-length", type=int, help="row length of the agreement check (default 4096)")
    parser.add_argument("--sample-tokens", type=int, help="tokens per packed sample (default 4096)")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=2)
    args = parser.parse_args()
    smoke = args.smoke
    lengths = [int(v) for v in (args.lengths or ("256,512" if smoke else "8192,32768,131072")).split(",")]
    check_length = args.check_length or (256 if smoke else 4096)
    sample_tokens = args.sample_tokens or (128 if smoke else 4096)
    grid_side = 4 if smoke else 32

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    config = model_config(smoke)
    with torch.device(device):
        model = KeyeForConditionalGeneration(config)
    model = model.to(dtype).train()
    model.set_activation_checkpointing("full")
    counts = count_parameters(model)
    report = Report()
    probe = torch.zeros(1, 1, 1, 1, device=device, dtype=dtype)
    report.add({
        "measure": "setup", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak_tflops(device), "torch": torch.__version__,
        "transformers": transformers.__version__, "dtype": str(dtype).removeprefix("torch."),
        "activation_checkpointing": "full", "llm_layers": config.text_config.num_hidden_layers,
        "vit_layers": config.vision_config.num_hidden_layers, "parameters": counts,
        "packed_kernel": packed_kernel(probe), "sample_tokens": sample_tokens, "image_patches": grid_side**2,
    })  # fmt: skip

    # The check row packs several samples even where the step rows use long ones.
    check = packed_row(config, check_length, min(sample_tokens, check_length // 4), grid_side, seed=1)
    for record in agreement(model, to_device(check, device), device, dtype):
        report.add(record)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, **fused)
    for length in lengths:
        row = to_device(packed_row(config, length, sample_tokens, grid_side, seed=length), device)
        report.add(measure_step(model, optimizer, config, counts, row, args, device))
        del row
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
