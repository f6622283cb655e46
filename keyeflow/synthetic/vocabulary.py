"""The word and phrase lists that the generated pictures and corpus are written from, kept as package data
(``assets/<name>.json``) rather than as literals in code, so the code reads as what it does with them."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

__all__ = ["load"]


@functools.cache
def load(name: str) -> Any:
    """``assets/<name>.json`` with every list a tuple: one copy is shared by every caller, so it must not
    change under them."""
    text = resources.files(__package__).joinpath("assets", f"{name}.json").read_text(encoding="utf-8")
    return _frozen(json.loads(text))


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value
