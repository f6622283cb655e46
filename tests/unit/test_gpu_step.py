"""benchmarks/gpu_step.py, the script a lent GPU runs, works before a GPU is lent: `--smoke` runs it on the
CPU (tiny widths, fp32) as a subprocess, which imports none of the platform's dependencies the GPU image
lacks, and its JSON says the packed path agrees with the mask path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Installed here, absent from the GPU image: the script must run without them.
NOT_ON_THE_GPU_IMAGE = ("prefect", "lance", "duckdb", "mlflow", "deepspeed", "typer", "pyarrow", "pydantic")

# Run at the subprocess's start: at its exit, write the top-level packages it imported (transformers probes
# for deepspeed with `find_spec`, which finds it here and not there: only an import counts).
RECORD_IMPORTS = """
import atexit, json, os, sys

def record():
    with open(os.environ["IMPORTED_PACKAGES"], "w") as file:
        json.dump(sorted({name.split(".")[0] for name in sys.modules}), file)

atexit.register(record)
"""


def test_smoke_run_writes_agreeing_measurements(tmp_path):
    recorder = tmp_path / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(RECORD_IMPORTS)
    imported = tmp_path / "imported.json"
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "OUT": str(out),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{recorder}{os.pathsep}{ROOT}",
        "IMPORTED_PACKAGES": str(imported),
    }
    env.pop("KEYEFLOW_PACKED_ATTENTION_KERNEL", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--smoke"],
        check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    records = json.loads((out / "gpu_step.json").read_text())
    assert records == printed
    assert "keyeflow" in json.loads(imported.read_text())
    assert not set(json.loads(imported.read_text())) & set(NOT_ON_THE_GPU_IMAGE)

    by_measure = {}
    for record in records:
        by_measure.setdefault(record["measure"], []).append(record)
    (setup,) = by_measure["setup"]
    assert setup["device"] == "cpu" and setup["dtype"] == "float32" and setup["packed_kernel"] == "sdpa_loop"
    assert setup["activation_checkpointing"] == "full" and setup["parameters"]["total"] > 0

    (agreement,) = by_measure["agreement"]  # the CPU runs one packed kernel, the loop
    assert agreement["kernel"] == "sdpa_loop" and agreement["reference"] == "mask"
    assert agreement["agree"] is True
    assert agreement["loss_rel_diff"] <= 1e-5 and agreement["logits_rel_mean_diff"] <= 1e-5
    assert 0 <= agreement["grads_rel_diff"] <= 1e-4

    steps = by_measure["step"]
    assert [s["length"] for s in steps] == [256, 512]
    for step in steps:
        assert "error" not in step, step
        assert step["tokens_per_s"] > 0 and step["step_s"] >= step["fwd_bwd_s"] > 0
        assert step["mfu"] is None  # no bf16 peak for a CPU
        # At least 6 × the LLM's non-embedding parameters × tokens, plus the head and the ViT.
        assert step["model_flops"] > 6 * 2 * (4 * 64 * 64) * step["length"]
    # Twice the tokens, about twice the model FLOPs (the attention term grows with the samples, not L²).
    assert 1.9 < steps[1]["model_flops"] / steps[0]["model_flops"] < 2.1
