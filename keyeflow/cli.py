"""The ``keyeflow`` command. Flows are imported lazily so `keyeflow sql` starts fast."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import typer
from rich.columns import Columns
from rich.console import Console
from rich.table import Table

# No network here or on most clusters' workers: Prefect's telemetry would only log errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Each command starts Prefect's temporary server; with two commands at once on a busy machine its 20 s
# default start-up timeout fails the command before any work is done.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(
    help="keyeflow: Keye-VL-1.5 data and training flows",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # whole lines: people grep and copy error text


@app.callback()
def main(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="every log line in the terminal (Prefect's task and flow run states, INFO of every library); "
        "without it: progress bars, one line per training stage, warnings, errors and the summary",
    ),
):
    """keyeflow: Keye-VL-1.5 data and training flows. Every log line of a flow run is in the Prefect UI
    whether or not the terminal shows it."""
    # Read by Prefect's logging set-up when the flows are imported (after this): the console handler keeps
    # WARNING and above, the API handler (the Prefect UI's logs) still gets everything. An explicit setting in
    # the environment wins. Where Prefect is already imported (a test calling the app in-process) its logging
    # is set up and the variables would only leak into whatever the process starts next.
    if not verbose and "prefect" not in sys.modules:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables"


def _overrides(values: list[str] | None) -> dict:
    """--set key=value pairs; values parse as JSON where they can (numbers, booleans)."""
    out = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _split_overrides(values: list[str] | None) -> dict[str, list[str]]:
    """`keyeflow run`'s --set FLOW.KEY=VALUE, per flow."""
    out: dict[str, list[str]] = {"pretrain": [], "posttrain": []}
    for item in values or []:
        flow, dot, rest = item.partition(".")
        if flow not in out or not dot:
            errors.print(
                f"[red]error:[/red] --set {item!r}: start the key with the flow it changes, pretrain. or "
                "posttrain. (pretrain.stage2.learning_rate=1e-5)"
            )
            raise typer.Exit(2)
        out[flow].append(rest)
    return out


def _pretrain_recipe_or_exit(source: str, overrides: list[str] | None, init: str | None = None):
    """The resolved recipe, checked before any flow starts: a bad source or override exits 2 naming it."""
    from keyeflow.training.recipe_source import RecipeError, load_pretrain_recipe

    try:
        return load_pretrain_recipe(source, overrides, init)
    except RecipeError as exc:
        errors.print(f"[red]recipe refused, nothing ran:[/red] {exc}", highlight=False)
        raise typer.Exit(2)


def _posttrain_recipe_or_exit(source: str, overrides: list[str] | None):
    from keyeflow.training.recipe_source import RecipeError, load_posttrain_recipe

    try:
        return load_posttrain_recipe(source, overrides)
    except RecipeError as exc:
        errors.print(f"[red]recipe refused, nothing ran:[/red] {exc}", highlight=False)
        raise typer.Exit(2)


RECIPE_HELP = (
    "a built-in name (tiny, keye-8b, …), a YAML/TOML recipe file (`base:` + changes) or module:function"
)
SET_HELP = "recipe override KEY=VALUE, a dotted path into the recipe (stage2.learning_rate=1e-5; repeatable)"


# The synthetic teacher listens on this port when it is free. The teacher's URL is part of the LongCoT
# generation config hash (GenerationConfig.config_hash), so a rerun must reach it at the same URL to find its
# paths done; a random free port would make every `keyeflow run` generate (and post-train on) new paths.
SYNTHETIC_TEACHER_PORT = 18431
# Items per verifiable task family (keyeflow.synthetic.verifiable_tasks) `keyeflow run` draws and asks.
TASK_ITEMS_PER_FAMILY = 60


@app.command()
def run(
    preset: str = typer.Option("paper", help="Slow-Fast preset: paper or keye-vl-utils"),
    stages: str = typer.Option("1,2,3", help="pre-training stages the data flow builds mixtures for"),
    teacher_url: str | None = typer.Option(
        None,
        help="an OpenAI-compatible teacher for the LongCoT step (API root with /v1; key from "
        "$OPENAI_API_KEY) instead of the synthetic one",
    ),
    teacher_model: str | None = typer.Option(None, help="the served model name of --teacher-url"),
    pretrain_recipe_source: str = typer.Option(
        "tiny", "--pretrain-recipe", help="pre-training recipe: a name, a YAML/TOML file or module:function"
    ),
    posttrain_recipe_source: str = typer.Option(
        "tiny", "--posttrain-recipe", help="post-training recipe: a name, a YAML/TOML file or module:function"
    ),
    set_: list[str] | None = typer.Option(
        None,
        "--set",
        help="recipe override FLOW.KEY=VALUE, FLOW pretrain or posttrain "
        "(pretrain.stage2.learning_rate=1e-5; repeatable)",
    ),
):
    """The whole DAG on generated sample data with embedded defaults: data flows → pretrain (tiny) →
    LongCoT (the synthetic teacher unless --teacher-url) → posttrain (tiny; `--posttrain-recipe tiny-learn`
    is sized for every learning signal to show, about 5 minutes on 2 cores), then a summary and where to
    look. A rerun reuses everything that did not change."""
    if (teacher_url is None) != (teacher_model is None):
        raise typer.BadParameter("--teacher-url and --teacher-model go together")
    # transformers draws a "Writing model shards" bar for every tiny checkpoint it saves, dozens of lines
    # between the flows' own progress; read when transformers is imported, so set before the flows are.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The recipes are checked before anything runs (they import transformers: after the line above).
    by_flow = _split_overrides(set_)
    pre_recipe = _pretrain_recipe_or_exit(pretrain_recipe_source, by_flow["pretrain"])
    _posttrain_recipe_or_exit(posttrain_recipe_source, by_flow["posttrain"])
    from keyeflow.config import get_settings
    from keyeflow.flows.data import data_pipeline
    from keyeflow.flows.longcot import longcot as longcot_flow
    from keyeflow.flows.posttrain import posttrain as posttrain_flow
    from keyeflow.flows.pretrain import pretrain as pretrain_flow
    from keyeflow.quality.gates import GateFailed
    from keyeflow.synthetic.corpus import generate_corpus
    from keyeflow.synthetic.images import generate_images
    from keyeflow.synthetic.longcot_questions import generate_longcot_questions
    from keyeflow.synthetic.verifiable_tasks import write_task_questions
    from keyeflow.synthetic.videos import generate_videos
    from keyeflow.tasks.common import PromotionBlocked

    settings = get_settings()
    root = settings.samples_dir
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    step = "data-pipeline"

    def begin(name: str, what: str) -> float:
        nonlocal step
        step = name
        console.rule(f"[bold]{name}[/bold]: {what}", align="left")
        return time.perf_counter()

    try:
        t0 = begin("data-pipeline", f"sample media and corpus in {root} → tables → gates → mixtures")
        videos = generate_videos(root / "videos")
        pictures = generate_images(root / "images")
        generate_corpus(root / "corpus", videos, pictures)
        stage_list = [int(s) for s in stages.split(",")]
        # The mixtures the tiny recipe trains on (its stage-2 upsampling, contexts and hold-out), not the bare
        # stage defaults: the sample data is too small to reach stage 2's shares within 0.5 pp using each
        # sample once, so a default stage-2 mixture fails its gate as soon as token counts shift a little.
        recipe = pre_recipe
        data = data_pipeline(
            [str(root / "videos")],
            [str(root / "images")],
            [str(root / "corpus")],
            str(root),
            preset=preset,
            stages=stage_list,
            mixture_overrides={str(s): recipe.mixture_overrides(s) for s in stage_list},
        )
        seconds["data-pipeline"] = time.perf_counter() - t0

        t0 = begin(
            "pretrain",
            f"recipe {pre_recipe.name}: stages 1 → 2 → 3 (variants) → 4 (fusion), each gated",
        )
        pre = pretrain_flow(pretrain_recipe_source, overrides=by_flow["pretrain"] or None)
        seconds["pretrain"] = time.perf_counter() - t0

        t0 = begin(
            "longcot",
            "sample and task questions → generate → assess → review (unattended: keep out) → score → gates",
        )
        questions = generate_longcot_questions(root / "longcot", root / "images", root / "videos")
        tasks = write_task_questions(root / "tasks", root / "tasks" / "media", TASK_ITEMS_PER_FAMILY)
        sources = [str(questions["dir"]), str(tasks["train"].parent)]  # held-out items stay out of training
        teacher_dir = settings.root / "synthetic-teacher"
        with _longcot_teacher(teacher_url, teacher_model, teacher_dir, [tasks["train"]]) as generation:
            cot = longcot_flow(sources, str(root), generation=generation)
        seconds["longcot"] = time.perf_counter() - t0

        t0 = begin(
            "posttrain",
            f"recipe {posttrain_recipe_source} from the pretrain checkpoint: SFT → reward model → MPO → "
            "LongCoT SFT + expert merge → GSPO rounds → alignment RL",
        )
        post = posttrain_flow(
            pre["checkpoint"],
            posttrain_recipe_source,
            heldout=[str(tasks["heldout"].parent)],
            source_root=str(root),
            overrides=by_flow["posttrain"] or None,
        )
        seconds["posttrain"] = time.perf_counter() - t0
    except (GateFailed, PromotionBlocked, ValueError, LookupError, OSError, RuntimeError) as exc:
        # RuntimeError covers a synthetic teacher that would not start; ValueError a mixture shortfall or a
        # failed rollout/trainer input check; the flows' own runs in MLflow and Prefect keep the details.
        errors.print(f"[red]stopped in {step}:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(2)
    _run_summary(data, pre, cot, post, seconds, time.perf_counter() - started)


@contextlib.contextmanager
def _longcot_teacher(
    url: str | None, model: str | None, workdir: Path, task_files: Sequence[Path] = ()
) -> Iterator[dict]:
    """The LongCoT flow's generation settings: the given teacher server, or the synthetic teacher started for
    the step (and stopped after it) on 127.0.0.1, solving the sample questions and those of ``task_files``."""
    if url:
        console.print(f"LongCoT teacher: {model} at {url}")
        yield {"backend": "openai", "base_url": url, "model": model}
        return
    from keyeflow.synthetic import synthetic_teacher

    port = SYNTHETIC_TEACHER_PORT if _port_is_free(SYNTHETIC_TEACHER_PORT) else synthetic_teacher.free_port()
    config = synthetic_teacher.teacher_config(task_files)
    with synthetic_teacher.start_server(config, workdir, port=port) as (base_url, log):
        console.print(
            "LongCoT teacher: the synthetic teacher (no teacher model runs on a CPU): a programmatic solver "
            "writing reasoning paths from the questions' reference solutions, with seeded errors, at "
            f"{base_url} (keyeflow.synthetic.synthetic_teacher); requests logged in {log}"
        )
        if port != SYNTHETIC_TEACHER_PORT:
            console.print(
                f"  port {SYNTHETIC_TEACHER_PORT} is taken, so the teacher's URL differs from other "
                "runs' and its paths are generated again"
            )
        yield {"backend": "openai", "base_url": base_url, "model": config["model"]}
    console.print("LongCoT teacher stopped")


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR as the server sets it: the previous run's connections in TIME_WAIT do not make it busy.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _checkpoint_cell(checkpoint: str, name: str, root: Path) -> str:
    """A step's checkpoint as the part of its path that differs from the others: steps write to
    ``checkpoints/<stage>-<key>[/step-N]/model`` under the data root, so the key (and step) name it."""
    path = Path(checkpoint)
    try:
        relative = path.relative_to(root / "checkpoints")
    except ValueError:
        return checkpoint
    text = str(relative.parent if relative.name == "model" else relative)
    return "…-" + text.removeprefix(f"{name}-") if text.startswith(f"{name}-") else text


def _run_summary(
    data: dict, pre: dict, cot: dict, post: dict, seconds: dict[str, float], total: float
) -> None:
    from rich import box
    from rich.markup import escape

    from keyeflow.config import get_settings
    from keyeflow.datasets import tables

    settings = get_settings()
    root = settings.root
    console.rule("[bold]summary[/bold]", align="left")
    # Tables side by side as name@version (rows): one line each would push the rest off the screen.
    entries = []
    for name in tables.list_tables():
        ds = tables.open_table(name)
        entries.append(f"{name}@v{ds.version} ({ds.count_rows()})")
    console.print(f"tables in {settings.tables}, name@version (rows):")
    console.print(Columns(entries, padding=(0, 3)))
    for stage, mix in (data.get("mixtures") or {}).items():
        shares = ", ".join(f"{m} {100 * v:.1f}%" for m, v in mix["shares"].items())
        console.print(f"stage {stage} mixture {mix['mixture_id'][:12]}: {shares}")
    s = cot["summary"]
    reviews = ", ".join(f"{action} {count}" for action, count in (cot["review"]["actions"] or {}).items())
    console.print(
        f"LongCoT: {len(cot['question_ids'])} questions, {s['num_paths']} paths (A {s['num_A']}, "
        f"B {s['num_B']}, C {s['num_C']}), {s['num_kept']} kept; "
        f"reviews: {reviews or 'none needed'}"
    )

    # One line per run, so it fits a terminal: stage names without their flow's prefix, checkpoints by the
    # part of the path that differs (the final one is printed whole below), full run ids (they are what
    # `keyeflow lineage` and the MLflow UI take).
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title_justify="left",
        title=escape(f"runs (checkpoints: {root}/checkpoints/<stage>-KEY[/step-N]/model)"),
    )
    table.add_column("flow / stage", no_wrap=True)
    table.add_column("done", no_wrap=True)
    table.add_column("checkpoint", overflow="fold", min_width=10)
    table.add_column("MLflow run", no_wrap=True)
    flows = (
        ("data-pipeline", data, None),
        ("pretrain", pre, "pretrain"),
        ("longcot", cot, None),
        ("posttrain", post, "posttrain"),
    )
    for flow, result, prefix in flows:
        table.add_row(f"[bold]{flow}[/bold]", f"{seconds[flow]:.0f} s", "", result["run_id"])
        for stage in (result.get("stages") or {}).values() if prefix else ():
            name = stage["name"]
            if name.startswith(f"{prefix}-"):
                label = "  " + name.removeprefix(f"{prefix}-")
                done = "trained" if stage["trained"] else "skipped"
            else:  # post-training starts from pre-training's last checkpoint: that step's run, not a new one
                label, done = f"  from {name}", ""
            table.add_row(label, done, _checkpoint_cell(stage["checkpoint"], name, root), stage["run_id"])
    console.print(table)
    _learning_signals(post)
    # soft_wrap: paths and commands are not broken by inserted newlines, so they copy whole.
    console.print(f"[bold]final checkpoint[/bold] {post['checkpoint']}", soft_wrap=True)
    console.print(f"done in {total:.0f} s. Where to look:")
    where = [
        f"keyeflow lineage {post['checkpoint']}",
        'keyeflow sql "select grade, status, count(*) from longcot_paths group by all"',
        'keyeflow sql "select stage, modality, sum(num_tokens * repeats) from mixtures group by all"',
        f"mlflow ui --backend-store-uri {settings.mlflow_uri}   # runs, metrics, gate reports",
        "prefect server start   # then http://127.0.0.1:4200: these flow runs, tasks and artifacts",
    ]
    for line in where:
        console.print(f"  {line}", soft_wrap=True, highlight=False)


def _tables_overview() -> Table:
    from keyeflow.datasets import tables

    table = Table(title="keyeflow tables")
    for col in ("table", "version", "rows", "uri"):
        table.add_column(col)
    for name in tables.list_tables():
        ds = tables.open_table(name)
        table.add_row(name, str(ds.version), str(ds.count_rows()), ds.uri)
    return table


def _summary(result: dict, seconds: float) -> None:
    from keyeflow.config import get_settings

    settings = get_settings()
    console.print(_tables_overview())
    if result.get("video"):
        ing, tok = result["video"]["ingest"], result["video"]["pretokenize"]
        console.print(
            f"videos: {ing['num_ingested']} new, {ing['num_already_present']} already in, "
            f"{ing['num_duplicates']} duplicates, "
            f"{ing['num_quarantined'] + tok['num_quarantined']} quarantined; "
            f"{tok['num_done']} pre-tokenised ({tok['total_tokens']} vision tokens)"
        )
    if result.get("samples"):
        console.print(
            f"training samples: {result['samples']['num_written']} new, "
            f"{result['samples']['num_quarantined']} quarantined"
        )
    for stage, mix in (result.get("mixtures") or {}).items():
        shares = ", ".join(f"{m} {100 * v:.2f}%" for m, v in mix["shares"].items())
        console.print(f"stage {stage} mixture {mix['mixture_id'][:12]} @ {mix['mixture']}: {shares}")
    console.print(f"MLflow run: {result['run_id']}  (tracking URI {settings.mlflow_uri})")
    console.print(f"done in {seconds:.1f} s. Where to look:")
    console.print('  keyeflow sql "select reason, count(*) from quarantine group by reason"')
    console.print(
        '  keyeflow sql "select stage, modality, sum(num_tokens * repeats) from mixtures group by all"'
    )
    console.print(f"  mlflow ui --backend-store-uri {settings.mlflow_uri}")
    console.print("  prefect server start   (then http://127.0.0.1:4200)")


@app.command()
def ingest(
    paths: list[str] = typer.Argument(..., help="files, folders or fsspec URIs"),
    preset: str = typer.Option("paper", help="Slow-Fast preset for pre-tokenisation"),
    set_: list[str] | None = typer.Option(None, "--set", help="Slow-Fast override key=value"),
    pretokenize: bool = typer.Option(True, help="also pre-tokenise what was ingested"),
    shard_size: int = typer.Option(16, min=1, help="files per ingestion shard (one commit each)"),
    pretokenize_shard_size: int = typer.Option(4, min=1, help="videos per pre-tokenisation shard"),
):
    """Ingest videos (probe, hash, register) and by default pre-tokenise them."""
    from keyeflow.flows.video import ingest_videos, video_pipeline

    started = time.perf_counter()
    if pretokenize:
        result = video_pipeline(
            paths,
            preset=preset,
            overrides=_overrides(set_),
            shard_size=shard_size,
            pretokenize_shard_size=pretokenize_shard_size,
        )
        _summary({"run_id": result["run_id"], "video": result}, time.perf_counter() - started)
    else:
        result = ingest_videos(paths, shard_size=shard_size)
        console.print({k: v for k, v in result.items() if k.startswith("num_")})


@app.command("pretokenize")
def pretokenize_cmd(
    preset: str = typer.Option("paper"),
    set_: list[str] | None = typer.Option(None, "--set", help="Slow-Fast override key=value"),
    videos_version: int | None = typer.Option(None, help="pin the videos table version"),
):
    """Slow-Fast pre-tokenise ingested videos (skips what this config already did)."""
    from keyeflow.flows.video import pretokenize_videos

    result = pretokenize_videos(preset, _overrides(set_), videos_version=videos_version)
    console.print({k: v for k, v in result.items() if k.startswith("num_") or k == "total_tokens"})


@app.command("ingest-images")
def ingest_images_cmd(
    paths: list[str] = typer.Argument(..., help="image files or folders"),
    max_tokens: int = typer.Option(20480, help="per-image token cap (4..20480 in the recipe)"),
):
    """Ingest and pre-tokenise images (EXIF honoured, bad files quarantined)."""
    from keyeflow.flows.data import ingest_images

    result = ingest_images(paths, max_tokens=max_tokens)
    console.print({k: v for k, v in result.items() if k.startswith("num_")})


@app.command("samples-build")
def samples_build(
    paths: list[str] = typer.Argument(
        ..., help="JSONL conversations/captions and .txt corpora (files or folders)"
    ),
    source_root: Path = typer.Option(..., help="media paths must stay inside this folder"),
    preset: str = typer.Option("paper"),
):
    """Ingest referenced media, then count every conversation/caption/text sample into train_samples."""
    from keyeflow.flows.data import build_train_samples

    result = build_train_samples(paths, str(source_root), preset=preset)
    console.print({k: v for k, v in result.items() if k.startswith("num_")})


@app.command()
def mix(
    stage: int = typer.Option(..., help="pre-training stage (1, 2 or 3)"),
    set_: list[str] | None = typer.Option(
        None, "--set", help="MixtureConfig override key=value (JSON values)"
    ),
    samples_version: int | None = typer.Option(None, help="pin the train_samples version"),
):
    """Build the stage's token-balanced mixture (24/50/26 in stage 3) and report the shares reached."""
    from keyeflow.datasets.mixture import MixtureShortfall
    from keyeflow.flows.data import build_mixture

    try:
        result = build_mixture(stage, _overrides(set_), samples_version)
    except MixtureShortfall as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    shares = ", ".join(f"{m} {100 * v:.2f}%" for m, v in result["shares"].items())
    console.print(f"mixture {result['mixture_id']} at {result['mixture']}: {shares}")


@app.command()
def slowfast(
    video: str,
    preset: str = typer.Option("paper"),
    set_: list[str] | None = typer.Option(None, "--set", help="override key=value"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Show how one video would be tokenised: frame types, timestamps, sizes, totals."""
    from keyeflow.datasets.pretokenize import sample_frames
    from keyeflow.datasets.slowfast import allocate_tokens, resolve_config, select_frames
    from keyeflow.datasets.video import BadVideo, as_local_file, content_hash, probe

    config = resolve_config(preset, **_overrides(set_))
    try:
        _, size = content_hash(video)
        with as_local_file(video) as path:
            info = probe(video, path, size)
            decoded = sample_frames(info, path, config)
    except BadVideo as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    types = select_frames(decoded.frames, config=config)
    (sh, sw), (fh, fw), total = allocate_tokens(types, info.height, info.width, config=config)[:3]
    factor2 = config.factor**2
    out = {
        "video": video,
        "preset": preset,
        "config_hash": config.config_hash(),
        "sampling_fps": decoded.fps,
        "frame_types": ["slow" if x == 0 else "fast" for x in types.tolist()],
        "timestamps": [round(float(x), 3) for x in decoded.timestamps],
        "num_slow": int((types == 0).sum()),
        "num_fast": int((types == 1).sum()),
        "slow_size": [sh, sw],
        "fast_size": [fh, fw],
        "slow_tokens": sh * sw // factor2,
        "fast_tokens": fh * fw // factor2,
        "total_tokens": int(total),
        "token_budget": config.total_token_budget,
    }
    if as_json:
        print(json.dumps(out))
        return
    strip = "".join("S" if x == 0 else "f" for x in types.tolist())
    console.print(f"{video}: {out['num_slow']} slow / {out['num_fast']} fast frames at {decoded.fps:.3g} fps")
    console.print(f"  {strip}")
    console.print(
        f"  slow {sh}x{sw} ({out['slow_tokens']} tok)  fast {fh}x{fw} ({out['fast_tokens']} tok)  "
        f"total {total} / budget {config.total_token_budget}"
    )


@app.command()
def longcot(
    questions: list[str] = typer.Argument(..., help="question JSONL files or folders (conversation format)"),
    source_root: Path | None = typer.Option(
        None, help="media must stay inside this folder (default: the common folder of the questions)"
    ),
    review: str = typer.Option(
        "keep_out",
        help="who decides on B and borderline A: keep_out, auto_approve "
        "(unattended) or prefect (pause for a person in the Prefect UI)",
    ),
    review_timeout: int = typer.Option(3600, min=1, help="seconds to wait for a person's decision (prefect)"),
    on_timeout: str = typer.Option(
        "keep_out", help="what an item gets without a decision: keep_out or auto_approve"
    ),
    backend: str = typer.Option("local", help="local (our model in process) or openai (a server)"),
    model_path: str | None = typer.Option(None, help="local checkpoint (default: the tiny random one)"),
    base_url: str | None = typer.Option(None, help="OpenAI-compatible API root with /v1 (openai backend)"),
    served_model: str | None = typer.Option(None, "--model", help="served model name (openai backend)"),
    n: int = typer.Option(4, min=1, help="paths per question"),
    temperature: float = typer.Option(1.0, min=0.0),
    max_new_tokens: int = typer.Option(256, min=1),
    judge: str = typer.Option(
        "rule", help="process judge: rule (heuristics) or model (the generator, as JSON)"
    ),
    rewrite: bool = typer.Option(False, help="ask the generator for harder rewrites (kept only if sane)"),
    merge: bool = typer.Option(False, help="add two-part questions merged from questions on the same media"),
    min_samples: int = typer.Option(1, min=0, help="the output gate's minimum number of kept samples"),
):
    """LongCoT cold-start data: collect → generate → assess → review → score → gates → the longcot table."""
    from keyeflow.flows.longcot import longcot as longcot_flow
    from keyeflow.quality.gates import GateFailed

    generation = {
        "backend": backend,
        "model_path": model_path,
        "base_url": base_url,
        "model": served_model,
        "n": n,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
    }
    started = time.perf_counter()
    try:
        result = longcot_flow(
            questions,
            str(source_root) if source_root else None,
            review=review,
            review_timeout_s=review_timeout,
            on_timeout=on_timeout,
            generation=generation,
            judge={"kind": judge},
            collect={"rewrite": rewrite, "merge": merge},
            gates={"min_samples": min_samples},
        )
    except GateFailed as exc:
        errors.print(f"[red]gate failed:[/red] {exc}")
        errors.print(
            '  see: keyeflow sql "select grade, status, stage, reason, count(*) '
            'from longcot_paths group by all"'
        )
        raise typer.Exit(2)
    except ValueError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    s, c = result["summary"], result["collect"]
    console.print(
        f"questions: {len(result['question_ids'])} ({c['num_new']} new, {c['num_duplicates']} duplicates, "
        f"{c['num_quarantined']} quarantined); paths: {s['num_paths']} "
        f"(A {s['num_A']}, B {s['num_B']}, C {s['num_C']}); kept {s['num_kept']}, dropped {s['num_dropped']}"
    )
    console.print(
        f"reviews: {result['review']['actions'] or 'none needed'}; scores: {result['score']['scores']}; "
        f"repeats in training: {result['score']['total_repeats']}"
    )
    console.print(
        f"longcot table @ {result['longcot']}; MLflow run {result['run_id']}; "
        f"done in {time.perf_counter() - started:.1f} s. Where to look:"
    )
    console.print('  keyeflow sql "select grade, count(*) from longcot_paths group by grade"')
    console.print(
        '  keyeflow sql "select stage, reason, count(*) from longcot_paths '
        "where status = 'dropped' group by all\""
    )
    console.print('  keyeflow sql "select reviewer, action, outcome, note from longcot_reviews"')
    console.print('  keyeflow sql "select domain, grade, score, repeats, reviewer_action from longcot"')


@app.command()
def pretrain(
    recipe: str = typer.Option(
        "tiny", help=f"tiny (CPU, minutes), keye-8b (the paper's settings); {RECIPE_HELP}"
    ),
    init: str | None = typer.Option(None, help="checkpoint stage 1 starts from (default: fresh weights)"),
    samples_version: int | None = typer.Option(None, help="train_samples version to pin (default: latest)"),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
):
    """Pre-training stages 1 → 2 → 3 (annealing variants) → 4 (fusion), each evaluated and gated; unchanged
    stages are skipped, a killed stage resumes."""
    from keyeflow.flows.pretrain import pretrain as pretrain_flow
    from keyeflow.quality.gates import GateFailed
    from keyeflow.tasks.common import PromotionBlocked

    _pretrain_recipe_or_exit(recipe, set_, init)
    started = time.perf_counter()
    try:
        result = pretrain_flow(recipe, init, samples_version, overrides=set_ or None)
    except (GateFailed, PromotionBlocked, ValueError) as exc:
        errors.print(f"[red]stopped:[/red] {exc}")
        raise typer.Exit(2)
    _stages_summary("pre-training stages", result, time.perf_counter() - started)


def _stages_summary(title: str, result: dict, seconds: float) -> None:
    table = Table(title=title)
    for col in ("stage", "done now", "checkpoint", "MLflow run"):
        table.add_column(col)
    for name, stage in result["stages"].items():
        table.add_row(
            name,
            "trained" if stage["trained"] else "unchanged (skipped)",
            stage["checkpoint"],
            stage["run_id"],
        )
    console.print(table)
    console.print(f"final checkpoint: {result['checkpoint']}  ({seconds:.1f} s)")
    console.print(f"  keyeflow lineage {result['checkpoint']}")


@app.command()
def posttrain(
    checkpoint: str = typer.Argument(
        "latest-pretrain", help="checkpoint to start from (default: the newest pretrain run's)"
    ),
    recipe: str = typer.Option("tiny", help=f"tiny (CPU, minutes), keye-8b; {RECIPE_HELP}"),
    samples_version: int | None = typer.Option(None, help="train_samples version to pin (default: latest)"),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    heldout: list[str] | None = typer.Option(
        None,
        help="held-out question files or folders (JSONL, LongCoT conversation format) no stage trains on: "
        "learning signals and the RL gate are measured on them (repeatable)",
    ),
    source_root: str | None = typer.Option(None, help="folder the held-out media lie in (default: samples)"),
):
    """Post-training: SFT → reward model → MPO → LongCoT SFT + expert merge → GSPO rounds → alignment RL;
    unchanged stages are skipped, a killed one resumes."""
    from keyeflow.flows.posttrain import posttrain as posttrain_flow
    from keyeflow.tasks.common import PromotionBlocked
    from keyeflow.training.rl import RolloutInputMismatch

    _posttrain_recipe_or_exit(recipe, set_)
    started = time.perf_counter()
    try:
        result = posttrain_flow(
            checkpoint,
            recipe,
            samples_version,
            heldout=heldout or None,
            source_root=source_root,
            overrides=set_ or None,
        )
    except (RolloutInputMismatch, PromotionBlocked, ValueError, FileNotFoundError, LookupError) as exc:
        errors.print(f"[red]stopped:[/red] {exc}")
        raise typer.Exit(2)
    _stages_summary("post-training stages", result, time.perf_counter() - started)
    _learning_signals(result)


def _learning_signals(result: dict) -> None:
    from keyeflow.tasks.posttrain import signal_lines

    lines = signal_lines(result.get("signals") or {})
    if lines:
        console.print("[bold]what post-training learned[/bold] (held-out items):")
        for line in lines:
            console.print(f"  {line}", soft_wrap=True, highlight=False)


@app.command("recipe")
def recipe_show(
    source: str = typer.Argument(..., help=RECIPE_HELP),
    flow: str = typer.Option("pretrain", help="whose recipe: pretrain or posttrain"),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
):
    """Print the resolved recipe as YAML: every key `--set` and a recipe file can change, with its value."""
    import yaml

    from keyeflow.training.recipe_source import to_plain

    if flow not in ("pretrain", "posttrain"):
        errors.print(f"[red]error:[/red] --flow {flow!r}: pretrain or posttrain")
        raise typer.Exit(2)
    if flow == "pretrain":
        resolved = _pretrain_recipe_or_exit(source, set_)
    else:
        resolved = _posttrain_recipe_or_exit(source, set_)
    # Itself a recipe file: saved, edited and passed back as --recipe, it gives this recipe (and its hash).
    changes = f" with {' '.join(set_)}" if set_ else ""
    print(f"# {flow} recipe {source}{changes} (hash {resolved.config_hash()})")
    base = str(Path(source).resolve()) if source.lower().endswith((".yaml", ".yml", ".toml")) else source
    print(yaml.safe_dump({"base": base, **to_plain(resolved)}, sort_keys=False), end="")


@app.command()
def lineage(
    target: str = typer.Argument(..., help="a checkpoint directory or an MLflow run id"),
    as_json: bool = typer.Option(False, "--json", help="print the whole chain as JSON"),
    show: int = typer.Option(5, help="source files listed per kind in the text view"),
):
    """The chain behind a checkpoint: stage runs → mixtures → table versions → source media, with gate
    verdicts."""
    from keyeflow import lineage as lineage_mod

    try:
        chain = lineage_mod.trace(target)
    except (LookupError, KeyError, ValueError) as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(chain, indent=2, default=str))
        return
    from rich.tree import Tree

    root = Tree(f"[bold]{chain['checkpoint'] or chain['target']}[/bold]  (run {chain['run_id']})")
    for step in chain["steps"]:
        gate = {"passed": "[green]promoted[/green]", "failed": "[red]not promoted[/red]"}.get(
            step["promotion"], ""
        )
        node = root.add(f"{step['name']}  run {step['run_id']}  {step['status']}  {gate}")
        if step["checkpoint"]:
            node.add(f"checkpoint {step['checkpoint']}")
        if step.get("model"):
            versions = [
                f"{v['name']} v{v['version']}" + (f" ({', '.join(v['aliases'])})" if v["aliases"] else "")
                for v in step["model"]["registered"]
            ]
            node.add(
                f"logged model {step['model']['model_id']}"
                + (" = " + ", ".join(versions) if versions else "")
            )
        if step["upstream_run_ids"]:
            node.add("from runs " + ", ".join(step["upstream_run_ids"]))
        if step["mixture"]:
            node.add(
                f"mixture {step['mixture']['mixture_id']} "
                f"@ {step['mixture']['uri']}@v{step['mixture']['version']}"
            )
    for m in chain["mixtures"]:
        node = root.add(
            f"mixture {m['mixture_id']} (stage {m['stage']}) {m['mixture']}  "
            f"train_samples@v{m['train_samples_version']}"
        )
        node.add(
            "samples "
            + ", ".join(f"{k} {v}" for k, v in m["samples_by_modality"].items())
            + "; tokens "
            + ", ".join(f"{k} {v}" for k, v in m["tokens_by_modality"].items())
        )
        node.add(
            f"sources: {m['num_videos']} videos, {m['num_images']} images, {m['num_texts']} texts "
            f"({m['num_source_records']} source records)"
        )
        gates = node.add("gates")
        for g in m["gates"]:
            if g["gate"] is None:
                gates.add(f"[yellow]{g['num_unchecked_rows']} rows of {g['table']} with no verdict[/yellow]")
            else:
                verdict = "[green]passed[/green]" if g["passed"] else "[red]failed[/red]"
                gates.add(f"{g['gate']} on {g['table']}@v{g['version']}: {verdict} (run {g['run_id']})")
    sources = chain["sources"]
    node = root.add(
        f"all sources: {sources['num_videos']} videos, {sources['num_images']} images, "
        f"{sources['num_texts']} texts"
    )
    for kind in ("videos", "images"):
        for uri in sources[kind][:show]:
            node.add(uri)
        if len(sources[kind]) > show:
            node.add(f"… {len(sources[kind]) - show} more {kind} (--json lists all)")
    console.print(root)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="a checkpoint's model directory (ours or Keye-VL-1.5's)"),
    out_dir: Path = typer.Argument(..., help="new or empty directory for the Keye-VL-1.5 layout"),
    dtype: str = typer.Option("bf16", help="bf16 or fp32"),
):
    """The checkpoint in the Keye-VL-1.5 Hugging Face layout (config.json, safetensors under the released
    names, tokenizer with the chat template, preprocessor config): what Keye's code, vLLM and SGLang load."""
    from keyeflow.model.export import export_keye

    try:
        out = export_keye(checkpoint, out_dir, dtype=dtype)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    files = sorted(p.name for p in out.iterdir())
    console.print(f"exported {checkpoint} → {out} ({dtype}): {', '.join(files)}", soft_wrap=True)


@app.command()
def plan(
    recipe: str = typer.Option(..., help="a recipe name (tiny, keye-8b, tiny-learn, …)"),
    flow: str = typer.Option("pretrain", help="whose stages: pretrain, posttrain or all"),
    nodes: int = typer.Option(1, min=1, help="machines"),
    gpus_per_node: int = typer.Option(8, min=1, help="GPUs per machine"),
    gpu_memory_gib: float = typer.Option(80.0, help="memory of one GPU in GiB"),
    rl_prompt_tokens: int = typer.Option(4_096, min=1, help="a GSPO prompt's tokens (no config bounds them)"),
    as_json: bool = typer.Option(False, "--json", help="print the plans as JSON"),
    compare: bool = typer.Option(
        False, "--compare", help="also weigh other layouts (ZeRO, sequence, pipeline, tensor) for stage 3"
    ),
):
    """Memory per GPU of every training stage of RECIPE on the cluster, and whether it fits: parameters,
    gradients, optimizer, activations, logit chunks, ViT and buffers under each stage's layout. Exits 1 when a
    stage cannot run, naming it and what does not fit."""
    from keyeflow.training.memory_plan import GIB, Cluster, plan_posttrain, plan_pretrain
    from keyeflow.training.posttrain_recipe import RECIPES as POSTTRAIN_RECIPES
    from keyeflow.training.posttrain_recipe import posttrain_recipe
    from keyeflow.training.recipes import RECIPES as PRETRAIN_RECIPES
    from keyeflow.training.recipes import pretrain_recipe

    flows = {"pretrain": ("pretrain",), "posttrain": ("posttrain",), "all": ("pretrain", "posttrain")}
    if flow not in flows:
        errors.print(f"[red]error:[/red] --flow {flow!r}: one of {sorted(flows)}")
        raise typer.Exit(2)
    known = {"pretrain": PRETRAIN_RECIPES, "posttrain": POSTTRAIN_RECIPES}
    for name in flows[flow]:
        if recipe not in known[name]:
            errors.print(
                f"[red]error:[/red] --recipe {recipe!r}: no such {name} recipe; {name}: {sorted(known[name])}"
            )
            raise typer.Exit(2)
    try:
        cluster = Cluster(nodes, gpus_per_node, gpu_memory_gib)
    except ValueError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    # The policy post-training trains has the widths of the same-named pre-training recipe's model.
    model = pretrain_recipe(recipe if recipe in PRETRAIN_RECIPES else "tiny").model_config()
    plans = plan_pretrain(pretrain_recipe(recipe), cluster) if "pretrain" in flows[flow] else []
    if "posttrain" in flows[flow]:
        plans += plan_posttrain(posttrain_recipe(recipe), model, cluster, rl_prompt_tokens=rl_prompt_tokens)
    if as_json:
        print(json.dumps([p.to_dict() for p in plans], indent=1))
    else:
        table = Table(
            title=f"{recipe}: {nodes} × {gpus_per_node} GPUs of {gpu_memory_gib:g} GiB, GiB per GPU"
        )
        groups = list(plans[0].grouped()) if plans else []
        for column in ("stage", "layout", "tokens/GPU", *groups, "total", "fits"):
            table.add_column(
                column, justify="left" if column in ("stage", "layout") else "right", no_wrap=True
            )
        for p in plans:
            cells = [f"{v / GIB:.1f}" for v in p.grouped().values()]
            fits = "[green]yes[/green]" if p.fits else "[red]no[/red]"
            table.add_row(p.stage, p.layout, f"{p.tokens_per_gpu:,}", *cells, f"{p.total / GIB:.1f}", fits)
        console.print(table)
        console.print(
            "model state = weights + gradients + optimizer; activations = LLM layers + logit chunks; other = "
            "ZeRO/FSDP buffers, rollout KV cache, reserve (--json: every component)",
            soft_wrap=True,
        )
        for note in sorted({n for p in plans for n in p.notes}):
            console.print(f"note: {note}", soft_wrap=True)
    if compare and "pretrain" in flows[flow]:
        _print_layouts(pretrain_recipe(recipe).annealing, model, cluster, as_json)
    bad = [p for p in plans if not p.fits]
    for p in bad:
        errors.print(f"[red]{p.stage} does not fit:[/red] {'; '.join(p.problems)}")
    if bad:
        raise typer.Exit(1)
    (errors if as_json else console).print(
        f"every stage of {recipe} fits", soft_wrap=True
    )  # stdout: JSON only


def _print_layouts(stage, model, cluster, as_json: bool) -> None:
    from keyeflow.training.memory_plan import Interconnect, compare_layouts

    costs = compare_layouts(stage, model, cluster)
    if as_json:
        print(json.dumps([c.to_dict() for c in costs], indent=1))
        return
    link = Interconnect()
    table = Table(
        title=f"{stage.name}: layouts on this cluster, one micro-batch of {stage.max_length:,} tokens"
    )
    for column in (
        "layout",
        "GiB/GPU",
        "fits",
        "compute s",
        "NVLink GB",
        "NIC GB",
        "comm s",
        "bubble",
        "tokens/s",
    ):
        table.add_column(column, justify="left" if column == "layout" else "right", no_wrap=True)
    for c in costs:
        d = c.to_dict()
        table.add_row(
            d["layout"], f"{d['total_gib']:.1f}", "yes" if d["fits"] else "no", f"{d['compute_s']:.2f}",
            f"{d['intra_node_gb']:.1f}", f"{d['inter_node_gb']:.1f}", f"{d['comm_s']:.2f}",
            f"{d['bubble']:.1%}", f"{d['tokens_per_s']:,}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"assumed: NVLink {link.intra_node_gbps:g} GB/s, NIC {link.inter_node_gbps:g} GB/s per GPU, "
        f"{link.peak_tflops:g} TFLOP/s at {link.mfu:.0%} MFU, no overlap of communication with compute; "
        "pipeline and tensor parallelism are compared only (not built)",
        soft_wrap=True,
    )


@app.command()
def sql(
    query: str,
    fmt: str = typer.Option("table", "--format", help="table, json or csv"),
):
    """Query the curated tables with DuckDB; every Lance table is a view."""
    from keyeflow.datasets import sql as sqlmod

    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter(f"--format must be table, json or csv, got {fmt!r}")
    try:
        df = sqlmod.query(query)
    except ValueError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    for col in df.columns:  # bytes (pixel patches) are not for a terminal
        if df[col].map(lambda v: isinstance(v, (bytes, bytearray))).any():
            df[col] = df[col].map(lambda v: f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else v)
    if fmt == "json":
        print(df.to_json(orient="records", date_format="iso"))
    elif fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    else:
        table = Table(show_lines=False)
        for col in df.columns:
            table.add_column(str(col))
        for row in df.itertuples(index=False):
            table.add_row(*[str(v) for v in row])
        console.print(table)


@app.command("tables")
def list_tables():
    """List the tables with their current version and row count."""
    console.print(_tables_overview())


@app.command()
def samples(dest: Path, bad: bool = typer.Option(False, help="also write the bad-input set under DEST/bad")):
    """Write the generated sample videos (and optionally the bad inputs) to DEST."""
    from keyeflow.synthetic.videos import generate_bad_videos, generate_videos

    for path in generate_videos(dest):
        console.print(str(path))
    if bad:
        for name, path in generate_bad_videos(dest / "bad").items():
            console.print(f"{name}: {path}")


if __name__ == "__main__":
    app()
