"""Ulysses sequence parallelism on 2 real gloo ranks against one process (issue 15): packed multimodal rows
(text + image + a Slow/Fast video, a sample crossing the ranks' boundary, L odd so the last slice is
padded) give the same gathered logits, loss, token log-probs and, summed over the group, the same gradient
of every parameter; the ViT split over the group by frame cost gives the same embeddings and gradients (a
rank with no frame included); KV heads fewer than the group are repeated correctly.

The ranks are two processes spawned by a module fixture; the one-process reference runs in the test process
meanwhile.
"""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from keyeflow.datasets.pretokenize import patchify
from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches, collate_rows, encode_sample
from keyeflow.model.sequence_parallel import SequenceParallel, sequence_parallel_mesh, vision_assignment
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.training.balance import CostModel

PATCH, MERGE = 14, 2
WORLD = 2
TOLERANCE = 1e-5


def frame(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def chat(media: MediaPatches, question: str, answer: str) -> list[dict]:
    kind = media.kind
    content = [{"type": kind, kind: "x", "media": media}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def batches(tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """ "rows": two packed rows (text + image + Slow/Fast video; video + text, right-padded), L odd;
    "image": one image alone (one frame: the second rank encodes nothing)."""
    image = MediaPatches(patchify(frame(56, 84, 1), PATCH, MERGE), [(1, 4, 6)])
    sizes = [(56, 56), (28, 56), (56, 56), (28, 56)]
    video = MediaPatches(
        np.concatenate([patchify(frame(h, w, 10 + i), PATCH, MERGE) for i, (h, w) in enumerate(sizes)]),
        [(1, h // PATCH, w // PATCH) for h, w in sizes],
        frame_types=[0, 1, 0, 1], timestamps=[0.0, 0.5, 1.0, 1.5], slow_tokens=4, fast_tokens=2,
    )  # fmt: skip
    lookup = lambda part: part["media"]
    text = encode_sample("Plain text for the language model, a few words long.", tokenizer)
    pictured = encode_sample(chat(image, "What is shown?", "A noisy picture."), tokenizer, lookup)
    filmed = encode_sample(chat(video, "What happens?", "Frames change over time."), tokenizer, lookup)
    rows = collate_rows([[text, pictured, filmed], [filmed, text]])
    if rows["input_ids"].shape[1] % WORLD == 0:  # keep L odd: the last rank's slice then ends in padding
        rows = collate_rows([[text, pictured, filmed, text], [filmed, text]])
    return {"rows": rows, "image": collate_rows([[pictured]])}


def make_model(config, seed: int = 0) -> KeyeForConditionalGeneration:
    torch.manual_seed(seed)
    return KeyeForConditionalGeneration(config).train()


def one_kv_head(config):
    config.text_config.num_key_value_heads = 1
    return config


def gradients(model, sp: SequenceParallel | None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, summed over the sequence group (the trainer sums gradients over ranks)."""
    grads = {}
    for name, p in model.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        if sp is not None:
            dist.all_reduce(grad, group=sp.group)
        grads[name] = grad
    model.zero_grad(set_to_none=True)
    return grads


def model_outputs(model, batch, sp: SequenceParallel | None) -> dict:
    """Logits, loss and its gradients; token log-probs (the trainer's path) and their gradients, with every
    layer checkpointed (the recomputation repeats the all-to-alls in the backward)."""
    model.set_sequence_parallel(sp)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.zero_grad(set_to_none=True)
    seen = []  # tokens per row that this rank's first decoder layer runs on
    model.language_model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    out = model(**inputs, labels=batch["labels"])
    out.loss.backward()
    result = {
        "loss": out.loss.detach(), "logits": out.logits.detach(), "loss_grads": gradients(model, sp),
        "local_length": seen[0],
    }  # fmt: skip
    model.set_activation_checkpointing("full")
    logps = model(**inputs, logprob_labels=batch["labels"]).token_logprobs
    model.set_activation_checkpointing("off")
    (-logps.sum()).backward()
    result |= {"token_logprobs": logps.detach(), "logprob_grads": gradients(model, sp)}
    return result


def vision_outputs(model, batch, sp: SequenceParallel | None) -> dict:
    """ViT + projector embeddings of the batch's grids, and the gradients of a fixed linear loss on them
    (each of the n ranks backpropagates 1/n of it: the gathered embeddings are the same on every rank)."""
    model.set_sequence_parallel(sp)
    encoded = [0]  # patches this rank's ViT runs on
    model.vision.register_forward_pre_hook(lambda _, args: encoded.append(args[0].shape[0]))
    embeddings = model.get_vision_embeddings(batch["pixel_values"], batch["grid_thw"])
    weights = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(1))
    ((embeddings * weights).sum() / (1 if sp is None else sp.size)).backward()
    return {"embeddings": embeddings.detach(), "grads": gradients(model, sp), "patches": sum(encoded)}


def run_all(sp: SequenceParallel | None) -> dict:
    tokenizer = load_tokenizer()
    data = batches(tokenizer)
    return {
        "model": model_outputs(make_model(tiny(tokenizer)), data["rows"], sp),
        "one_kv_head": model_outputs(make_model(one_kv_head(tiny(tokenizer))), data["rows"], sp),
        "vision": vision_outputs(make_model(tiny(tokenizer)), data["rows"], sp),
        "vision_one_frame": vision_outputs(make_model(tiny(tokenizer)), data["image"], sp),
    }


def run_rank(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)  # two ranks and the reference share the machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # Frames spread by the loader balancer's cost, as the trainer will pass it.
        _, sp = sequence_parallel_mesh(WORLD, grid_cost=CostModel().grid_cost)
        torch.save(run_all(sp), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(the one-process reference, each rank's results)."""
    out = tmp_path_factory.mktemp("sequence_parallel")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: by this point of a full run the test process holds Lance's and Prefect's threads,
    # which a forked child inherits in whatever state they were
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=run_rank, args=(rank, port, out)) for rank in range(WORLD)]
    for rank in ranks:
        rank.start()
    reference = run_all(None)
    for rank in ranks:
        rank.join(timeout=300)
    assert [rank.exitcode for rank in ranks] == [0] * WORLD, "a rank failed (its traceback is above)"
    return reference, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = (got - want).abs().max().item() if want.numel() else 0.0
    assert error <= TOLERANCE, f"{what}: max difference {error:.3g}"


@pytest.mark.parametrize("part", ["model", "one_kv_head"])
def test_sequence_parallel_2_equals_one_process(runs, part):
    reference, ranks = runs
    want = reference[part]
    length = want["logits"].shape[1]
    assert length % WORLD == 1  # the last slice holds padding
    assert [results[part]["local_length"] for results in ranks] == [(length + 1) // WORLD] * WORLD
    for rank, results in enumerate(ranks):
        got = results[part]
        for key in ("loss", "logits", "token_logprobs"):
            assert_close(got[key], want[key], f"rank {rank} {part} {key}")
        for grads in ("loss_grads", "logprob_grads"):
            assert got[grads].keys() == want[grads].keys()
            for name, grad in want[grads].items():
                assert_close(got[grads][name], grad, f"rank {rank} {part} {grads} {name}")


@pytest.mark.parametrize("part", ["vision", "vision_one_frame"])
def test_sharded_vit_equals_the_whole_vit(runs, part):
    reference, ranks = runs
    want = reference[part]
    # Each rank encoded a share of the frames (all of them, with one frame: the other rank encodes none).
    shares = [results[part]["patches"] for results in ranks]
    assert sum(shares) == want["patches"] and (0 in shares) == (part == "vision_one_frame"), shares
    vision_parameters = [n for n in want["grads"] if n.startswith(("vision.", "projector."))]
    assert all(want["grads"][n].abs().sum() > 0 for n in vision_parameters)
    for rank, results in enumerate(ranks):
        got = results[part]
        assert_close(got["embeddings"], want["embeddings"], f"rank {rank} {part} embeddings")
        for name in vision_parameters:
            assert_close(got["grads"][name], want["grads"][name], f"rank {rank} {part} gradient of {name}")


def test_frames_go_to_the_least_loaded_rank_by_cost():
    # LPT: 24 → 0, 16 → 1, 16 → 1 (16 < 24), 8 → 0, 8 → 0 (32 = 32: the lower rank).
    assert vision_assignment([24, 16, 8, 16, 8], 2) == [0, 1, 0, 1, 0]
    # A quadratic cost (attention) weighs the big frame more: it goes alone.
    assert vision_assignment([p * p for p in (64, 16, 16, 16, 16)], 2) == [0, 1, 1, 1, 1]
