"""SQL over the curated tables: DuckDB in process, every Lance table registered as a view.

DuckDB scans a Lance dataset through its Arrow dataset interface with filter and projection pushdown,
so ``select count(*) from video_frames`` never reads the pixel bytes.
"""

from __future__ import annotations

import duckdb

from keyeflow.datasets import tables


def connect(root: str | None = None, versions: dict[str, int] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table, each at its latest or a pinned version."""
    con = duckdb.connect()
    versions = versions or {}
    for name in tables.list_tables(root):
        con.register(name, tables.open_table(name, version=versions.get(name), root=root))
    return con


def query(sql: str, root: str | None = None, versions: dict[str, int] | None = None):
    """Run a query and return a pandas DataFrame; errors name the query and the tables available."""
    con = connect(root, versions)
    try:
        return con.sql(sql).df()
    except duckdb.Error as exc:
        available = ", ".join(tables.list_tables(root)) or "none"
        raise ValueError(f"query failed: {exc}\n  query: {sql}\n  tables: {available}") from exc
    finally:
        con.close()
