"""Quality gates: Great Expectations suites over pinned tables, returning pass or the reasons.

A gate computes the columns its checks need (in DuckDB, over the Lance tables at the versions the
upstream step produced, with every value passed as a query parameter), runs one GX expectation per check,
and reports every failed check by its plain name, the GX expectation, how many rows failed and which ones.

Each check is one of two kinds, stated where it is declared:

- **row-level**: a property of one row (an odd but valid input can break it). Failing rows are quarantined
  (``quarantine`` table, stage ``gate:<gate>``, reason = gate + check + expectation + the failing value) and
  the batch goes on without them, unless the share of rows failing any row-level check passes the gate's
  ``max_failing_share`` (default 1%): that many bad rows means the producer, not the data, is wrong.
- **table-level**: an invariant of the whole table (unique keys, shares, a permutation, a version pin);
  one failure stops the flow.

:meth:`GateResult.raise_if_failed` is what stops the next stage. Quarantine rows are written only when the
gate passes: a stopped batch leaves nothing behind that a fixed rerun would inherit.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import duckdb
import pandas as pd

from keyeflow.datasets import sql, tables
from keyeflow.datasets.images import MAX_ASPECT_RATIO
from keyeflow.datasets.slowfast import smart_resize

_MAX_EXAMPLES = 10
DEFAULT_MAX_FAILING_SHARE = 0.01
ROW: Literal["row"] = "row"
TABLE: Literal["table"] = "table"
# Columns a gate frame may carry to say where a row came from; they become the quarantine row's columns.
_IDENTITY = ("uri", "content_hash", "config_hash")


@dataclass(frozen=True)
class Check:
    """One expectation with the sentence a person reads when it fails, and whether a failure is one row's
    (quarantine it) or the table's (stop)."""

    name: str
    expectation: str  # a GX expectation class name, e.g. "ExpectColumnValuesToBeInSet"
    kwargs: dict[str, Any]
    level: Literal["row", "table"]

    def __post_init__(self) -> None:
        if self.level not in (ROW, TABLE):
            raise ValueError(f"Check.level must be 'row' or 'table', got {self.level!r}")
        if self.level == ROW and "column" not in self.kwargs:
            raise ValueError(f"row-level check {self.name!r} must name a column")


def gate_stage(gate: str) -> str:
    """The ``stage`` of the quarantine rows a gate writes."""
    return f"{tables.GATE_STAGE_PREFIX}{gate}"


@dataclass
class GateResult:
    gate: str
    passed: bool
    num_rows: int
    failures: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    max_failing_share: float = DEFAULT_MAX_FAILING_SHARE
    num_failing_rows: int = 0  # rows failing at least one row-level check
    # One entry per failing row: id, uri, content_hash, config_hash, reason. Quarantined only if passed.
    quarantined: list[dict] = field(default_factory=list)

    @property
    def failing_share(self) -> float:
        return self.num_failing_rows / self.num_rows if self.num_rows else 0.0

    @property
    def over_threshold(self) -> bool:
        return self.failing_share > self.max_failing_share

    def to_dict(self) -> dict:
        return {
            "gate": self.gate,
            "passed": self.passed,
            "num_rows": self.num_rows,
            "max_failing_share": self.max_failing_share,
            "num_failing_rows": self.num_failing_rows,
            "failing_share": self.failing_share,
            "failures": self.failures,
            "checks": self.checks,
            "quarantined": [{"id": q["id"], "reason": q["reason"]} for q in self.quarantined],
        }

    def markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"## Gate `{self.gate}`: {verdict} ({self.num_rows} rows)",
            "",
            f"Rows failing row-level checks: {self.num_failing_rows} ({self.failing_share:.2%}); "
            f"the gate stops the flow above {self.max_failing_share:.2%}. "
            + (
                f"{len(self.quarantined)} quarantined (stage `{gate_stage(self.gate)}`)."
                if self.passed and self.quarantined
                else ""
            ),
            "",
            "| check | level | expectation | result | failing rows | examples |",
            "|---|---|---|---|---|---|",
        ]
        for c in self.checks:
            examples = ", ".join(str(e) for e in c.get("examples", [])[:3])
            lines.append(
                f"| {c['check']} | {c.get('level', TABLE)} | `{c['expectation']}` | "
                f"{'ok' if c['success'] else 'FAIL'} | {c.get('unexpected_count', 0)} | {examples} |"
            )
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GateFailed(self)


class GateFailed(RuntimeError):
    def __init__(self, result: GateResult):
        self.result = result

        def describe(f: dict) -> str:
            return (
                f"'{f['check']}' ({f['expectation']} on {f['column']}: {f['unexpected_count']} of "
                f"{result.num_rows} rows, e.g. {f['examples'][:3]})"
            )

        table = [describe(f) for f in result.failures if f.get("level", TABLE) == TABLE]
        parts = [f"table-level: {'; '.join(table)}"] if table else []
        if result.over_threshold:
            rows = [describe(f) for f in result.failures if f.get("level") == ROW]
            parts.append(
                f"{result.num_failing_rows} of {result.num_rows} rows ({result.failing_share:.1%}) fail "
                f"row-level checks, over the gate's max_failing_share {result.max_failing_share:.1%}: "
                + "; ".join(rows)
            )
        super().__init__(f"gate {result.gate!r} failed: " + " | ".join(parts))


def _value(value: Any) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def run_gate(
    gate: str,
    frame: pd.DataFrame,
    checks: list[Check],
    id_column: str,
    max_failing_share: float = DEFAULT_MAX_FAILING_SHARE,
) -> GateResult:
    """Validate ``frame`` against ``checks`` with an ephemeral GX context.

    Rows failing row-level checks are listed for quarantine (with the frame's ``uri``, ``content_hash`` and
    ``config_hash`` columns where it has them); the gate fails on any table-level failure or when the share
    of such rows is over ``max_failing_share``."""
    if not 0.0 <= max_failing_share <= 1.0:
        raise ValueError(f"max_failing_share of gate {gate!r} must be in [0, 1], got {max_failing_share}")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    levels = {c.name: c.level for c in checks}
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        batch = (
            context.data_sources.add_pandas(gate)
            .add_dataframe_asset(gate)
            .add_batch_definition_whole_dataframe(gate)
        )
        suite = context.suites.add(gx.ExpectationSuite(name=gate))
        for check in checks:
            cls = getattr(gx.expectations, check.expectation)
            suite.add_expectation(cls(**check.kwargs, meta={"check": check.name}))
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=gate, data=batch, suite=suite)
        )
        if frame.empty:
            # GX passes vacuous checks on no rows; an empty table feeding training is itself a failure.
            return GateResult(
                gate,
                False,
                0,
                [
                    {
                        "check": "table has rows",
                        "expectation": "non-empty",
                        "column": "*",
                        "level": TABLE,
                        "unexpected_count": 0,
                        "examples": [],
                    }
                ],
                max_failing_share=max_failing_share,
            )
        outcome = validation.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [id_column]},
        )
    checks_out, failures = [], []
    reasons: dict[Any, list[str]] = {}  # failing row id -> why, in check order
    by_id = frame.drop_duplicates(id_column).set_index(id_column, drop=False)
    for res in outcome.results:
        cfg = res.expectation_config
        result = res.result or {}
        name = cfg.meta.get("check", cfg.type)
        failing_ids = [row.get(id_column) for row in (result.get("unexpected_index_list") or [])]
        entry = {
            "check": name,
            "expectation": cfg.type,
            "column": cfg.kwargs.get("column", "*"),
            "level": levels.get(name, TABLE),
            "success": bool(res.success),
            "unexpected_count": int(result.get("unexpected_count") or 0),
            "examples": [str(e) for e in failing_ids[:_MAX_EXAMPLES]],
        }
        if res.exception_info and res.exception_info.get("raised_exception"):
            # A check that could not run says nothing about any one row: it stops the flow.
            entry["success"] = False
            entry["level"] = TABLE
            entry["error"] = res.exception_info.get("exception_message")
        checks_out.append(entry)
        if entry["success"]:
            continue
        failures.append(entry)
        if entry["level"] == ROW:
            column = entry["column"]
            for row_id in failing_ids:
                value = _value(by_id.at[row_id, column]) if row_id in by_id.index else "?"
                reasons.setdefault(row_id, []).append(f"{name} [{cfg.type}] {column}={value}")
    num_failing = len(reasons)
    share = num_failing / len(frame)
    stopped = any(f["level"] == TABLE for f in failures) or share > max_failing_share
    for f in failures:
        f["action"] = "stopped" if f["level"] == TABLE or share > max_failing_share else "quarantined"
    quarantined = []
    for row_id, why in reasons.items():
        row = by_id.loc[row_id] if row_id in by_id.index else {}
        identity = {
            k: ("" if pd.isna(row.get(k)) else str(row.get(k))) if k in row else "" for k in _IDENTITY
        }
        quarantined.append({"id": str(row_id), **identity, "reason": f"gate {gate}: " + "; ".join(why)})
    return GateResult(
        gate,
        not stopped,
        len(frame),
        failures,
        checks_out,
        max_failing_share=max_failing_share,
        num_failing_rows=num_failing,
        quarantined=quarantined,
    )


def quarantine_rows(result: GateResult) -> list[dict]:
    """The ``quarantine`` rows for a gate's failing rows; none when the gate stopped the flow."""
    if not result.passed:
        return []
    return [
        tables.quarantine_row(
            q["uri"] or q["id"], q["reason"], gate_stage(result.gate), q["content_hash"], q["config_hash"]
        )
        for q in result.quarantined
    ]


def _query(query: str, params: dict, versions: dict[str, int], root: str | None = None) -> pd.DataFrame:
    """A parameterised query over the tables (pinned at ``versions``); values never enter the SQL text."""
    con = sql.connect(root, versions)
    try:
        return con.execute(query, params).df()
    except duckdb.Error as exc:
        raise ValueError(f"gate query failed: {exc}\n  query: {query}\n  parameters: {params}") from exc
    finally:
        con.close()


def _in_set(name: str, column: str, values: list, level: Literal["row", "table"]) -> Check:
    return Check(name, "ExpectColumnValuesToBeInSet", {"column": column, "value_set": values}, level)


def _at_most(name: str, column: str, value: float, level: Literal["row", "table"]) -> Check:
    return Check(name, "ExpectColumnValuesToBeBetween", {"column": column, "max_value": value}, level)


def _unique(name: str, column: str) -> Check:
    # Two rows with one key: the writer broke the table's contract; no one row is the odd one.
    return Check(name, "ExpectColumnValuesToBeUnique", {"column": column}, TABLE)


# Video samples (keyeflow/datasets/pretokenize.py, sizes from slowfast.allocate_tokens). Every check but the
# key's is a property of one clip: a clip that breaks it is quarantined and the others go on.
VIDEO_SAMPLE_CHECKS = [
    _unique("one sample per video and config", "sample_id"),
    _in_set("first frame is slow", "first_frame_type", [0], ROW),
    _at_most(
        "fast frames get at most max(int(fast_ratio * slow tokens), min tokens per frame), or the size "
        "smart_resize must give a tiny or thin frame",
        "fast_token_excess",
        0,
        ROW,
    ),
    _at_most(
        "total tokens within the budget (one token a frame over it with the reference search), unless "
        "the frames cannot be made as small as the per-frame floor",
        "budget_excess",
        0,
        ROW,
    ),
    _in_set("timestamps strictly increase", "timestamps_increasing", [True], ROW),
    _in_set("frame sizes are multiples of 28", "size_remainder", [0], ROW),
    _in_set("frame types and timestamps cover every frame", "lengths_agree", [True], ROW),
    _in_set("stored frames match the sample (count and tokens)", "frames_agree", [True], ROW),
    Check(
        "at least one frame", "ExpectColumnValuesToBeBetween", {"column": "num_frames", "min_value": 1}, ROW
    ),
]

# Videos (keyeflow/datasets/ingest.py): the content key is the table's; uri and size are one video's.
VIDEO_CHECKS = [
    _unique("no duplicate content", "video_id"),
    Check("every video has a source uri", "ExpectColumnValuesToNotBeNull", {"column": "uri"}, ROW),
    Check(
        "positive frame size", "ExpectColumnValuesToBeBetween", {"column": "min_side", "min_value": 1}, ROW
    ),
]


def _tokens(size: tuple[int, int], factor: int) -> int:
    return size[0] * size[1] // (factor * factor)


def _video_allowances(row, fast_ratio: float, min_tokens: int, factor: int) -> tuple[int, bool]:
    """(the most tokens a Fast frame of this clip may get, whether its frames cannot reach the floor).

    ``allocate_tokens`` sizes a Fast frame with smart_resize to at most max(int(slow * fast_ratio), floor)
    tokens; smart_resize goes over that only where it must: a frame under the floor area is enlarged to
    it (rounded up to 28-px sides), and a very thin frame keeps a 28-px short side. The same two cases
    are the only ones where a frame costs more than the budget search priced it at, and both already
    happen at the floor, so a clip whose floor-size frame costs more than the floor is exempt from the
    budget bound.
    """
    bound = max(int(row.slow_tokens * fast_ratio), min_tokens)
    if pd.isna(row.source_height) or pd.isna(row.source_width):
        return bound, False  # no source size to recompute from: hold it to the plain bound
    area = factor * factor
    h, w = int(row.source_height), int(row.source_width)
    try:
        fast = _tokens(
            smart_resize(h, w, factor=factor, min_pixels=min_tokens * area, max_pixels=bound * area), factor
        )
        floor = _tokens(
            smart_resize(h, w, factor=factor, min_pixels=min_tokens * area, max_pixels=min_tokens * area),
            factor,
        )
    except ValueError:  # a size the producer would have refused; the plain bound applies
        return bound, False
    return max(bound, fast), floor > min_tokens


def video_samples_frame(
    samples: tables.TableRef,
    frames: tables.TableRef,
    config_hash: str | None,
    fast_ratio: float,
    min_tokens: int,
    strict_budget: bool,
    root: str | None = None,
    factor: int = 28,
) -> pd.DataFrame:
    """One row per sample with the derived columns the video checks read (computed in DuckDB, and the
    smart_resize allowances in Python with the producer's own function)."""
    query = """
        with f as (
            select sample_id, count(*) as n, sum(num_tokens) as tokens
            from video_frames group by sample_id
        ),
        v as (select video_id, any_value(height) as height, any_value(width) as width from videos group by 1)
        select
            s.sample_id, s.uri, s.video_id as content_hash, s.config_hash, s.num_frames,
            s.slow_tokens, s.fast_tokens, s.num_fast, s.total_tokens, s.token_budget,
            v.height as source_height, v.width as source_width,
            s.frame_types[1] as first_frame_type,
            coalesce(list_sort(s.timestamps) = s.timestamps
                     and len(list_distinct(s.timestamps)) = len(s.timestamps), false)
                as timestamps_increasing,
            (s.slow_height % 28) + (s.slow_width % 28) + (s.fast_height % 28) + (s.fast_width % 28)
                as size_remainder,
            len(s.frame_types) = s.num_frames and len(s.timestamps) = s.num_frames as lengths_agree,
            coalesce(f.n = s.num_frames and f.tokens = s.total_tokens, false) as frames_agree
        from video_samples s left join f using (sample_id) left join v using (video_id)
        where $config_hash is null or s.config_hash = $config_hash
        order by s.sample_id
    """
    versions = {"video_samples": samples.version, "video_frames": frames.version}
    frame = _query(query, {"config_hash": config_hash}, versions, root)
    allowances = [_video_allowances(r, fast_ratio, min_tokens, factor) for r in frame.itertuples()]
    fast_allowed = pd.Series([a[0] for a in allowances], index=frame.index, dtype="int64")
    floor_bound = pd.Series([a[1] for a in allowances], index=frame.index, dtype="bool")
    frame["fast_token_excess"] = (frame.fast_tokens - fast_allowed).where(frame.num_fast > 0, 0)
    # The search prices frames so the clip fits the budget; the reference's (non-strict) search stops one
    # step past the fitting count, at most one token a frame over. At the floor the clip costs
    # num_frames × floor, which pre-tokenisation's frame cap keeps within the budget unless the budget is
    # under one floor-size frame.
    slack = 0 if strict_budget else frame.num_frames
    allowed = pd.concat([frame.token_budget + slack, frame.num_frames * min_tokens], axis=1).max(axis=1)
    frame["budget_excess"] = (frame.total_tokens - allowed).where(~floor_bound, 0)
    return frame


def check_video_samples(
    samples: tables.TableRef,
    frames: tables.TableRef,
    config,
    root: str | None = None,
    max_failing_share: float = DEFAULT_MAX_FAILING_SHARE,
) -> GateResult:
    frame = video_samples_frame(
        samples,
        frames,
        config.config_hash(),
        config.fast_ratio,
        config.min_tokens_per_frame,
        config.strict_budget,
        root,
        config.factor,
    )
    return run_gate("video_samples", frame, VIDEO_SAMPLE_CHECKS, "sample_id", max_failing_share)


def check_videos(
    videos: tables.TableRef, root: str | None = None, max_failing_share: float = DEFAULT_MAX_FAILING_SHARE
) -> GateResult:
    frame = _query(
        "select video_id, uri, video_id as content_hash, least(width, height) as min_side from videos",
        {},
        {"videos": videos.version},
        root,
    )
    return run_gate("videos", frame, VIDEO_CHECKS, "video_id", max_failing_share)


# A mixture (keyeflow/datasets/mixture.py) is our own product of already-gated rows: the builder excludes
# quarantined, over-long and off-stage samples itself, and its shares and order are properties of all rows
# together. Any failing row means the builder broke its contract, and dropping that row would change the
# shares checked here, so every mixture check is table-level.
MIXTURE_CHECKS = [
    _unique("one row per sample (repeats count the uses)", "sample_id"),
    _in_set("only modalities with a target share", "modality_targeted", [True], TABLE),
    _at_most("modality shares within tolerance", "share_excess_pp", 0, TABLE),
    _at_most("every targeted modality present", "missing_modalities", 0, TABLE),
    _in_set("no quarantined sample used", "quarantined", [False], TABLE),
    Check(
        "every sample used at least once",
        "ExpectColumnValuesToBeBetween",
        {"column": "repeats", "min_value": 1},
        TABLE,
    ),
    _at_most("repeats within the cap", "repeat_excess", 0, TABLE),
    _at_most("no source used past the repeat cap", "source_excess_tokens", 0, TABLE),
    _at_most("every sample fits the stage's context", "length_excess", 0, TABLE),
    _in_set("only the stage's tasks", "task_allowed", [True], TABLE),
    _in_set("samples match the pinned input (id, modality, source, tokens)", "matches_input", [True], TABLE),
    # A mixture's id is its eligible rows' content, so a rebuild from a later train_samples version with the
    # same rows reuses the rows written earlier: they pin a version no later than the input, and every row
    # must still match the input (the check above).
    _in_set("built from the input version or an earlier one", "pinned_version", [True], TABLE),
    _in_set("order is a permutation of the rows", "order_ok", [True], TABLE),
]


def mixture_frame(
    mixture: tables.TableRef,
    mixture_id: str,
    config,
    quarantine: tables.TableRef | None,
    samples: tables.TableRef,
    root: str | None = None,
) -> pd.DataFrame:
    """One row per mixture row with the derived columns the mixture checks read (computed in DuckDB)."""
    targets = list(config.target_shares.items())
    # `values` needs at least one row; a mixture config always names a target (MixtureConfig checks it).
    target_rows = ", ".join(f"($target_modality_{i}, $target_share_{i})" for i in range(len(targets)))
    params: dict[str, Any] = {
        "mixture_id": mixture_id,
        "tasks": None if config.tasks is None else [str(t) for t in config.tasks],
        "tolerance_pp": float(config.tolerance_pp),
        "sample_repeat_cap": int(config.sample_repeat_cap),
        "repeat_cap": float(config.repeat_cap),
        "max_sample_tokens": int(config.max_sample_tokens),
        "samples_version": int(samples.version),
    }
    for i, (modality, share) in enumerate(targets):
        params[f"target_modality_{i}"] = str(modality)
        params[f"target_share_{i}"] = float(share)
    if quarantine is not None:
        quarantined = "q.uri is not null"
        join = (
            "left join (select distinct uri from quarantine where uri is not null) q on s.source_uri = q.uri"
        )
    else:
        quarantined, join = "false", ""
    # A source may be used up to cap × the tokens it could give this stage (not quarantined, within the
    # context, an allowed task); the 1e-6 absorbs float rounding of fractional caps.
    query = f"""
        with m as (select * from mixtures where mixture_id = $mixture_id),
        t(modality, target) as (values {target_rows}),
        reached as (
            select modality,
                   sum(num_tokens * repeats)::double / sum(sum(num_tokens * repeats)) over () as share
            from m group by modality
        ),
        e as (
            select s.sample_id, s.modality, s.source, s.task, s.num_tokens, {quarantined} as quarantined,
                   $tasks is null or coalesce(list_contains($tasks, s.task), false) as task_allowed
            from train_samples s {join}
        ),
        available as (
            select modality, source, sum(num_tokens) as tokens from e
            where not quarantined and num_tokens between 1 and $max_sample_tokens and task_allowed
            group by all
        ),
        used as (select modality, source, sum(num_tokens * repeats) as tokens from m group by all)
        select
            m.mixture_row_id, m.sample_id, m.modality, m.repeats,
            coalesce(t.target > 0, false) as modality_targeted,
            abs(coalesce(r.share, 0) - coalesce(t.target, 0)) * 100 - $tolerance_pp as share_excess_pp,
            (select count(*) from t where t.target > 0 and t.modality not in (select modality from m))
                as missing_modalities,
            coalesce(e.quarantined, false) as quarantined,
            m.repeats - $sample_repeat_cap as repeat_excess,
            u.tokens - $repeat_cap * coalesce(a.tokens, 0) - 1e-6 * u.tokens as source_excess_tokens,
            m.num_tokens - $max_sample_tokens as length_excess,
            coalesce(e.task_allowed, $tasks is null) as task_allowed,
            coalesce(e.sample_id is not null and e.num_tokens = m.num_tokens and e.modality = m.modality
                     and e.source = m.source, false) as matches_input,
            coalesce(m.train_samples_version <= $samples_version, false) as pinned_version,
            row_number() over (order by m."order", m.sample_id) - 1 = m."order" as order_ok
        from m
        left join t on m.modality = t.modality
        left join reached r on m.modality = r.modality
        left join e on m.sample_id = e.sample_id
        left join used u on m.modality = u.modality and m.source = u.source
        left join available a on m.modality = a.modality and m.source = a.source
        order by m."order"
    """
    versions = {mixture.name: mixture.version, samples.name: samples.version}
    if quarantine is not None:
        versions[quarantine.name] = quarantine.version
    con = sql.connect(root, versions)
    try:
        # Bind the views to exactly the pinned refs (a ref may live outside the root).
        con.register("mixtures", tables.dataset(mixture.uri, version=mixture.version))
        con.register("train_samples", tables.dataset(samples.uri, version=samples.version))
        if quarantine is not None:
            con.register("quarantine", tables.dataset(quarantine.uri, version=quarantine.version))
        return con.execute(query, params).df()
    finally:
        con.close()


def check_mixture(
    mixture: tables.TableRef,
    mixture_id: str,
    config,
    quarantine: tables.TableRef | None,
    samples: tables.TableRef,
    root: str | None = None,
) -> GateResult:
    """The stage's mixture reaches its token shares and uses only data it may use, within the cap."""
    frame = mixture_frame(mixture, mixture_id, config, quarantine, samples, root)
    return run_gate("mixture", frame, MIXTURE_CHECKS, "mixture_row_id")


def report_json(result: GateResult) -> str:
    return json.dumps(result.to_dict(), indent=2)


def record(result: GateResult, table: tables.TableRef, run_id: str, root: str | None = None) -> int:
    """Keep the verdict in ``gate_results`` so `keyeflow sql` and lineage can answer what passed.

    ``failures`` holds a JSON object: the gate's ``max_failing_share``, how many rows failed row-level
    checks (``num_failing_rows``) and were quarantined (``num_quarantined``), and the failed checks
    (``failures``: check, expectation, column, level, action, unexpected_count, examples)."""
    summary = {
        "max_failing_share": result.max_failing_share,
        "num_failing_rows": result.num_failing_rows,
        "num_quarantined": len(quarantine_rows(result)),
        "failures": result.failures,
    }
    row = {
        "gate_result_id": f"{result.gate}/{table.version}/{run_id}",
        "gate": result.gate,
        "table_uri": table.uri,
        "table_version": table.version,
        "passed": result.passed,
        "num_rows": result.num_rows,
        "failures": json.dumps(summary),
        "run_id": run_id,
        "checked_at": tables.now(),
    }
    return tables.upsert("gate_results", [row], root)


# Image samples (keyeflow/datasets/images.py): all but the key are one image's.
IMAGE_SAMPLE_CHECKS = [
    _unique("one sample per image and config", "sample_id"),
    _in_set(
        "tokens within the image limits, or the size smart_resize must give (a thin image keeps a 28-px "
        "side; shrinking to the limit rounds down)",
        "tokens_in_range",
        [True],
        ROW,
    ),
    _in_set("image sizes are multiples of 28", "size_remainder", [0], ROW),
    _in_set("stored patches match the grid", "patches_agree", [True], ROW),
]

# Training samples (keyeflow/datasets/conversations.py): all but the key are one sample's. A sample that
# uses a media sample some gate quarantined is quarantined itself: the mixture builder and the held-out
# set leave out every train_samples row whose source_uri is in `quarantine`.
TRAIN_SAMPLE_CHECKS = [
    _unique("one row per sample", "sample_id"),
    _in_set("modality is video, image or text", "modality", ["video", "image", "text"], ROW),
    _in_set("text and vision tokens add up to the total", "tokens_add_up", [True], ROW),
    Check(
        "every sample has tokens",
        "ExpectColumnValuesToBeBetween",
        {"column": "num_tokens", "min_value": 1},
        ROW,
    ),
    _in_set("modality agrees with the media referenced", "modality_agrees", [True], ROW),
    _in_set("no media sample a gate quarantined", "uses_quarantined_media", [False], ROW),
]


def check_image_samples(
    samples: tables.TableRef,
    config,
    root: str | None = None,
    max_failing_share: float = DEFAULT_MAX_FAILING_SHARE,
) -> GateResult:
    frame = _query(
        """with i as (select image_id, any_value(height) as h, any_value(width) as w from images group by 1)
            select s.sample_id, s.uri, s.image_id as content_hash, s.config_hash, s.height, s.width,
               i.h as source_height, i.w as source_width,
               s.num_tokens between $min_tokens and $max_tokens as in_limits,
               (s.height % 28) + (s.width % 28) as size_remainder,
               octet_length(s.patches) = s.grid_h * s.grid_w * 588 and s.num_tokens * 4 = s.grid_h * s.grid_w
                   as patches_agree
            from image_samples s left join i using (image_id)
            where s.config_hash = $config_hash
            order by s.sample_id""",
        {
            "min_tokens": config.min_tokens,
            "max_tokens": config.max_tokens,
            "config_hash": config.config_hash(),
        },
        {"image_samples": samples.version},
        root,
    )
    f = config.factor

    def resized(row) -> bool:
        if pd.isna(row.source_height) or pd.isna(row.source_width):
            return False
        try:
            expected = smart_resize(
                int(row.source_height),
                int(row.source_width),
                factor=f,
                min_pixels=config.min_tokens * f * f,
                max_pixels=config.max_tokens * f * f,
                max_ratio=MAX_ASPECT_RATIO,
            )
        except ValueError:
            return False
        return expected == (row.height, row.width)

    frame["tokens_in_range"] = [bool(r.in_limits) or resized(r) for r in frame.itertuples()]
    return run_gate("image_samples", frame, IMAGE_SAMPLE_CHECKS, "sample_id", max_failing_share)


# The media gates whose quarantined rows make the train samples using them unusable, and how a media id
# (`<content hash[:16]>-<config hash>`, see pretokenize.sample_id and images.sample_id) names their rows.
_MEDIA_GATES = ("video_samples", "image_samples")


def check_train_samples(
    samples: tables.TableRef, root: str | None = None, max_failing_share: float = DEFAULT_MAX_FAILING_SHARE
) -> GateResult:
    params: dict[str, Any] = {}
    if "quarantine" in tables.list_tables(root):
        gated = """
            select distinct s.sample_id
            from (select sample_id, unnest(media_ids) as media_id from train_samples) s
            join quarantine q
              on list_contains($media_stages, q.stage)
             and left(q.content_hash, 16) || '-' || q.config_hash = s.media_id"""
        params["media_stages"] = [gate_stage(g) for g in _MEDIA_GATES]
    else:
        gated = "select null::varchar as sample_id where false"
    frame = _query(
        f"""with gated as ({gated})
            select s.sample_id, s.source_uri as uri, s.content_hash, s.config_hash, s.modality, s.num_tokens,
               s.num_text_tokens + s.num_vision_tokens = s.num_tokens as tokens_add_up,
               case s.modality when 'text' then len(s.media_ids) = 0 and s.num_vision_tokens = 0
                               else len(s.media_ids) > 0 and s.num_vision_tokens > 0 end as modality_agrees,
               s.sample_id in (select sample_id from gated) as uses_quarantined_media
            from train_samples s
            order by s.sample_id""",
        params,
        {"train_samples": samples.version},
        root,
    )
    return run_gate("train_samples", frame, TRAIN_SAMPLE_CHECKS, "sample_id", max_failing_share)


# LongCoT (SPEC §4.3.1): every generated path of a batch, then the samples kept for the cold-start set.
# keyeflow/longcot/gates.py computes the columns these read and runs them (LongCoT is a layer above quality).
#
# Every LongCoT check is table-level: the rows are the output of our own generate → assess → review → score
# steps, each of which already drops a bad path with its stage and reason in ``longcot_paths`` (LongCoT's
# own quarantine, what `publish_longcot` reads), so a row failing here means a step broke its contract.
# Quarantining it would not keep it out of training either: publishing reads the kept paths, not
# `quarantine`.
LONGCOT_PATH_CHECKS = [
    _unique("one row per path", "path_id"),
    _in_set("confidences in [0, 1]", "confidence_in_range", [True], TABLE),
    _in_set("every path kept or dropped after review", "status", ["kept", "dropped"], TABLE),
    _in_set("grade is A, B or C once assessed", "grade_known", [True], TABLE),
    _in_set("every drop has a reason", "drop_has_reason", [True], TABLE),
    _in_set("every C is dropped", "c_dropped", [True], TABLE),
]


def longcot_sample_checks(min_samples: int) -> list[Check]:
    return [
        _unique("one row per sample", "sample_id"),
        Check(
            f"at least {min_samples} kept samples",
            "ExpectTableRowCountToBeBetween",
            {"min_value": min_samples},
            TABLE,
        ),
        _in_set("no C in the output", "grade", ["A", "B"], TABLE),
        _in_set("every kept answer equals the reference", "answer_matches", [True], TABLE),
        _in_set("response in <think>…</think><answer>…</answer> form", "format_ok", [True], TABLE),
        Check(
            "quality score 1-5",
            "ExpectColumnValuesToBeBetween",
            {"column": "score", "min_value": 1, "max_value": 5},
            TABLE,
        ),
        Check("repeats >= 0", "ExpectColumnValuesToBeBetween", {"column": "repeats", "min_value": 0}, TABLE),
        Check(
            "confidences in [0, 1]",
            "ExpectColumnValuesToBeBetween",
            {"column": "confidence", "min_value": 0, "max_value": 1},
            TABLE,
        ),
        _in_set("grade shares within bounds", "grade_share_ok", [True], TABLE),
        _in_set("every B and borderline A approved or edited by review", "reviewed", [True], TABLE),
    ]
