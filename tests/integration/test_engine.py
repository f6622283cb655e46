"""The one training engine under MPO and GSPO, run as real processes: 2 gloo ranks give the one-process
losses, gradient norms and weights after several steps (the gradients are summed over ranks and every loss is
divided by whole-step counts: averaging instead of summing would halve the norms and change the weights); a
run SIGKILLed at a named point after a step resumes from its last checkpoint to the uninterrupted run's losses
and weights, bit for bit (optimizer, schedule and RNG restored); and a bf16 checkpoint trained at a learning
rate of 1e-6 moves its weights (fp32 master weights), where AdamW on the bf16 weights rounds every update
away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keyeflow.model.checkpoint import load_keye_checkpoint
from keyeflow.model.config import tiny
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.training import distributed
from keyeflow.training.engine import LATEST, Engine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
JOB = HERE.parent / "posttrain_job.py"
STEPS = 4


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "init"
    torch.manual_seed(0)
    KeyeForConditionalGeneration(tiny()).save_pretrained(path)
    return path


def run_job(
    kind: str, init: Path, out_dir: Path, *, nproc: int = 1, kill_at: str | None = None
) -> dict | None:
    """The job in its own process(es); its result, or None when it was killed at `kill_at` as asked."""
    spec = out_dir.with_suffix(".json")
    spec.write_text(
        json.dumps({"kind": kind, "init": str(init), "out_dir": str(out_dir), "max_steps": STEPS})
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("KEYEFLOW_KILL_POINT", None)
    if kill_at:
        env["KEYEFLOW_KILL_POINT"] = kill_at
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        if nproc > 1
        else [sys.executable]
    )
    done = subprocess.run(
        [*launcher, str(JOB), str(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if kill_at:
        assert done.returncode == -9, (
            f"expected SIGKILL at {kill_at}, got {done.returncode}:\n{done.stderr[-3000:]}"
        )
        return None
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    return {
        k: v.float() for k, v in load_keye_checkpoint(Path(checkpoint_dir) / "model").state_dict().items()
    }


@pytest.fixture(scope="module")
def one_process(init_dir, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("one")
    return {kind: run_job(kind, init_dir, root / kind) for kind in ("mpo", "gspo")}


def assert_same_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor]
):
    """Equal weights, and so equal updates: every tensor's change from init agrees to float32 reduction
    noise."""
    assert a.keys() == b.keys()
    moved = 0
    for name, value in a.items():
        delta_a, delta_b = value - init[name], b[name] - init[name]
        torch.testing.assert_close(delta_a, delta_b, rtol=1e-3, atol=2e-6, msg=name)
        moved += int(delta_a.abs().max() > 0)
    assert moved > len(a) // 2  # the runs really trained most tensors


@pytest.mark.parametrize("kind", ["mpo", "gspo"])
def test_two_gloo_ranks_give_the_one_process_losses_and_weights(kind, init_dir, one_process, tmp_path):
    single = one_process[kind]
    double = run_job(kind, init_dir, tmp_path / "two", nproc=2)
    if kind == "mpo":
        assert double["losses"] == pytest.approx(single["losses"], rel=1e-5)
        keys = ("dpo", "bco", "sft", "reward_margin", "grad_norm", "chosen_tokens")
    else:
        keys = (
            "reward_mean",
            "loss",
            "mean_ratio",
            "grad_norm",
            "num_active_responses",
            "completion_tokens_mean",
        )
        assert all(m["num_updates"] == 2 for m in single["metrics"])  # both mini-batches of every step
    for one, two in zip(single["metrics"], double["metrics"], strict=True):
        for key in keys:  # grad_norm: summed over ranks (an average would be half of it)
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), (one["step"], key)
    init = {k: v.float() for k, v in load_keye_checkpoint(init_dir).state_dict().items()}
    assert_same_weights(weights(double["checkpoint_dir"]), weights(single["checkpoint_dir"]), init)


@pytest.mark.parametrize("kind", ["mpo", "gspo"])
def test_sigkill_after_a_step_then_resume_is_bitwise_the_uninterrupted_run(
    kind, init_dir, one_process, tmp_path
):
    out = tmp_path / "run"
    # Killed after step 3: step 2's checkpoint is registered, step 3's update is lost with the process.
    assert run_job(kind, init_dir, out, kill_at=f"{kind}.step@3") is None
    assert (out / LATEST).read_text().strip() == "step-00000002"
    resumed = run_job(kind, init_dir, out)
    single = one_process[kind]
    if kind == "mpo":
        assert resumed["losses"] == single["losses"]
    drop = {"seconds", "time", "time_step", "time_rollout", "time_reward", "time_update"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in resumed["metrics"]] == [
        {k: v for k, v in m.items() if k not in drop} for m in single["metrics"]
    ]
    resumed_weights, single_weights = weights(resumed["checkpoint_dir"]), weights(single["checkpoint_dir"])
    assert all(torch.equal(resumed_weights[k], single_weights[k]) for k in single_weights)


def test_a_bf16_checkpoint_trained_at_lr_1e6_moves_its_weights(init_dir, tmp_path):
    bf16_dir = tmp_path / "bf16"
    load_keye_checkpoint(init_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    model = load_keye_checkpoint(bf16_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the checkpoint loads as it was saved
    before = {k: v.float().clone() for k, v in model.state_dict().items()}

    # AdamW directly on the bf16 weights (what MPO and GSPO did before the engine): the step rounds away.
    bare = load_keye_checkpoint(bf16_dir)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 11]])
    optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-6, weight_decay=0.0)
    bare(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    weight = "language_model.layers.0.mlp.up_proj.weight"
    bare_changed = (dict(bare.named_parameters())[weight].float() != before[weight]).float().mean().item()
    assert bare_changed < 0.05

    # On the engine: fp32 master weights; one update at 1e-6 changes nearly every weight of the matrix.
    dist = distributed.setup()
    engine = Engine(model, dist=dist, learning_rate=1e-6, lr_at=lambda _: 1e-6)
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
    engine.backward(engine.forward(input_ids=ids).logits.float().logsumexp(-1).mean())
    engine.step()
    after = dict(engine.model.named_parameters())[weight].detach()
    assert (after != before[weight]).float().mean().item() > 0.9
    saved = engine.save(tmp_path / "out", 1, {"format": 1, "kind": "test"})
    reloaded = dict(load_keye_checkpoint(saved / "model").named_parameters())[weight]
    assert reloaded.dtype == torch.float32 and torch.equal(reloaded.detach(), after)
