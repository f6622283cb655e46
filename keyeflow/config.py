"""Settings: where data, tables and tracking live; and the checks and the hash every config class shares.

Everything defaults under one data root (``KEYEFLOW_HOME``, default ``./keyeflow_home``) so a laptop run
needs no service; each location can be pointed elsewhere (``s3://`` tables, an MLflow server) by env var.
Component configs (Slow-Fast, ingestion, gates, stages) live beside their components, one class each; they
validate themselves on construction with the functions below (`check_int`, `check_number`, `check_flag`,
`invalid`) and hash themselves with `config_hash`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Platform locations, read from ``KEYEFLOW_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="KEYEFLOW_", extra="ignore")

    home: Path = Field(default=Path("keyeflow_home"), description="data root")
    tables_uri: str | None = Field(default=None, description="Lance tables root; default HOME/tables")
    tracking_uri: str | None = Field(default=None, description="MLflow URI; default sqlite under HOME")
    experiment: str = "keyeflow"
    # Where data flows run their shard tasks. Read when a flow module is imported (a Prefect flow's task
    # runner is fixed when the flow is decorated), so set these before starting `keyeflow`, a worker or
    # a deployment's job, not in the middle of a process.
    task_runner: Literal["thread", "dask"] = Field(
        default="thread", description="thread: Prefect's thread pool in this process; dask: a Dask cluster"
    )
    dask_workers: int = Field(default=2, description="worker processes of the local Dask cluster")
    dask_address: str | None = Field(
        default=None,
        description="scheduler of an existing Dask cluster (tcp://host:8786) instead of a local one",
    )
    # How many rows of a table may fail row-level gate checks (and be quarantined) before the gate stops
    # the flow; JSON, e.g. KEYEFLOW_GATE_MAX_FAILING_SHARE='{"video_samples": 0.05}'. Unnamed gates: 1%.
    gate_max_failing_share: dict[str, float] = Field(
        default_factory=dict, description="per gate, the largest share of rows it quarantines and goes on"
    )

    @model_validator(mode="after")
    def _check_task_runner(self) -> Settings:
        if self.dask_workers < 1:
            raise ValueError(f"KEYEFLOW_DASK_WORKERS must be at least 1, got {self.dask_workers}")
        for gate, share in self.gate_max_failing_share.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"KEYEFLOW_GATE_MAX_FAILING_SHARE[{gate!r}] must be in [0, 1], got {share}")
        # A scheduler address with the thread runner would be silently ignored; say so instead.
        if self.dask_address and self.task_runner != "dask":
            raise ValueError(
                f"KEYEFLOW_DASK_ADDRESS={self.dask_address} is set but KEYEFLOW_TASK_RUNNER is "
                f"{self.task_runner!r}; set KEYEFLOW_TASK_RUNNER=dask to use that cluster"
            )
        return self

    @property
    def root(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def tables(self) -> str:
        return self.tables_uri or str(self.root / "tables")

    @property
    def mlflow_uri(self) -> str:
        # MLflow 3 refuses the plain file store by default; SQLite under the data root keeps the
        # tracking data next to the tables it describes instead of in the working directory.
        return self.tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_uri(self) -> str:
        return str(self.root / "mlartifacts")

    @property
    def tracking_is_server(self) -> bool:
        """An MLflow tracking server (not a store file): it, not we, decides where artifacts go."""
        return self.mlflow_uri.split(":", 1)[0].lower() in ("http", "https")

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def work_dir(self) -> Path:
        """Scratch space for spooled frames; safe to delete between runs."""
        return self.root / "work"


def get_settings() -> Settings:
    # Keyed on the environment: tests and the CLI change KEYEFLOW_HOME at run time, and building a
    # pydantic Settings on every table access was measurable.
    return _settings(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("KEYEFLOW_"))))


@functools.lru_cache(maxsize=16)
def _settings(env: tuple) -> Settings:
    return Settings()


def storage_options(uri: str) -> dict[str, str] | None:
    """Lance options for a table URI on S3-compatible storage, read from the standard AWS variables.

    Credentials and endpoint come only from the environment, never from flow or task parameters, so they
    never reach Prefect's parameter store or an MLflow param/tag; callers pass the result straight to
    Lance and must not log it. Lance reads some ``AWS_*`` variables by itself, but not
    ``AWS_ENDPOINT_URL_S3``, and it refuses a plain-HTTP endpoint (MinIO, moto, a lab gateway) unless told
    ``allow_http``; mapping them here, in one place, makes every call site agree. ``None`` for local paths.
    """
    if not uri.startswith(("s3://", "s3a://")):
        return None
    env = os.environ
    options = {}
    for option, names in (
        ("aws_access_key_id", ("AWS_ACCESS_KEY_ID",)),
        ("aws_secret_access_key", ("AWS_SECRET_ACCESS_KEY",)),
        ("aws_session_token", ("AWS_SESSION_TOKEN",)),
        ("aws_region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
        ("aws_endpoint", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    ):
        value = next((env[n] for n in names if env.get(n)), None)
        if value:
            options[option] = value
    endpoint = options.get("aws_endpoint", "")
    if endpoint.lower().startswith("http://") or env.get("AWS_ALLOW_HTTP", "").lower() == "true":
        options["allow_http"] = "true"
    return options


# ------------------------------------------------------------------------------------------ config checks
# A bad setting is refused when its config is built (DESIGN rule 4), with one message shape that names the
# class, the field and the value: "StageConfig.max_steps=0: must be >= 1". A wrong type is a ValueError too:
# one exception type for every bad setting, whatever was wrong with it.


def is_integer(value: object) -> bool:
    """An int or NumPy integer; not a bool (Python counts True as 1, a config never should)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number (int, float or NumPy scalar); not a bool, NaN or infinity."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def invalid(owner: str, name: str, value: object, why: str) -> ValueError:
    """The error for a bad setting `owner.name` (the caller raises it)."""
    return ValueError(f"{owner}.{name}={value!r}: {why}")


def check_int(
    owner: str, name: str, value: object, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """`value` as an int, or a ValueError saying it is not an integer, or which bound it breaks."""
    if not is_integer(value):
        raise invalid(owner, name, value, "must be an integer")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        raise invalid(owner, name, value, "must be " + " and ".join(bounds))
    return int(value)


def check_number(
    owner: str, name: str, value: object, *, minimum: float | None = None, strict: bool = False
) -> float:
    """`value` as a float, or a ValueError saying what it must be: finite, >= `minimum` (> with `strict`)."""
    if not is_number(value) or (minimum is not None and (value < minimum or (strict and value == minimum))):
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        raise invalid(owner, name, value, f"must be a finite number{bound}")
    return float(value)


def check_flag(owner: str, name: str, value: object) -> bool:
    """`value` if it is True or False (not 1, 0 or "yes")."""
    if not isinstance(value, bool):
        raise invalid(owner, name, value, "must be True or False")
    return value


def config_hash(config: Any, length: int = 16, *, compact: bool = False) -> str:
    """Stable hash of a config (dataclass, pydantic model or mapping) for caching and row provenance: the
    sha256 of its JSON with sorted keys.

    Two spellings of that JSON are in use, and both stay, because stored data is keyed on them: table rows
    (image and train samples, LongCoT generations) carry hashes of `json.dumps`' default spacing; stage
    checkpoints, cached training steps and mixtures carry hashes of the compact form (``compact=True``:
    no spaces after "," and ":"). Changing either would re-key everything already stored.
    """
    if is_dataclass(config):
        payload = asdict(config)
    elif hasattr(config, "model_dump"):
        payload = config.model_dump(mode="json")
    else:
        payload = dict(config)
    separators = (",", ":") if compact else None
    text = json.dumps(payload, sort_keys=True, separators=separators, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
