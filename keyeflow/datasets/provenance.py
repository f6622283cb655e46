"""Where a mixture's data came from, in SQL over the tables: the source videos, images and text files behind a
mixture id, and the gate verdicts that let each of them through. The MLflow half of lineage (which runs and
mixtures made a checkpoint) is `keyeflow.lineage.trace`; this is the half that lives in the tables.

Which verdict covers which rows:
- the mixture and its train_samples: the gates recorded on exactly those table versions (the mixture id pins
  the train_samples version, `mixtures.train_samples_version`);
- media (video_samples, image_samples): a media gate checks the table right after its rows are written, so
  the verdict covering a row is the first one recorded on that table at or after the row's `created_at`
  (an ASOF join). A row with no verdict after it is reported as unchecked.
"""

from __future__ import annotations

from typing import Any

import duckdb

from keyeflow.datasets import tables
from keyeflow.datasets.tables import TableRef

MEDIA_TABLES = ("video_samples", "image_samples")


def _register(
    con: duckdb.DuckDBPyConnection, name: str, version: int | None = None, root: str | None = None
) -> bool:
    if not tables.exists(name, root):
        return False
    con.register(name, tables.open_table(name, version=version, root=root))
    return True


def mixture_provenance(mixture: TableRef, mixture_id: str, root: str | None = None) -> dict[str, Any]:
    """The samples, sources and gate verdicts behind `mixture_id` in the pinned `mixture` table."""
    con = duckdb.connect()
    try:
        con.register("mixtures", tables.dataset(mixture.uri, version=mixture.version))
        rows = con.execute(
            "select modality, count(*), sum(num_tokens * repeats), min(train_samples_version), "
            "max(train_samples_version), min(stage) from mixtures where mixture_id = ? "
            "group by modality order by modality",
            [mixture_id],
        ).fetchall()
        if not rows:
            raise KeyError(f"mixture {mixture_id!r} has no rows in {mixture.uri}@v{mixture.version}")
        versions = {r[3] for r in rows} | {r[4] for r in rows}
        if len(versions) != 1:
            raise ValueError(f"mixture {mixture_id!r} mixes train_samples versions {sorted(versions)}")
        samples_version = versions.pop()
        _register(con, "train_samples", samples_version, root)
        con.execute(
            """
            create temp table used as
            select s.sample_id, s.modality, s.source, s.source_uri, s.media_ids
            from mixtures m join train_samples s on m.sample_id = s.sample_id
            where m.mixture_id = ?
        """,
            [mixture_id],
        )
        con.execute("create temp table media as select distinct unnest(media_ids) as media_id from used")

        videos: list[str] = []
        images: list[str] = []
        if _register(con, "video_samples", root=root):
            videos = [
                r[0]
                for r in con.sql("""
                select distinct v.uri from media m join video_samples v on v.sample_id = m.media_id order by 1
            """).fetchall()
            ]
        if _register(con, "image_samples", root=root):
            images = [
                r[0]
                for r in con.sql("""
                select distinct i.uri from media m join image_samples i on i.sample_id = m.media_id order by 1
            """).fetchall()
            ]
        # A text sample's source_uri names its record (file#Lline), so these are the text sources themselves.
        texts = [
            r[0]
            for r in con.sql(
                "select distinct coalesce(source_uri, sample_id) from used where modality = 'text' order by 1"
            ).fetchall()
        ]
        num_records = con.sql("select count(distinct source_uri) from used").fetchall()[0][0]

        gates = _gate_verdicts(con, mixture, samples_version, root)
    finally:
        con.close()
    return {
        "mixture_id": mixture_id,
        "mixture": f"{mixture.uri}@v{mixture.version}",
        "stage": rows[0][5],
        "train_samples_version": samples_version,
        "samples_by_modality": {r[0]: r[1] for r in rows},
        "tokens_by_modality": {r[0]: int(r[2]) for r in rows},
        "num_videos": len(videos), "num_images": len(images), "num_texts": len(texts),
        "num_source_records": num_records, "videos": videos, "images": images, "texts": texts,
        "gates": gates,
    }  # fmt: skip


def _gate_verdicts(
    con: duckdb.DuckDBPyConnection, mixture: TableRef, samples_version: int, root: str | None
) -> list[dict[str, Any]]:
    if not _register(con, "gate_results", root=root):
        return []
    exact = con.execute(
        """
        select gate, table_uri, table_version, passed, run_id, 0 as num_unchecked from gate_results
        where (table_uri = ? and table_version = ?)
           or (table_uri like '%/train_samples.lance' and table_version = ?)
        order by checked_at
    """,
        [mixture.uri, mixture.version, samples_version],
    ).fetchall()
    media = []
    for name in MEDIA_TABLES:
        if not con.execute("select 1 from information_schema.tables where table_name = ?", [name]).fetchall():
            continue
        # Per referenced media row, the first verdict on its table at or after the row was written. `name`
        # is one of MEDIA_TABLES (an identifier, which SQL cannot bind); values are parameters.
        media += con.execute(
            f"""
            with rows as (
                select x.created_at from media m join {name} x on x.sample_id = m.media_id
            ),
            verdicts as (
                select gate, table_uri, table_version, passed, run_id, checked_at from gate_results
                where table_uri like ('%/' || $name || '.lance')
            ),
            matched as (
                select v.gate, v.table_uri, v.table_version, v.passed, v.run_id
                from rows r asof left join verdicts v on r.created_at <= v.checked_at
            )
            select gate, coalesce(table_uri, $name) as table_uri, table_version, passed, run_id,
                   count(*) filter (where gate is null) as num_unchecked
            from matched group by all order by table_version nulls last
        """,
            {"name": name},
        ).fetchall()
    out = []
    for gate, uri, version, passed, run_id, unchecked in [*exact, *media]:
        if gate is None:
            out.append(
                {
                    "gate": None,
                    "table": uri,
                    "version": None,
                    "passed": None,
                    "run_id": None,
                    "num_unchecked_rows": unchecked,
                }
            )
        else:
            out.append({"gate": gate, "table": uri, "version": version, "passed": passed, "run_id": run_id})
    return out
