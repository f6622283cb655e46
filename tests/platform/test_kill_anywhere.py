"""Kill anywhere, deterministically: the real processes are SIGKILLed at named kill points
(`keyeflow.faults`, `KEYEFLOW_KILL_POINT=name[@N]`) inside every flow, then rerun; the rerun's tables,
checkpoints and MLflow runs equal an uninterrupted run's: no duplicate, no lost row.

Each flow's kills run as one chain in one home: the run killed at the first point is rerun with the next point
set, and so on; every run of the chain is a rerun of a crashed one (it must resume to reach its own point),
the last one runs clean to the end and is compared with a baseline home that was never killed. A run that
does not die at its point (exit code other than -9, or no "kill point NAME" line on stderr) fails the test,
and so does a kill that came too late to leave the flow unfinished (each point's partial state is checked).
No polling, no timing: the same rows are written before each death however busy the machine is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from keyeflow.datasets.tables import PRIMARY_KEYS

KEYEFLOW = str(Path(sys.executable).parent / "keyeflow")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Columns that differ between any two runs by design: when a row was written, which run wrote it.
VOLATILE = {"run_id", "flow_run_id"}


def run(home: Path, command: list[str], kill: str | None = None, timeout: int = 600) -> str:
    """Run `command` with KEYEFLOW_HOME=home; with `kill`, it must die at that kill point (its stderr says
    so), else it must succeed. Returns its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "KEYEFLOW_KILL_POINT"}
    env |= {
        "KEYEFLOW_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("KEYEFLOW_TABLES_URI", None)
    env.pop("KEYEFLOW_TRACKING_URI", None)
    if kill:
        env["KEYEFLOW_KILL_POINT"] = kill
    done = subprocess.run(
        command,
        env=env,
        cwd=REPO,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
    )
    stderr = done.stderr.decode(errors="replace")
    if kill:
        point = kill.partition("@")[0]
        assert done.returncode == -9 and f"keyeflow kill point {point} " in stderr, (
            f"{' '.join(command[1:3])}: expected death at {kill}, got exit {done.returncode}:\n"
            f"{stderr[-3000:]}"
        )
    else:
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{stderr[-3000:]}"
    return stderr


def count(home: Path, table: str) -> int:
    path = home / "tables" / f"{table}.lance"
    return lance.dataset(str(path)).count_rows() if path.exists() else 0


def table_rows(home: Path, table: str) -> dict[str, dict]:
    """A table's rows by primary key, without the columns that differ between runs by design (timestamps,
    run ids); bytes as their digest. Fails on a duplicate key."""
    data = lance.dataset(str(home / "tables" / f"{table}.lance")).to_table()
    keep = [f.name for f in data.schema if f.name not in VOLATILE and not pa.types.is_timestamp(f.type)]
    out: dict[str, dict] = {}
    for row in data.select(keep).to_pylist():
        key = row[PRIMARY_KEYS[table]]
        assert key not in out, f"duplicate {table} row {key}"
        out[key] = {k: hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else v for k, v in row.items()}
    return out


def snapshot(home: Path) -> dict[str, dict]:
    """Every table's rows (gate_results aside: its ids name the run that checked)."""
    names = sorted(p.name.removesuffix(".lance") for p in (home / "tables").glob("*.lance"))
    return {name: table_rows(home, name) for name in names if name != "gate_results"}


def verdicts(home: Path) -> set[tuple[str, str, bool]]:
    """(gate, table, passed) of every gate run recorded."""
    rows = lance.dataset(str(home / "tables" / "gate_results.lance")).to_table().to_pylist()
    return {(r["gate"], Path(r["table_uri"]).name, r["passed"]) for r in rows}


def mlflow_runs(home: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=10_000)


def run_outcomes(home: Path) -> Counter:
    """(name, status, parent's name) of every MLflow run."""
    runs = mlflow_runs(home)
    names = {r.info.run_id: r.info.run_name for r in runs}
    return Counter(
        (r.info.run_name, r.info.status, names.get(r.data.tags.get("mlflow.parentRunId", ""))) for r in runs
    )


def assert_same_outcome(crashed: Path, reference: Path) -> None:
    """The crashed-and-rerun home holds exactly the reference's rows and gate verdicts, and the same MLflow
    runs: each killed run was reopened by its rerun and finished there (no RUNNING orphan), and each subflow
    that finished before the kill was finished again in its own run (no twin)."""
    got, want = snapshot(crashed), snapshot(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), f"{name}: keys differ (lost or extra rows)"
        assert got[name] == want[name], f"{name}: row contents differ"
    assert verdicts(crashed) == verdicts(reference)
    assert run_outcomes(crashed) == run_outcomes(reference)
    assert {status for _, status, _ in run_outcomes(crashed)} == {"FINISHED"}


# ---------------------------------------------------------------------------------------------- data flows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_videos, sample_images) -> Path:
    """Two clips, two pictures, conversations and captions on them, one text file and one record whose media
    is missing (a quarantine row): every data table gets rows, in seconds."""
    root = tmp_path_factory.mktemp("kill-media")
    (root / "videos").mkdir()
    (root / "images").mkdir()
    clips = [p for p in sample_videos if p.name.startswith(("life_", "solid_colors_"))]
    pictures = [p for p in sample_images if p.name.startswith(("shapes_", "bitmap_"))]
    for path in clips:
        shutil.copy(path, root / "videos" / path.name)
    for path in pictures:
        shutil.copy(path, root / "images" / path.name)
    corpus = root / "corpus"
    (corpus / "text" / "notes-synth").mkdir(parents=True)

    def turn(kind: str, path: str, ask: str, answer: str) -> dict:
        return {
            "messages": [
                {"role": "user", "content": [{"type": kind, kind: path}, {"type": "text", "text": ask}]},
                {"role": "assistant", "content": answer},
            ]
        }

    records = [
        {"id": f"v{k}", "source": "kill-synth", "task": "caption"}
        | turn("video", f"../videos/{p.name}", "Describe the video.", f"Clip {k}: {p.stem}.")
        for k, p in enumerate(clips)
    ] + [
        {"id": f"i{k}", "source": "kill-synth", "task": "vqa"}
        | turn("image", f"../images/{p.name}", "What is shown?", f"Picture {k}: {p.stem}.")
        for k, p in enumerate(pictures)
    ]
    records.append(
        {"id": "gone", "source": "kill-synth", "task": "vqa"}
        | turn("image", "../images/missing.png", "What is shown?", "Nothing.")
    )
    (corpus / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (corpus / "captions.jsonl").write_text(
        "".join(
            json.dumps({"image": f"../images/{p.name}", "caption": f"A picture: {p.stem}.", "source": "cap"})
            + "\n"
            for p in pictures
        )
    )
    (corpus / "text" / "notes-synth" / "note-0.txt").write_text(
        "Kill points sit between two writes. A rerun finds what was written and does the rest.\n" * 20
    )
    return root


def samples_build(root: Path) -> list[str]:
    return [KEYEFLOW, "samples-build", str(root / "corpus"), "--source-root", str(root)]


# Two clips, two pictures and a text reach the stage-2 shares only with repeats (within 5 points).
MIX = [KEYEFLOW, "mix", "--stage", "2", *("--set", "upsample=true", "--set", "max_repeats=20")]
MIX += ["--set", "tolerance_pp=5"]


@pytest.fixture(scope="module")
def data_reference(tmp_path_factory, corpus) -> Path:
    """The uninterrupted run: samples-build (video ingest + pre-tokenisation, images, train_samples), mix."""
    home = tmp_path_factory.mktemp("kill-reference") / "home"
    run(home, samples_build(corpus))
    run(home, MIX)
    return home


@pytest.mark.slow
def test_data_flows_killed_at_every_commit_boundary_rerun_to_the_uninterrupted_tables(
    tmp_path, corpus, data_reference
):
    home = tmp_path / "home"
    want = {name: len(rows) for name, rows in snapshot(data_reference).items()}
    # In flow order; after each death, what is (not) written yet.
    run(home, samples_build(corpus), kill="ingest.quarantine_committed")
    assert count(home, "quarantine") == want["quarantine"] - 1 and count(home, "videos") == 0
    run(home, samples_build(corpus), kill="pretokenize.frames_committed")
    assert count(home, "videos") == want["videos"] and count(home, "video_frames") == want["video_frames"]
    assert count(home, "video_samples") == 0
    run(home, samples_build(corpus), kill="images.images_committed")
    assert count(home, "images") == want["images"] and count(home, "image_samples") == 0
    assert count(home, "video_samples") == want["video_samples"]
    run(home, samples_build(corpus), kill="samples.quarantine_committed")
    assert count(home, "image_samples") == want["image_samples"] and count(home, "train_samples") == 0
    run(home, samples_build(corpus))
    run(home, MIX, kill="mixture.before_commit")
    assert count(home, "train_samples") == want["train_samples"] and count(home, "mixtures") == 0
    run(home, MIX, kill="mixture.committed")
    assert count(home, "mixtures") == want["mixtures"]
    run(home, MIX)
    assert_same_outcome(home, data_reference)


# ---------------------------------------------------------------------------------------------- training

STEP_JOB = [sys.executable, str(HERE / "step_job.py")]
STEPS = ("pretrain-0-init", "pretrain-2-kill", "posttrain-3-mpo")
TIMINGS = {"seconds", "tokens_per_s"}  # wall-clock metrics: the only ones allowed to differ


def training_home(base: Path, data_reference: Path) -> Path:
    """A home holding a copy of the data reference's tables (its stage-2 mixture) and nothing else."""
    home = base / "home"
    shutil.copytree(data_reference / "tables", home / "tables")
    return home


def step_dir(home: Path, name: str) -> Path:
    (found,) = (home / "checkpoints").glob(f"{name}-*")
    return found


def latest(home: Path, name: str) -> str:
    path = step_dir(home, name) / "latest"
    return path.read_text().strip() if path.is_file() else ""


def done(home: Path, name: str) -> bool:
    return (step_dir(home, name) / "done.json").is_file()


def checkpoint_bytes(home: Path, name: str) -> bytes:
    record = json.loads((step_dir(home, name) / "done.json").read_text())
    return (Path(record["checkpoint"]) / "model.safetensors").read_bytes()


def metric_values(home: Path, run_id: str) -> dict[str, dict[int, set[float]]]:
    """Every metric of a run (timings aside): step → the values logged at that step. A step redone after a
    kill is logged again; deterministic training logs the same value, so the set holds one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    out: dict[str, dict[int, set[float]]] = {}
    for key in client.get_run(run_id).data.metrics:
        if key not in TIMINGS:
            for m in client.get_metric_history(run_id, key):
                out.setdefault(key, {}).setdefault(m.step, set()).add(m.value)
    return out


@pytest.fixture(scope="module")
def training_reference(tmp_path_factory, data_reference) -> Path:
    home = training_home(tmp_path_factory.mktemp("kill-train-reference"), data_reference)
    run(home, STEP_JOB)
    return home


@pytest.mark.slow
def test_training_steps_killed_mid_step_and_between_writes_resume_to_the_same_weights_and_runs(
    tmp_path, data_reference, training_reference
):
    home = training_home(tmp_path, data_reference)
    # Pre-training, after step 2's update (checkpoint every step): step 1 is the last one registered.
    run(home, STEP_JOB, kill="stage.step@2")
    assert done(home, "pretrain-0-init") and latest(home, "pretrain-2-kill") == "step-00000001"
    # The stage's final checkpoint written, its MLflow run not closed, no done.json.
    run(home, STEP_JOB, kill="step.trained")
    assert latest(home, "pretrain-2-kill") == "step-00000004" and not done(home, "pretrain-2-kill")
    # The run closed (FINISHED), done.json not written: the rerun reopens the same run and trains nothing.
    run(home, STEP_JOB, kill="step.run_closed")
    assert not done(home, "pretrain-2-kill")
    # Post-training, after MPO step 2's update.
    run(home, STEP_JOB, kill="mpo.step@2")
    assert done(home, "pretrain-2-kill") and latest(home, "posttrain-3-mpo") == "step-00000001"
    run(home, STEP_JOB)

    runs = {r.info.run_name: r for r in mlflow_runs(home)}
    want = {r.info.run_name: r for r in mlflow_runs(training_reference)}
    # One run per step (the killed step's run was reopened, not duplicated), every one finished.
    assert Counter(r.info.run_name for r in mlflow_runs(home)) == Counter(dict.fromkeys(STEPS, 1))
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    for name in STEPS:
        assert done(home, name) and latest(home, name) == latest(training_reference, name)
        assert checkpoint_bytes(home, name) == checkpoint_bytes(training_reference, name), name
        record = json.loads((step_dir(home, name) / "run.json").read_text())
        assert record["run_id"] == runs[name].info.run_id
        got = metric_values(home, runs[name].info.run_id)
        assert got == metric_values(training_reference, want[name].info.run_id), name
    assert "loss" in metric_values(home, runs["posttrain-3-mpo"].info.run_id)


# ---------------------------------------------------------------------------------------------- LongCoT


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The synthetic teacher (a real OpenAI-compatible server on 127.0.0.1) answering the sample questions
    with fixed error kinds."""
    from keyeflow.synthetic import synthetic_teacher

    settings = synthetic_teacher.teacher_config(plans=synthetic_teacher.SAMPLE_PLANS)
    with synthetic_teacher.start_server(settings, tmp_path_factory.mktemp("kill-teacher")) as (url, _):
        yield url, settings["model"]


@pytest.fixture(scope="module")
def longcot_command(tmp_path_factory, corpus, teacher) -> list[str]:
    """`keyeflow longcot` on the sample text questions and the visual ones about the corpus's pictures;
    policy review (unattended), so the review step runs without a person."""
    from keyeflow.synthetic.longcot_questions import generate_longcot_questions

    files = generate_longcot_questions(corpus / "longcot", corpus / "images")
    url, model = teacher
    return [
        *(KEYEFLOW, "longcot", str(files["dir"]), "--source-root", str(corpus)),
        *("--review", "auto_approve", "--backend", "openai", "--base-url", url, "--model", model),
    ]


@pytest.mark.slow
def test_longcot_killed_in_generation_and_in_review_reruns_to_the_uninterrupted_tables(
    tmp_path_factory, longcot_command
):
    reference = tmp_path_factory.mktemp("kill-longcot-reference") / "home"
    run(reference, longcot_command)
    want = {name: len(rows) for name, rows in snapshot(reference).items()}

    home = tmp_path_factory.mktemp("kill-longcot") / "home"
    # Generation: the first batch's paths written (8 questions per batch), the later batches not generated.
    run(home, longcot_command, kill="longcot_generate.paths_committed")
    assert 0 < count(home, "longcot_paths") < want["longcot_paths"]
    # Review: the decisions' outcomes written to longcot_reviews, the paths not updated, nothing published.
    run(home, longcot_command, kill="longcot_review.reviews_committed")
    assert count(home, "longcot_reviews") == want["longcot_reviews"] and count(home, "longcot") == 0
    run(home, longcot_command)
    assert_same_outcome(home, reference)
