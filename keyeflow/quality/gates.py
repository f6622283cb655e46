"""Quality gates: Great Expectations suites over pinned tables, returning pass or the reasons.

A gate computes the columns its checks need (in DuckDB, over the Lance tables at the versions the
upstream step produced), runs one GX expectation per check, and reports every failed check by its plain
name, the GX expectation, how many rows failed and which ones. :meth:`GateResult.raise_if_failed` is
what stops the next stage.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from keyeflow.datasets import sql, tables

_MAX_EXAMPLES = 10


@dataclass(frozen=True)
class Check:
    """One expectation with the sentence a person reads when it fails."""

    name: str
    expectation: str  # a GX expectation class name, e.g. "ExpectColumnValuesToBeInSet"
    kwargs: dict[str, Any]


@dataclass
class GateResult:
    gate: str
    passed: bool
    num_rows: int
    failures: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "gate": self.gate,
            "passed": self.passed,
            "num_rows": self.num_rows,
            "failures": self.failures,
            "checks": self.checks,
        }

    def markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"## Gate `{self.gate}`: {verdict} ({self.num_rows} rows)",
            "",
            "| check | expectation | result | failing rows | examples |",
            "|---|---|---|---|---|",
        ]
        for c in self.checks:
            examples = ", ".join(str(e) for e in c.get("examples", [])[:3])
            lines.append(
                f"| {c['check']} | `{c['expectation']}` | {'ok' if c['success'] else 'FAIL'} | "
                f"{c.get('unexpected_count', 0)} | {examples} |"
            )
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GateFailed(self)


class GateFailed(RuntimeError):
    def __init__(self, result: GateResult):
        self.result = result
        parts = [
            f"'{f['check']}' ({f['expectation']} on {f['column']}: {f['unexpected_count']} of "
            f"{result.num_rows} rows, e.g. {f['examples'][:3]})"
            for f in result.failures
        ]
        super().__init__(f"gate {result.gate!r} failed: " + "; ".join(parts))


def run_gate(gate: str, frame: pd.DataFrame, checks: list[Check], id_column: str) -> GateResult:
    """Validate ``frame`` against ``checks`` with an ephemeral GX context."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

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
                        "unexpected_count": 0,
                        "examples": [],
                    }
                ],
            )
        outcome = validation.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [id_column]},
        )
    checks_out, failures = [], []
    for res in outcome.results:
        cfg = res.expectation_config
        result = res.result or {}
        examples = [row.get(id_column) for row in (result.get("unexpected_index_list") or [])][:_MAX_EXAMPLES]
        entry = {
            "check": cfg.meta.get("check", cfg.type),
            "expectation": cfg.type,
            "column": cfg.kwargs.get("column", "*"),
            "success": bool(res.success),
            "unexpected_count": int(result.get("unexpected_count") or 0),
            "examples": [str(e) for e in examples],
        }
        if res.exception_info and res.exception_info.get("raised_exception"):
            entry["success"] = False
            entry["error"] = res.exception_info.get("exception_message")
        checks_out.append(entry)
        if not entry["success"]:
            failures.append(entry)
    return GateResult(gate, not failures, len(frame), failures, checks_out)


def _in_set(name: str, column: str, values: list) -> Check:
    return Check(name, "ExpectColumnValuesToBeInSet", {"column": column, "value_set": values})


def _at_most(name: str, column: str, value: float) -> Check:
    return Check(name, "ExpectColumnValuesToBeBetween", {"column": column, "max_value": value})


VIDEO_SAMPLE_CHECKS = [
    Check("one sample per video and config", "ExpectColumnValuesToBeUnique", {"column": "sample_id"}),
    _in_set("first frame is slow", "first_frame_type", [0]),
    _at_most("fast frames get at most the fast ratio of slow tokens", "fast_token_excess", 0),
    _at_most("total tokens within the budget", "budget_excess", 0),
    _in_set("timestamps strictly increase", "timestamps_increasing", [True]),
    _in_set("frame sizes are multiples of 28", "size_remainder", [0]),
    _in_set("frame types and timestamps cover every frame", "lengths_agree", [True]),
    _in_set("stored frames match the sample (count and tokens)", "frames_agree", [True]),
    Check("at least one frame", "ExpectColumnValuesToBeBetween", {"column": "num_frames", "min_value": 1}),
]

VIDEO_CHECKS = [
    Check("no duplicate content", "ExpectColumnValuesToBeUnique", {"column": "video_id"}),
    Check("every video has a source uri", "ExpectColumnValuesToNotBeNull", {"column": "uri"}),
    Check("positive frame size", "ExpectColumnValuesToBeBetween", {"column": "min_side", "min_value": 1}),
]


def video_samples_frame(
    samples: tables.TableRef,
    frames: tables.TableRef,
    config_hash: str | None,
    fast_ratio: float,
    min_tokens: int,
    strict_budget: bool,
    root: str | None = None,
) -> pd.DataFrame:
    """One row per sample with the derived columns the video checks read (computed in DuckDB)."""
    # The reference budget search stops one step past the fitting count, which can overshoot the
    # budget by at most one token per frame; strict configs get no slack.
    slack = "0" if strict_budget else "s.num_frames"
    where = f"where s.config_hash = '{config_hash}'" if config_hash else ""
    query = f"""
        with f as (
            select sample_id, count(*) as n, sum(num_tokens) as tokens
            from video_frames group by sample_id
        )
        select
            s.sample_id, s.num_frames,
            s.frame_types[1] as first_frame_type,
            case when s.num_fast = 0 then 0
                 else s.fast_tokens
                      - greatest(cast(floor({fast_ratio} * s.slow_tokens) as bigint), {min_tokens})
            end as fast_token_excess,
            s.total_tokens - s.token_budget - {slack} as budget_excess,
            coalesce(list_sort(s.timestamps) = s.timestamps
                     and len(list_distinct(s.timestamps)) = len(s.timestamps), false)
                as timestamps_increasing,
            (s.slow_height % 28) + (s.slow_width % 28) + (s.fast_height % 28) + (s.fast_width % 28)
                as size_remainder,
            len(s.frame_types) = s.num_frames and len(s.timestamps) = s.num_frames as lengths_agree,
            coalesce(f.n = s.num_frames and f.tokens = s.total_tokens, false) as frames_agree
        from video_samples s left join f using (sample_id)
        {where}
    """
    return sql.query(query, root, {"video_samples": samples.version, "video_frames": frames.version})


def check_video_samples(
    samples: tables.TableRef, frames: tables.TableRef, config, root: str | None = None
) -> GateResult:
    frame = video_samples_frame(
        samples,
        frames,
        config.config_hash(),
        config.fast_ratio,
        config.min_tokens_per_frame,
        config.strict_budget,
        root,
    )
    return run_gate("video_samples", frame, VIDEO_SAMPLE_CHECKS, "sample_id")


def check_videos(videos: tables.TableRef, root: str | None = None) -> GateResult:
    frame = sql.query(
        "select video_id, uri, least(width, height) as min_side from videos", root, {"videos": videos.version}
    )
    return run_gate("videos", frame, VIDEO_CHECKS, "video_id")


MIXTURE_CHECKS = [
    Check(
        "one row per sample (repeats count the uses)", "ExpectColumnValuesToBeUnique", {"column": "sample_id"}
    ),
    _in_set("only modalities with a target share", "modality_targeted", [True]),
    _at_most("modality shares within tolerance", "share_excess_pp", 0),
    _at_most("every targeted modality present", "missing_modalities", 0),
    _in_set("no quarantined sample used", "quarantined", [False]),
    Check(
        "every sample used at least once",
        "ExpectColumnValuesToBeBetween",
        {"column": "repeats", "min_value": 1},
    ),
    _at_most("repeats within the cap", "repeat_excess", 0),
    _at_most("no source used past the repeat cap", "source_excess_tokens", 0),
    _at_most("every sample fits the stage's context", "length_excess", 0),
    _in_set("only the stage's tasks", "task_allowed", [True]),
    _in_set("samples match the pinned input (id, modality, source, tokens)", "matches_input", [True]),
    # A mixture's id is its eligible rows' content, so a rebuild from a later train_samples version with the
    # same rows reuses the rows written earlier: they pin a version no later than the input, and every row
    # must still match the input (the check above).
    _in_set("built from the input version or an earlier one", "pinned_version", [True]),
    _in_set("order is a permutation of the rows", "order_ok", [True]),
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

    def lit(value) -> str:
        return "'" + str(value).replace("'", "''") + "'"

    targets = ", ".join(f"({lit(m)}, {float(s)!r})" for m, s in config.target_shares.items())
    tasks = (
        "true"
        if config.tasks is None
        else f"coalesce(e.task in ({', '.join(lit(t) for t in config.tasks)}), false)"
    )
    if quarantine is not None:
        quarantined = "q.uri is not null"
        join = (
            "left join (select distinct uri from quarantine where uri is not null) q on s.source_uri = q.uri"
        )
    else:
        quarantined, join = "false", ""
    cap = float(config.repeat_cap)
    # A source may be used up to cap × the tokens it could give this stage (not quarantined, within the
    # context, an allowed task); the 1e-6 absorbs float rounding of fractional caps.
    available_filter = f"not quarantined and num_tokens between 1 and {int(config.max_sample_tokens)}"
    if config.tasks is not None:
        available_filter += f" and task in ({', '.join(lit(t) for t in config.tasks)})"
    query = f"""
        with m as (select * from mixtures where mixture_id = {lit(mixture_id)}),
        t(modality, target) as (values {targets}),
        reached as (
            select modality,
                   sum(num_tokens * repeats)::double / sum(sum(num_tokens * repeats)) over () as share
            from m group by modality
        ),
        e as (
            select s.sample_id, s.modality, s.source, s.task, s.num_tokens, {quarantined} as quarantined
            from train_samples s {join}
        ),
        available as (
            select modality, source, sum(num_tokens) as tokens from e where {available_filter} group by all
        ),
        used as (select modality, source, sum(num_tokens * repeats) as tokens from m group by all)
        select
            m.mixture_row_id, m.sample_id, m.modality, m.repeats,
            coalesce(t.target > 0, false) as modality_targeted,
            abs(coalesce(r.share, 0) - coalesce(t.target, 0)) * 100 - {float(config.tolerance_pp)!r}
                as share_excess_pp,
            (select count(*) from t where t.target > 0 and t.modality not in (select modality from m))
                as missing_modalities,
            coalesce(e.quarantined, false) as quarantined,
            m.repeats - {int(config.sample_repeat_cap)} as repeat_excess,
            u.tokens - {cap!r} * coalesce(a.tokens, 0) - 1e-6 * u.tokens as source_excess_tokens,
            m.num_tokens - {int(config.max_sample_tokens)} as length_excess,
            {tasks} as task_allowed,
            coalesce(e.sample_id is not null and e.num_tokens = m.num_tokens and e.modality = m.modality
                     and e.source = m.source, false) as matches_input,
            coalesce(m.train_samples_version <= {int(samples.version)}, false) as pinned_version,
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
        return con.sql(query).df()
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
    """Keep the verdict in ``gate_results`` so `keyeflow sql` and lineage can answer what passed."""
    row = {
        "gate_result_id": f"{result.gate}/{table.version}/{run_id}",
        "gate": result.gate,
        "table_uri": table.uri,
        "table_version": table.version,
        "passed": result.passed,
        "num_rows": result.num_rows,
        "failures": json.dumps(result.failures),
        "run_id": run_id,
        "checked_at": tables.now(),
    }
    return tables.upsert("gate_results", [row], root)


IMAGE_SAMPLE_CHECKS = [
    Check("one sample per image and config", "ExpectColumnValuesToBeUnique", {"column": "sample_id"}),
    _in_set("tokens within the image limits", "tokens_in_range", [True]),
    _in_set("image sizes are multiples of 28", "size_remainder", [0]),
    _in_set("stored patches match the grid", "patches_agree", [True]),
]

TRAIN_SAMPLE_CHECKS = [
    Check("one row per sample", "ExpectColumnValuesToBeUnique", {"column": "sample_id"}),
    _in_set("modality is video, image or text", "modality", ["video", "image", "text"]),
    _in_set("text and vision tokens add up to the total", "tokens_add_up", [True]),
    Check(
        "every sample has tokens", "ExpectColumnValuesToBeBetween", {"column": "num_tokens", "min_value": 1}
    ),
    _in_set("modality agrees with the media referenced", "modality_agrees", [True]),
]


def check_image_samples(samples: tables.TableRef, config, root: str | None = None) -> GateResult:
    frame = sql.query(
        f"""select sample_id,
               num_tokens between {config.min_tokens} and {config.max_tokens} as tokens_in_range,
               (height % 28) + (width % 28) as size_remainder,
               octet_length(patches) = grid_h * grid_w * 588 and num_tokens * 4 = grid_h * grid_w
                   as patches_agree
            from image_samples where config_hash = '{config.config_hash()}'""",
        root,
        {"image_samples": samples.version},
    )
    return run_gate("image_samples", frame, IMAGE_SAMPLE_CHECKS, "sample_id")


def check_train_samples(samples: tables.TableRef, root: str | None = None) -> GateResult:
    frame = sql.query(
        """select sample_id, modality, num_tokens,
               num_text_tokens + num_vision_tokens = num_tokens as tokens_add_up,
               case modality when 'text' then len(media_ids) = 0 and num_vision_tokens = 0
                             else len(media_ids) > 0 and num_vision_tokens > 0 end as modality_agrees
            from train_samples""",
        root,
        {"train_samples": samples.version},
    )
    return run_gate("train_samples", frame, TRAIN_SAMPLE_CHECKS, "sample_id")


# LongCoT (SPEC §4.3.1): every generated path of a batch, then the samples kept for the cold-start set.
# keyeflow/longcot/gates.py computes the columns these read and runs them (LongCoT is a layer above quality).
LONGCOT_PATH_CHECKS = [
    Check("one row per path", "ExpectColumnValuesToBeUnique", {"column": "path_id"}),
    _in_set("confidences in [0, 1]", "confidence_in_range", [True]),
    _in_set("every path kept or dropped after review", "status", ["kept", "dropped"]),
    _in_set("grade is A, B or C once assessed", "grade_known", [True]),
    _in_set("every drop has a reason", "drop_has_reason", [True]),
    _in_set("every C is dropped", "c_dropped", [True]),
]


def longcot_sample_checks(min_samples: int) -> list[Check]:
    return [
        Check("one row per sample", "ExpectColumnValuesToBeUnique", {"column": "sample_id"}),
        Check(
            f"at least {min_samples} kept samples",
            "ExpectTableRowCountToBeBetween",
            {"min_value": min_samples},
        ),
        _in_set("no C in the output", "grade", ["A", "B"]),
        _in_set("every kept answer equals the reference", "answer_matches", [True]),
        _in_set("response in <think>…</think><answer>…</answer> form", "format_ok", [True]),
        Check(
            "quality score 1-5",
            "ExpectColumnValuesToBeBetween",
            {"column": "score", "min_value": 1, "max_value": 5},
        ),
        Check("repeats >= 0", "ExpectColumnValuesToBeBetween", {"column": "repeats", "min_value": 0}),
        Check(
            "confidences in [0, 1]",
            "ExpectColumnValuesToBeBetween",
            {"column": "confidence", "min_value": 0, "max_value": 1},
        ),
        _in_set("grade shares within bounds", "grade_share_ok", [True]),
        _in_set("every B and borderline A approved or edited by review", "reviewed", [True]),
    ]
