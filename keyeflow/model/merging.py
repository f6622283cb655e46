"""Weight-space merging of checkpoints of one architecture: pre-training stage 4 (fusion: the weight average
of checkpoints annealed on different mixtures, SPEC §3, P0 §3.2) and LongCoT expert merging (an expert SFT'd
from the cold-start model merged back into it, SPEC §4). Architecture-level only: no training, no model code
runs.

Methods (`MergeConfig.method`), every tensor computed in float64 and cast back to its stored dtype:
- `average`: θ = Σ_i w_i·θ_i, summed in input order. The weights are used as given, never rescaled; they must
  be >= 0 and sum to 1 (|Σw − 1| <= 1e-9), so a typo fails loudly instead of silently shrinking the model.
  Default: 1/n each. Fusion is this method.
- `task_arithmetic` (Ilharco et al. 2023): θ = base + λ·Σ_i w_i·(θ_i − base). Default weights 1 each (the
  paper's plain sum; λ scales), any sign allowed (a negative weight subtracts a task). Expert merging is this
  with base = the cold-start model, inputs = [expert] (or several experts).
- `ties` (Yadav et al. 2023, TIES-Merging), per tensor, with τ_i = w_i·(θ_i − base) (weights default 1):
  1. trim: keep the `density` fraction (ceil(density·numel), at least 1) of entries of each τ_i with the
     largest |τ_i|, zero the rest; equal magnitudes at the cut are broken by position (lower flat index
     kept first: a stable sort), so the result never depends on a sort implementation;
  2. elect sign: s = sign(Σ_i trimmed τ_i);
  3. disjoint mean: for every entry, the mean of the trimmed τ_i that are non-zero with sign s (0 where none);
  4. θ = base + λ·merged.

Inputs are checkpoint directories as `save_pretrained` writes them: `model.safetensors` or sharded
`model-*.safetensors` + `model.safetensors.index.json`, beside `config.json`. All inputs (and the base) must
hold exactly the same keys with the same shapes and dtypes; the first difference, in sorted key order, is
named in the error. Tensors are streamed one key at a time from every input (`safe_open`), so peak memory is
the float64 working copies of one tensor (2 for average/task arithmetic, n + 2 for TIES) plus the output shard
being filled (`max_shard_bytes`), never whole models. Non-floating tensors (none in our model) must be equal
in every input and are copied.

Output: `out_dir/` with the merged safetensors (the inputs' layout: one file, or shards + index), the
`config.json` (and `generation_config.json` if any) of the base, or of the first input when there is no base,
and `merge.json` recording the method, inputs, weights, base, density, λ and the config source. The directory
is written under a temporary name beside `out_dir` and renamed into place, so it either exists complete or
not at all. Rerunning with the same merge record finds the finished directory and returns it; a different
merge into an existing directory is an error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from keyeflow.config import check_number, invalid

METHODS = ("average", "task_arithmetic", "ties")
DEFAULT_TIES_DENSITY = 0.2  # TIES paper: keep the top 20% of each task vector
MERGE_RECORD = "merge.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "generation_config.json")  # config.json required, the other copied if present
_WEIGHT_SUM_TOLERANCE = 1e-9


@dataclass(frozen=True)
class MergeConfig:
    """How to merge. `weights`: one per input, None = equal (1/n for average, 1.0 otherwise).
    `base`: the common parent checkpoint, required by task_arithmetic and ties and refused by average (it may
    instead be passed to `merge_checkpoints(base=...)`). `density` (ties only, default 0.2): fraction of each
    task vector's entries kept by the trim. `scaling` λ (task_arithmetic and ties, default 1.0). Setting a
    field the method does not use is an error, not silently ignored."""

    method: str = "average"
    weights: tuple[float, ...] | None = None
    base: str | None = None
    density: float | None = None
    scaling: float | None = None

    def __post_init__(self) -> None:
        def fail(name: str, value: object, why: str) -> None:
            raise invalid("MergeConfig", name, value, why)

        if self.method not in METHODS:
            fail("method", self.method, f"must be one of {METHODS}")
        if self.weights is not None:
            weights = tuple(
                check_number("MergeConfig", f"weights[{i}]", weight) for i, weight in enumerate(self.weights)
            )
            if not weights:
                fail("weights", self.weights, "must hold one weight per input, got none")
            if self.method == "average":
                if min(weights) < 0:
                    fail("weights", weights, "average weights must be >= 0")
                if abs(sum(weights) - 1.0) > _WEIGHT_SUM_TOLERANCE:
                    fail(
                        "weights",
                        weights,
                        "average weights must sum to 1 (they are used as given, not "
                        f"normalised); they sum to {sum(weights)!r}",
                    )
            object.__setattr__(self, "weights", weights)
        if self.method == "average":
            for name in ("base", "density", "scaling"):
                if getattr(self, name) is not None:
                    fail(name, getattr(self, name), "not used by method 'average'; leave it None")
            return
        if self.base is not None:
            object.__setattr__(self, "base", str(self.base))
        if self.method == "task_arithmetic" and self.density is not None:
            fail("density", self.density, "used only by method 'ties'")
        if self.method == "ties":
            density = check_number(
                "MergeConfig", "density", DEFAULT_TIES_DENSITY if self.density is None else self.density
            )
            if not 0.0 < density <= 1.0:
                fail("density", self.density, "must be in (0, 1]")
            object.__setattr__(self, "density", density)
        scaling = 1.0 if self.scaling is None else self.scaling
        object.__setattr__(self, "scaling", check_number("MergeConfig", "scaling", scaling))

    def weights_for(self, num_inputs: int) -> tuple[float, ...]:
        if num_inputs < 1:
            raise ValueError("merging needs at least one input checkpoint")
        if self.weights is None:
            equal = 1.0 / num_inputs if self.method == "average" else 1.0
            return (equal,) * num_inputs
        if len(self.weights) != num_inputs:
            raise ValueError(f"{len(self.weights)} weights for {num_inputs} input checkpoints")
        return self.weights


class _Checkpoint:
    """Lazy key → tensor access to one checkpoint directory (single file or shards), files kept open."""

    def __init__(self, path: Path, stack: ExitStack):
        self.path = path
        index = path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} under {path}")
        self.key_file = {}  # key -> the open file holding it
        for name in files:
            handle = stack.enter_context(safe_open(str(path / name), framework="pt"))
            self.key_file.update(dict.fromkeys(handle.keys(), handle))
        if weight_map is not None and set(weight_map) != set(self.key_file):
            raise ValueError(f"{path / INDEX_FILE} does not match the keys of its shards")

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        part = self.key_file[key].get_slice(key)
        return tuple(part.get_shape()), part.get_dtype()

    def tensor(self, key: str) -> torch.Tensor:
        return self.key_file[key].get_tensor(key)


def _check_compatible(checkpoints: Sequence[_Checkpoint], names: Sequence[str]) -> list[str]:
    """Sorted keys, after checking every checkpoint has the keys, shapes and dtypes of the first."""
    ref, ref_name = checkpoints[0], names[0]
    keys = sorted(ref.key_file)
    for other, name in zip(checkpoints[1:], names[1:]):
        missing = sorted(set(keys) - set(other.key_file))
        extra = sorted(set(other.key_file) - set(keys))
        if missing or extra:
            first = min(missing + extra)
            where = (
                f"{ref_name} has it, {name} does not"
                if first in missing
                else f"{name} has it, {ref_name} not"
            )
            raise ValueError(
                f"checkpoints hold different keys: first mismatch {first!r} ({where}); "
                f"{len(missing)} missing from and {len(extra)} extra in {name}"
            )
        for key in keys:
            (ref_shape, ref_dtype), (shape, dtype) = ref.meta(key), other.meta(key)
            if ref_shape != shape or ref_dtype != dtype:
                raise ValueError(
                    f"key {key!r} differs: shape {list(ref_shape)} dtype {ref_dtype} in {ref_name}, "
                    f"shape {list(shape)} dtype {dtype} in {name}"
                )
    return keys


def ties_merge(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """TIES merged task vector of `task_vectors` `[n, *shape]` (float64, already weighted): trim each to its
    top-`density` entries by magnitude, elect the sign of the sum, average the agreeing non-zero entries."""
    n = task_vectors.shape[0]
    flat = task_vectors.reshape(n, -1)
    numel = flat.shape[1]
    keep = min(numel, max(1, math.ceil(density * numel)))
    if keep < numel:
        order = torch.argsort(flat.abs(), dim=1, descending=True, stable=True)[:, :keep]
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
        flat = torch.where(mask, flat, torch.zeros_like(flat))
    sign = torch.sign(flat.sum(dim=0))
    agree = (torch.sign(flat) == sign) & (flat != 0)
    total = torch.where(agree, flat, torch.zeros_like(flat)).sum(dim=0)
    count = agree.sum(dim=0)
    merged = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return merged.reshape(task_vectors.shape[1:])


def _merge_tensor(
    key: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    config: MergeConfig,
    weights: Sequence[float],
) -> torch.Tensor:
    dtype = tensors[0].dtype
    if not (dtype.is_floating_point or dtype.is_complex):
        for t in tensors[1:] + ([base] if base is not None else []):
            if not torch.equal(t, tensors[0]):
                raise ValueError(f"non-floating tensor {key!r} ({dtype}) differs between checkpoints")
        return tensors[0]
    if config.method == "average":
        acc = tensors[0].to(torch.float64) * weights[0]
        for t, w in zip(tensors[1:], weights[1:]):
            acc += t.to(torch.float64) * w
        return acc.to(dtype)
    base64 = base.to(torch.float64)
    if config.method == "task_arithmetic":
        delta = (tensors[0].to(torch.float64) - base64) * weights[0]
        for t, w in zip(tensors[1:], weights[1:]):
            delta += (t.to(torch.float64) - base64) * w
    else:
        vectors = torch.stack([(t.to(torch.float64) - base64) * w for t, w in zip(tensors, weights)])
        delta = ties_merge(vectors, config.density)
    return (base64 + config.scaling * delta).to(dtype)


def _record(inputs: list[Path], config: MergeConfig, weights, base: Path | None, config_source: Path) -> dict:
    return {
        "method": config.method,
        "inputs": [str(p) for p in inputs],
        "weights": list(weights),
        "base": None if base is None else str(base),
        "density": config.density,
        "scaling": config.scaling,
        "config_source": str(config_source),
        "compute_dtype": "float64",
    }


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike],
    config: MergeConfig,
    out_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Merge the checkpoint directories `inputs` into `out_dir` as `config` says (see the module docstring);
    returns `out_dir`. `base` (or `config.base`) is the common parent for task_arithmetic and ties."""
    paths = [Path(p).resolve() for p in inputs]
    weights = config.weights_for(len(paths))
    if base is not None and config.base is not None and Path(base).resolve() != Path(config.base).resolve():
        raise ValueError(f"base given twice and different: {base} (argument) vs {config.base} (config)")
    base_given = base if base is not None else config.base
    base_path = None if base_given is None else Path(base_given).resolve()
    if config.method == "average" and base_path is not None:
        raise ValueError("method 'average' takes no base checkpoint")
    if config.method != "average" and base_path is None:
        raise ValueError(f"method {config.method!r} needs the common parent checkpoint as base")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    out_dir = Path(out_dir).resolve()
    if out_dir in paths or out_dir == base_path:
        raise ValueError(f"out_dir {out_dir} is one of the checkpoints being merged")
    config_source = base_path if base_path is not None else paths[0]
    if not (config_source / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {config_source} to give the merged checkpoint")
    record = _record(paths, config, weights, base_path, config_source)

    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        done = out_dir / MERGE_RECORD
        if done.is_file():
            previous = json.loads(done.read_text())
            previous.pop("files", None)
            if previous == record:
                return out_dir  # the same merge finished before: nothing to do
        raise FileExistsError(f"{out_dir} exists and is not this merge's output; choose another out_dir")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with ExitStack() as stack:
            checkpoints = [_Checkpoint(p, stack) for p in paths]
            names = [f"input {i} ({p})" for i, p in enumerate(paths)]
            if base_path is not None:
                checkpoints.append(_Checkpoint(base_path, stack))
                names.append(f"base ({base_path})")
            keys = _check_compatible(checkpoints, names)
            if not keys:
                raise ValueError(f"{names[0]} holds no tensors")
            base_ckpt = checkpoints[len(paths)] if base_path is not None else None
            shard_files = _write_merged(
                keys, checkpoints[: len(paths)], base_ckpt, config, weights, tmp, max_shard_bytes
            )
        for name in CONFIG_FILES:
            if (config_source / name).is_file():
                shutil.copyfile(config_source / name, tmp / name)
        record["files"] = shard_files
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.rename(tmp, out_dir)  # atomic on one filesystem; replaces an empty out_dir, fails on a full one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_merged(
    keys: list[str],
    checkpoints: list[_Checkpoint],
    base: _Checkpoint | None,
    config: MergeConfig,
    weights: Sequence[float],
    out: Path,
    max_shard_bytes: int,
) -> list[str]:
    """Merge key by key, writing shards of at most `max_shard_bytes` (a bigger single tensor gets its own);
    returns the file names written (HF layout: one `model.safetensors`, or numbered shards + index)."""
    shards: list[list[str]] = []  # keys per shard, for the index
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    parts: list[Path] = []
    total_bytes = 0  # tensor bytes, as transformers' index records them

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            part = out / f"part-{len(parts):05d}.safetensors"
            save_file(pending, str(part), metadata={"format": "pt"})
            parts.append(part)
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for key in keys:
        base_tensor = base.tensor(key) if base is not None else None
        merged = _merge_tensor(key, [c.tensor(key) for c in checkpoints], base_tensor, config, weights)
        size = merged.numel() * merged.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[key] = merged.contiguous()
        pending_bytes += size
        total_bytes += size
    flush()

    if len(parts) == 1:
        parts[0].rename(out / SINGLE_FILE)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {}
    for part, name, shard_keys in zip(parts, names, shards):
        part.rename(out / name)
        weight_map.update({key: name for key in shard_keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


def read_merge_record(path: str | os.PathLike) -> dict:
    """The `merge.json` of a merged checkpoint (what lineage records as its parents)."""
    return json.loads((Path(path) / MERGE_RECORD).read_text())
