"""Rollouts from a serving engine for GSPO: the HTTP backend (`RolloutServer`), the weight sync after every
policy update, and the backend-aware checks that the server samples from the trainer's inputs and weights.

**Backends.** `GSPOStageConfig.rollout_server` None samples in process (`LocalGenerator` sharing the policy);
a `RolloutServerConfig` samples through `keyeflow.model.rollout_protocol.HTTPRolloutGenerator`: the trainer
encodes each prompt itself (ids, patches, grids), the server returns G sampled id sequences with their
log-probs, and the trainer recomputes old log-probs by its own forward as in process (`rl` module
docstring). With `url` None the run starts our server (`python -m keyeflow.model.serving
--enable-weight-reload`) on 127.0.0.1 and stops it at the end.

**Weight sync** (`RolloutServer.sync`), after every step's updates and once before the first rollout: rank 0
exports the policy in the serving layout (`export.export_model`, `sync_dtype`) under
`out_dir/rollout_weights/step-XXXXXXXX`, tells the server to load it (`/update_weights_from_disk`), deletes
the previous export, and checks that the server now answers with these weights: it asks the server for a
greedy completion of a fixed prompt (the run's first item with media, else its first item) and compares the
server's log-probs of those tokens with the trainer's forward on the same ids. A mean gap over the tolerance
raises `WeightSyncError` naming both numbers. Other ranks wait at a barrier. The exported model holds the
full weights on rank 0: the policy itself (one process, or replicated ranks), or, for a policy sharded with
FSDP2, the sampler's unsharded copy, which every rank refreshes from the shards (`sharding.copy_full_weights`)
right before the sync; a DeepSpeed-partitioned policy is refused. Rank 0 writes the last check's numbers to
`out_dir/rollout_sync_check.json` (beside `rollout_weights/`, which holds only the last export).

**Tolerances** (`LOGPROB_TOLERANCE`, on the mean absolute per-token log-prob gap of the checked tokens):
- in process, fp32: 1e-5. The sampler and the trainer run the same fp32 weights; only the computation
  differs (a KV-cached decode, batch-of-one prefill, against one teacher-forced forward), which moves
  log-probs by float32 rounding, ~1e-7 relative per operation, ~1e-6 absolute after a few layers (measured:
  largest per-token gap 1e-6 on the tiny model, 2e-6 on the 7.3M-parameter benchmark model, over text,
  image and Slow/Fast video prompts). `train_gspo`'s check before RL uses it per token.
- HTTP, fp32 export (our server): the same computation on bit-equal weights (an fp32 export reloads
  exactly), so the same 1e-5.
- HTTP, bf16 export: 5e-2. bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per weight and per
  activation when the engine computes in bf16); logits of size 10-30 then move by ~1e-2 to 1e-1 through a
  deep network, and a token's log-prob moves as its logit minus the log-sum-exp. Peers see mean gaps of
  ~1e-2 between a bf16 vLLM and an fp32-master trainer; 1e-3 is never met. 5e-2 catches a server that did not
  reload (a step of RL moves a fixed prompt's log-probs far more at a learning rate that learns) or loaded
  the wrong weights, and lets bf16 rounding pass. Measured here only on the tiny model served by our server
  from a bf16 export (bf16 weights and compute, CPU): mean gaps 6e-4 to 1.4e-3, largest 3e-3, over 8 greedy
  tokens of text, image and video prompts; a deep model and a GPU engine's kernels give more. Not measured
  on vLLM/SGLang (no GPU here).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

from keyeflow.model.config import KeyeConfig
from keyeflow.model.export import export_model
from keyeflow.model.generation import LocalGenerator
from keyeflow.model.processor import Features
from keyeflow.model.rollout_protocol import HTTPRolloutGenerator, reload_weights, request_features
from keyeflow.training import distributed
from keyeflow.training.config import RolloutServerConfig

log = logging.getLogger(__name__)

LOGPROB_TOLERANCE: dict[tuple[str, str], float] = {
    ("in_process", "fp32"): 1e-5,
    ("http", "fp32"): 1e-5,
    ("http", "bf16"): 5e-2,
}
SYNC_DIR = "rollout_weights"
SYNC_CHECK = "rollout_sync_check.json"  # in out_dir: the last sync check's ids and log-probs, for a person
CHECK_TOKENS = 8  # greedy tokens the sync check compares


def logprob_tolerance(backend: str, dtype: str) -> float:
    """The sampler/trainer log-prob tolerance of a backend ("in_process", "http") and dtype (module
    docstring)."""
    try:
        return LOGPROB_TOLERANCE[(backend, dtype)]
    except KeyError:
        raise ValueError(f"no log-prob tolerance for backend {backend!r} at {dtype!r}") from None


# ================================================================================ input consistency check


class RolloutInputMismatch(ValueError):
    """The rollout and training paths built different model inputs; `field` and `position` say where first."""

    def __init__(self, field_name: str, position: tuple[int, ...] | str, detail: str):
        self.field = field_name
        self.position = position
        super().__init__(f"rollout and training inputs differ in {field_name} at {position}: {detail}")


def first_difference(name: str, rollout: torch.Tensor, training: torch.Tensor) -> None:
    """Raise `RolloutInputMismatch` at the first element where `rollout` and `training` differ."""
    if rollout.shape != training.shape:
        # Lengths differ: name the first index where the common prefix stops agreeing (or where one ends).
        if rollout.ndim == training.ndim and rollout.ndim >= 1 and rollout.shape[1:] == training.shape[1:]:
            common = min(rollout.shape[0], training.shape[0])
            diff = (rollout[:common] != training[:common]).reshape(common, -1).any(dim=1).nonzero()
            at = int(diff[0]) if len(diff) else common
            raise RolloutInputMismatch(
                name, (at,), f"shape {tuple(rollout.shape)} (rollout) vs {tuple(training.shape)} (training)"
            )
        raise RolloutInputMismatch(
            name, "shape", f"{tuple(rollout.shape)} (rollout) vs {tuple(training.shape)} (training)"
        )
    diff = (rollout != training).nonzero()
    if len(diff):
        at = tuple(int(i) for i in diff[0])
        raise RolloutInputMismatch(
            name, at, f"rollout {rollout[at].item()} vs training {training[at].item()}"
        )


def check_served_inputs(request: Mapping[str, Any], trainer_prompt: Features, config: KeyeConfig) -> Features:
    """Check, field by field, that the inputs a server builds from `request` (the body sent: prompt ids,
    `multi_modal_data` patches and grids; 3D RoPE positions derived from them as the server derives them) are
    the prompt the trainer trains on (`trainer_prompt`, `LocalGenerator.encode_prompt`). Raises
    `RolloutInputMismatch` naming the first differing field and position (a request whose fields do not fit
    together at all is one in `request`); returns the server's Features."""
    try:
        served = request_features(request["prompt"], request.get("multi_modal_data"), config)
    except (KeyError, ValueError) as error:
        raise RolloutInputMismatch(
            "request", "body", f"the server cannot build inputs from it: {error}"
        ) from None
    first_difference("input_ids", served.input_ids, trainer_prompt.input_ids)
    first_difference("grid_thw", served.grid_thw, trainer_prompt.grid_thw)
    first_difference("pixel_values", served.pixel_values, trainer_prompt.pixel_values)
    first_difference("position_ids", served.position_ids, trainer_prompt.position_ids)
    return served


# ================================================================================ weight sync


class WeightSyncError(RuntimeError):
    """The server does not answer with the trainer's weights after a sync."""


# The trainer's log-probs of `token_ids` after `prompt` (teacher-forced, no grad): given by the caller.
TrainerLogprobs = Callable[[Features, Sequence[int]], list[float]]


def check_served_logprobs(
    sampler: HTTPRolloutGenerator,
    encode_prompt: Callable[[Sequence[Mapping]], Features],
    messages: Sequence[Mapping],
    trainer_logprobs: TrainerLogprobs,
    tolerance: float,
    *,
    skip_ids: frozenset[int] = frozenset(),
    what: str = "the server",
) -> dict[str, Any]:
    """Ask the server for a greedy completion of `messages` (`CHECK_TOKENS` tokens) and compare its log-probs
    with the trainer's on the same ids; WeightSyncError when the mean absolute gap exceeds `tolerance`, naming
    the server's and the trainer's numbers at the largest gap. Tokens from the first of `skip_ids` on (vision
    pads: not teacher-forceable) are left out. Returns the numbers compared and the gaps."""
    completion = sampler.generate(
        [list(messages)], n=1, max_new_tokens=CHECK_TOKENS, temperature=0.0, seed=0, logprobs=True
    )[0][0]
    keep = next((i for i, t in enumerate(completion.token_ids) if t in skip_ids), len(completion.token_ids))
    ids, served = completion.token_ids[:keep], completion.token_logprobs[:keep]
    if not ids:
        raise WeightSyncError(f"{what}'s greedy completion of the check prompt starts with a vision pad id")
    trained = trainer_logprobs(encode_prompt(messages), ids)
    gaps = [abs(a - b) for a, b in zip(served, trained)]
    mean_gap = sum(gaps) / len(gaps)
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    record = {
        "token_ids": list(ids),
        "server_logprobs": list(served),
        "trainer_logprobs": list(trained),
        "mean_gap": mean_gap,
        "max_gap": gaps[worst],
    }
    if not mean_gap <= tolerance:
        raise WeightSyncError(
            f"{what} does not answer with the trainer's weights: mean log-prob gap {mean_gap:.3g} over "
            f"{len(ids)} tokens > tolerance {tolerance:g}; largest at token {worst} (id {ids[worst]}): "
            f"server {served[worst]:.6f}, trainer {trained[worst]:.6f}"
        )
    return record


class RolloutServer:
    """The HTTP rollout backend of one GSPO run (module docstring): `sampler` samples, `sync` sends the
    policy's weights after an update and checks them, `close` stops a server the run started."""

    def __init__(
        self,
        config: RolloutServerConfig,
        generator: LocalGenerator,
        out_dir: Path,
        dist: distributed.Distributed,
        trainer_logprobs: TrainerLogprobs,
        check_messages: Sequence[Mapping],
        skip_ids: frozenset[int] = frozenset(),
    ):
        self.config, self.generator, self.dist = config, generator, dist
        self.sync_dir = Path(out_dir) / SYNC_DIR
        self.check_path = Path(out_dir) / SYNC_CHECK
        self.trainer_logprobs, self.check_messages, self.skip_ids = trainer_logprobs, check_messages, skip_ids
        self.tolerance = logprob_tolerance("http", config.sync_dtype)
        self.process: subprocess.Popen | None = None
        self.url = config.resolved_url()
        self.sampler: HTTPRolloutGenerator | None = None
        self.last_check: dict[str, Any] | None = None

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.config.api_key_env) if self.config.api_key_env else None

    def _export(self, model: nn.Module, step: int) -> Path:
        target = self.sync_dir / f"step-{step:08d}"
        shutil.rmtree(target, ignore_errors=True)  # a resumed run writes this step again
        return export_model(model, self.generator.tokenizer, target, dtype=self.config.sync_dtype)

    def _start(self, model_dir: Path) -> str:
        """Our server on a free 127.0.0.1 port serving `model_dir`; its API root (…/v1)."""
        log_path = self.sync_dir / "server.log"
        command = [
            sys.executable, "-m", "keyeflow.model.serving", "--model", str(model_dir), "--port", "0",
            "--served-model-name", self.config.served_model_name, "--enable-weight-reload",
            "--log-level", "warning",
        ]  # fmt: skip
        with log_path.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"rollout server exited with {self.process.returncode}: {log_path.read_text()[-2000:]}"
                )
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("keyeflow serving ") and " at http://" in line:
                    root = line.rsplit(" at ", 1)[1].strip()
                    try:
                        if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                            return f"{root}/v1"
                    except httpx.HTTPError:
                        pass
            time.sleep(0.1)
        raise RuntimeError(f"rollout server did not come up in 120 s: {log_path.read_text()[-2000:]}")

    def open(self, model: nn.Module, step: int) -> dict[str, Any]:
        """Before the first rollout: the current weights onto the server (starting it when the run owns it),
        then the input and log-prob checks."""
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        if self.url is None:
            # Every rank needs the URL; rank 0 starts the server and tells the others.
            if self.dist.is_main:
                self.url = self._start(self._export(model, step))
            self.url = distributed.all_gather_objects(self.dist, self.url)[0]
            started = True
        else:
            started = False
        self.sampler = HTTPRolloutGenerator(
            self.url, self.config.served_model_name, encode_prompt=self.generator.encode_prompt,
            tokenizer=self.generator.tokenizer, stop_token_ids=sorted(self.generator.stop_token_ids),
            api_key_env=self.config.api_key_env, timeout=self.config.timeout_s,
            max_concurrency=self.config.max_concurrency,
        )  # fmt: skip
        if self.dist.is_main:
            request = self.sampler.request(
                self.check_messages, n=1, max_new_tokens=1, temperature=0.0, seed=0
            )
            check_served_inputs(request, self.generator.encode_prompt(self.check_messages), model.config)
        return self.sync(model, step, export=not started)

    def sync(self, model: nn.Module, step: int, *, export: bool = True) -> dict[str, Any]:
        """The policy after step `step` onto the server, then the log-prob check (module docstring). Returns
        the check's numbers as step metrics (every rank gets rank 0's)."""
        started = time.perf_counter()
        record: dict[str, Any] | None = None
        if self.dist.is_main:
            path = self.sync_dir / f"step-{step:08d}"
            if export:
                path = self._export(model, step)
                reload_weights(self.url, str(path), api_key=self.api_key, timeout=self.config.timeout_s)
            for stale in self.sync_dir.glob("step-*"):
                if stale != path:
                    shutil.rmtree(stale, ignore_errors=True)
            self.last_check = check_served_logprobs(
                self.sampler, self.generator.encode_prompt, self.check_messages, self.trainer_logprobs,
                self.tolerance, skip_ids=self.skip_ids, what=f"the rollout server after step {step}",
            )  # fmt: skip
            self.check_path.write_text(json.dumps({"step": step, **self.last_check}) + "\n")
            record = {
                "sync_logprob_gap": self.last_check["mean_gap"],
                "sync_logprob_gap_max": self.last_check["max_gap"],
            }
        record = distributed.all_gather_objects(self.dist, record)[0]
        record["time_sync"] = time.perf_counter() - started
        return record

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
