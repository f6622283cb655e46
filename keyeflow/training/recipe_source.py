"""Recipes a user can change without editing the package: where a recipe comes from and `--set` overrides.

A recipe source is one of
- a built-in name (`tiny`, `keye-8b`, …: `keyeflow.training.recipes.RECIPES`, `posttrain_recipe.RECIPES`);
- an installed Python function, `package.module:function`, returning a `PretrainRecipe`/`PosttrainRecipe`;
- a YAML or TOML file (`.yaml`, `.yml`, `.toml`) naming its `base` (one of the two above, or another recipe
  file, relative to this one) and, nested under the recipe's own field names, the values it changes:

      base: tiny
      name: my-recipe
      stage2:                 # an alias of stages.2 (stage1, stage3 = annealing likewise)
        learning_rate: 1.0e-5
      variants:
        video-rich: {weight: 2.0}

Overrides (`--set stage2.learning_rate=1e-5`, a deployment's `overrides` parameter as a list of such strings
or a mapping) are dotted paths into the recipe's dataclasses: field names, dict keys (`stages.2`), tuple
items by index or by their `name` (`variants.balanced.weight`). A text value is parsed by the type of the
field it sets (`1e-5` for a float, `true` for a bool, `null` where None is allowed, JSON/YAML for lists and
mappings). Every override is checked before anything is built: an unknown key is refused naming the key and
its closest valid names, a value of the wrong type naming the key and the type. Each changed dataclass is
then rebuilt once with all its changes, so its own validation (`__post_init__`) sees the final values.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from keyeflow.training import posttrain_recipe as posttrain_recipes
from keyeflow.training import recipes as pretrain_recipes
from keyeflow.training.posttrain_recipe import PosttrainRecipe
from keyeflow.training.recipes import PretrainRecipe

RECIPE_FILE_SUFFIXES = (".yaml", ".yml", ".toml")

# Short names for the pre-training stages, as people say them ("stage 2's learning rate").
PRETRAIN_ALIASES = {"stage1": ("stages", "1"), "stage2": ("stages", "2"), "stage3": ("annealing",)}


class RecipeError(ValueError):
    """A recipe source or override that cannot be used; the message names the source or key."""


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What differs between the pre- and post-training recipes here."""

    name: str
    cls: type
    builtins: Mapping[str, Any]
    aliases: Mapping[str, tuple[str, ...]]

    def builtin(self, name: str) -> Any:
        builder = self.builtins[name]
        return builder(None) if self.cls is PretrainRecipe else builder()


PRETRAIN = _Kind("pretrain", PretrainRecipe, pretrain_recipes.RECIPES, PRETRAIN_ALIASES)
POSTTRAIN = _Kind("posttrain", PosttrainRecipe, posttrain_recipes.RECIPES, {})


def load_pretrain_recipe(
    source: str, overrides: Sequence[str] | Mapping[str, Any] | None = None, init: str | None = None
) -> PretrainRecipe:
    """The pre-training recipe `source` (module docstring) with `overrides`, starting from `init` when given
    (the checkpoint stage 1 loads; None keeps the recipe's)."""
    recipe = _load(PRETRAIN, source, overrides)
    return recipe if init is None else dataclasses.replace(recipe, init=init)


def load_posttrain_recipe(
    source: str, overrides: Sequence[str] | Mapping[str, Any] | None = None
) -> PosttrainRecipe:
    """The post-training recipe `source` (module docstring) with `overrides`."""
    return _load(POSTTRAIN, source, overrides)


def is_recipe_file(source: str) -> bool:
    return source.lower().endswith(RECIPE_FILE_SUFFIXES)


def normalise_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    """Overrides as `key=value` strings (a mapping's values as JSON): what the flow's MLflow run records."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise RecipeError(
            f"overrides: a list of key=value strings or a mapping, not the string {overrides!r}"
        )
    return [str(item) for item in overrides]


def _load(kind: _Kind, source: str, overrides: Sequence[str] | Mapping[str, Any] | None) -> Any:
    recipe = _base(kind, source, seen=())
    changes = _Changes()
    for key, value, text in _parse_overrides(overrides):
        changes.add(kind, key, value, text, origin=f"override {key}")
    return changes.apply(recipe, f"recipe {source!r}")


def _base(kind: _Kind, source: str, seen: tuple[Path, ...]) -> Any:
    if not isinstance(source, str) or not source:
        raise RecipeError(f"{kind.name} recipe: a name, module:function or recipe file, got {source!r}")
    if source in kind.builtins:
        return kind.builtin(source)
    if is_recipe_file(source):
        return _from_file(kind, Path(source), seen)
    if ":" in source:
        return _from_function(kind, source)
    close = difflib.get_close_matches(source, list(kind.builtins), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(
        f"no {kind.name} recipe {source!r}{hint} A recipe is one of {sorted(kind.builtins)}, "
        f"a file ({', '.join(RECIPE_FILE_SUFFIXES)}) or an installed function as module:function"
    )


def _from_function(kind: _Kind, source: str) -> Any:
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"{kind.name} recipe {source!r}: cannot import {module_name!r}: {exc}") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise RecipeError(f"{kind.name} recipe {source!r}: {module_name} has no function {attr!r}")
    recipe = function()
    if not isinstance(recipe, kind.cls):
        raise RecipeError(
            f"{kind.name} recipe {source!r} returned a {type(recipe).__name__}, not a {kind.cls.__name__}"
        )
    return recipe


def _from_file(kind: _Kind, path: Path, seen: tuple[Path, ...]) -> Any:
    path = path.expanduser().resolve()
    if path in seen:
        raise RecipeError(f"recipe file {path}: its bases lead back to it ({' → '.join(map(str, seen))})")
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"recipe file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe file {path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path}: a mapping of recipe fields, got {type(data).__name__}")
    data = dict(data)
    base = data.pop("base", None)
    if not isinstance(base, str):
        raise RecipeError(
            f"recipe file {path}: name the recipe it changes, e.g. `base: tiny` "
            f"({kind.name} recipes: {sorted(kind.builtins)}, a module:function or another recipe file)"
        )
    if is_recipe_file(base) and not Path(base).expanduser().is_absolute():
        base = str(path.parent / base)
    recipe = _base(kind, base, (*seen, path))
    changes = _Changes()
    for key, value in data.items():
        changes.add(kind, str(key), value, None, origin=f"{path.name}: {key}")
    return changes.apply(recipe, f"recipe file {path}")


def _parse_overrides(
    overrides: Sequence[str] | Mapping[str, Any] | None,
) -> list[tuple[str, Any, str | None]]:
    """(dotted key, value, the text it came from or None for a typed value)."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v, v if isinstance(v, str) else None) for k, v in overrides.items()]
    out = []
    for item in normalise_overrides(overrides):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r}: expected key=value, e.g. stage2.learning_rate=1e-5")
        out.append((key.strip(), raw.strip(), raw.strip()))
    return out


# ---------------------------------------------------------------------------------------------- changes


_MISSING = object()


class _Leaf:
    """One value to set, with where it came from (for error messages)."""

    def __init__(self, value: Any, text: str | None, origin: str):
        self.value, self.text, self.origin = value, text, origin


class _Changes:
    """The overrides as a tree of path segments, merged: a mapping value on a dataclass or a dict spreads
    into its keys, so `stage2: {learning_rate: …}` and `stage2.learning_rate=…` mean the same."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}
        self.origins: list[str] = []

    def add(self, kind: _Kind, key: str, value: Any, text: str | None, origin: str) -> None:
        self.origins.append(origin if text is None else f"{key}={text}")
        parts = [p for p in key.split(".")]
        if any(not p for p in parts):
            raise RecipeError(f"{origin}: {key!r} is not a dotted path (empty segment)")
        if parts[0] in kind.aliases:
            parts = [*kind.aliases[parts[0]], *parts[1:]]
        self._insert(self.tree, parts, value, text, origin)

    def _insert(self, node: dict, parts: list[str], value: Any, text: str | None, origin: str) -> None:
        head, rest = parts[0], parts[1:]
        if rest:
            child = node.setdefault(head, {})
            if isinstance(child, _Leaf):  # a whole value set, then a part of it: the part wins inside it
                child = node[head] = {"": child}
            self._insert(child, rest, value, text, origin)
        elif isinstance(value, Mapping) and text is None and value:
            child = node.setdefault(head, {})
            if isinstance(child, _Leaf):
                child = node[head] = {"": child}
            for k, v in value.items():
                self._insert(child, [str(k)], v, v if isinstance(v, str) else None, origin)
        else:
            node[head] = _Leaf(value, text, origin)

    def apply(self, recipe: Any, what: str) -> Any:
        if not self.tree:
            return recipe
        try:
            return _apply(recipe, type(recipe), self.tree, ())
        except RecipeError:
            raise
        except (ValueError, TypeError) as exc:  # a dataclass's own validation of the changed values
            raise RecipeError(f"{what} with {', '.join(self.origins)} is not valid: {exc}") from exc


def _apply(current: Any, hint: Any, changes: dict | _Leaf, path: tuple[str, ...]) -> Any:
    """`current` (declared as `hint`) with `changes` applied; each dataclass is rebuilt once."""
    if isinstance(changes, _Leaf):
        return _coerce(hint, changes.value, changes.text, path, changes.origin)
    if "" in changes:  # a whole value, then some of its parts
        current = _apply(current, hint, changes[""], path)
        changes = {k: v for k, v in changes.items() if k}
    hint = _strip_optional(hint, current)
    if dataclasses.is_dataclass(current) or (current is None and _dataclass_in(hint)):
        cls = type(current) if current is not None else _dataclass_in(hint)
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        new = {}
        for key, sub in changes.items():
            if key not in fields:
                _unknown(key, sorted(fields), path, cls.__name__, sub)
            old = getattr(current, key) if current is not None else _default(cls, key)
            new[key] = _apply(old, hints[key], sub, (*path, key))
        if current is None:
            return cls(**new)
        return dataclasses.replace(current, **new)
    origin = typing.get_origin(hint)
    if isinstance(current, Mapping):
        key_type, value_type = (typing.get_args(hint) or (str, Any)) if origin in _MAPPINGS else (str, Any)
        out = dict(current)
        for key, sub in changes.items():
            typed_key = _coerce(key_type, key, key, (*path, key), _origin_of(sub))
            if typed_key not in out and (key_type is not str and key_type is not Any):
                _unknown(key, sorted(map(str, out)), path, "this mapping", sub)
            out[typed_key] = _apply(out.get(typed_key), value_type, sub, (*path, key))
        return type(current)(out) if not isinstance(current, types.MappingProxyType) else out
    if isinstance(current, tuple):
        item_type = (typing.get_args(hint) or (Any,))[0] if origin is tuple else Any
        items = list(current)
        names = [getattr(i, "name", None) for i in items]
        for key, sub in changes.items():
            if key in names:
                index = names.index(key)
            elif key.lstrip("-").isdigit() and -len(items) <= int(key) < len(items):
                index = int(key)
            else:
                valid = [n for n in names if n] or [str(i) for i in range(len(items))]
                _unknown(key, valid, path, "this list", sub)
            items[index] = _apply(items[index], item_type, sub, (*path, key))
        return tuple(items)
    if current is None or hint is Any:  # an open value (a mixture's `target_shares`): set its keys
        out = dict(current or {}) if isinstance(current, Mapping) or current is None else None
        if out is not None:
            for key, sub in changes.items():
                out[key] = _apply(out.get(key), Any, sub, (*path, key))
            return out
    where = ".".join(path)
    raise RecipeError(f"{_origin_of(changes)}: {where} is a {type(current).__name__} value; it has no keys")


_MAPPINGS = (dict, Mapping, typing.Mapping, types.MappingProxyType)


def _origin_of(changes: Any) -> str:
    if isinstance(changes, _Leaf):
        return changes.origin
    for sub in changes.values():
        return _origin_of(sub)
    return "override"


def _unknown(key: str, valid: list[str], path: tuple[str, ...], owner: str, changes: Any) -> None:
    where = ".".join((*path, key))
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise RecipeError(
        f"{_origin_of(changes)}: unknown key {where!r} ({owner} has no {key!r}); {hint}valid: {valid}"
    )


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def _strip_optional(hint: Any, current: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _dataclass_in(hint: Any) -> type | None:
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------- values


def _coerce(hint: Any, value: Any, text: str | None, path: tuple[str, ...], origin: str) -> Any:
    """`value` as the type `hint` declares, or a RecipeError naming the key and the type it needs."""
    where = ".".join(path)

    def wrong(expected: str) -> RecipeError:
        return RecipeError(f"{origin}: {where} must be {expected}, got {value!r}")

    if hint is Any or hint is object:
        return _parse_text(text) if text is not None else value
    origin_type, args = typing.get_origin(hint), typing.get_args(hint)
    if origin_type in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (text is not None and text.lower() in _NULLS)):
            return None
        # A text is tried against the non-string types first: "1e-5" is a number where one is allowed.
        for option in sorted(options, key=lambda a: a is str):
            try:
                return _coerce(option, value, text, path, origin)
            except RecipeError:
                continue
        names = " or ".join(_type_name(a) for a in args)
        raise wrong(names)
    if hint is type(None):
        if value is None or (text is not None and text.lower() in _NULLS):
            return None
        raise wrong("null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        raise wrong("true or false")
    if hint is int:
        if isinstance(value, bool):
            raise wrong("an integer")
        if isinstance(value, int):
            return value
        number = _number(text) if text is not None else value
        if isinstance(number, float) and number.is_integer():
            return int(number)
        if isinstance(number, int) and not isinstance(number, bool):
            return number
        raise wrong("an integer")
    if hint is float:
        number = _number(text) if text is not None else value
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            return float(number)  # 1 and 1.0 hash differently: a float field holds a float
        raise wrong("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    if origin_type is tuple or origin_type is list or hint in (tuple, list):
        items = _parse_text(text) if text is not None else value
        if not isinstance(items, (list, tuple)):  # written as [a, b]: a bare word is a string field's
            raise wrong("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(items)
        elif args and len(args) == len(items):
            item_types = list(args)
        elif args:
            raise wrong(f"a list of {len(args)}")
        else:
            item_types = [Any] * len(items)
        out = [
            _coerce(t, v, v if isinstance(v, str) else None, (*path, str(i)), origin)
            for i, (t, v) in enumerate(zip(item_types, items, strict=True))
        ]
        return tuple(out) if (origin_type is tuple or hint is tuple) else out
    if origin_type in _MAPPINGS or hint in _MAPPINGS:
        data = _parse_text(text) if text is not None else value
        if not isinstance(data, Mapping):
            raise wrong("a mapping")
        key_type, value_type = args or (Any, Any)
        return {
            _coerce(key_type, k, str(k), (*path, str(k)), origin): _coerce(
                value_type, v, v if isinstance(v, str) else None, (*path, str(k)), origin
            )
            for k, v in data.items()
        }
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        data = _parse_text(text) if text is not None else value
        if isinstance(data, hint):
            return data
        if not isinstance(data, Mapping):
            raise wrong(f"a mapping of {hint.__name__} fields")
        changes = _Changes()
        for k, v in data.items():
            changes._insert(changes.tree, [str(k)], v, v if isinstance(v, str) else None, origin)
        return _apply(None, hint, changes.tree, path)
    return value  # a type this module does not know: the dataclass's own check decides


_NULLS = ("null", "none", "~")
_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _number(text: str | None) -> Any:
    if text is None:
        return None
    cleaned = text.strip().replace("_", "")
    for parse in (int, float):
        try:
            value = parse(cleaned)
        except ValueError:
            continue
        return value if parse is int or math.isfinite(value) else None  # nan, inf: not a setting
    return None


def _parse_text(text: str) -> Any:
    """An untyped text value: YAML's reading of it (numbers, booleans, null, lists, mappings), with
    exponent numbers such as `1e-5` as floats (YAML 1.1 would keep them strings)."""
    number = _number(text)
    if number is not None:
        return number
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint)


def to_plain(recipe: Any) -> Any:
    """The recipe as nested plain values (what `keyeflow recipe show` prints and a recipe file mirrors)."""
    if dataclasses.is_dataclass(recipe):
        return {f.name: to_plain(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)}
    if isinstance(recipe, Mapping):
        return {str(k) if not isinstance(k, int) else k: to_plain(v) for k, v in recipe.items()}
    if isinstance(recipe, (list, tuple)):
        return [to_plain(v) for v in recipe]
    return recipe
