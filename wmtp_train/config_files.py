"""Loading a :class:`~wmtp_train.config.TrainConfig` from a recipe TOML and ``--set`` overrides.

A recipe file has one table per section (``[run]``, ``[model]``, ...). Every key must name a field (unknown
keys are errors), every value must have the field's type, and each section validates itself.
``--set section.key=value`` converts ``value`` to the field's type first.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from wmtp_train.config import RECIPE_DIR, RECIPES, TrainConfig


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "recipe"}


def _parse_text(where: str, text: str, kind: type) -> Any:
    """Convert a ``--set`` value string to ``kind``."""
    text = text.strip()
    if kind is str:
        return text
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{where}: expected a bool (true/false), got {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{where}: expected {kind.__name__}, got {text!r}") from None


def _check_type(where: str, value: Any, kind: type) -> Any:
    """Check a value parsed from TOML against ``kind`` (ints are accepted for floats)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_config(tables: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Build a validated config from parsed TOML tables plus ``section.key=value`` overrides.

    Args:
        tables: ``{"recipe": name, "section": {"key": value}}`` (as parsed from a recipe file).
        overrides: ``--set`` strings, applied in order after the file.

    Returns:
        The config.
    """
    sections = _section_types()
    raw: dict[str, dict[str, Any]] = {name: {} for name in sections}
    from_text: set[tuple[str, str]] = set()
    recipe = TrainConfig.recipe
    for key, value in tables.items():
        if key == "recipe":
            recipe = _check_type("recipe", value, str)
        elif key not in sections:
            raise ValueError(f"unknown config section {key!r}; sections are {sorted(sections)}")
        elif not isinstance(value, dict):
            raise TypeError(f"config section {key!r} must be a table, got {type(value).__name__}")
        else:
            raw[key].update(value)
    for item in overrides or []:
        path, sep, value = item.partition("=")
        section, dot, name = path.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        if section not in sections:
            raise ValueError(f"--set {item!r}: unknown section {section!r}; sections are {sorted(sections)}")
        raw[section][name] = value
        from_text.add((section, name))
    built = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(raw[section]) - set(hints))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in [{section}]; known keys are {sorted(hints)}")
        values = {
            k: (_parse_text if (section, k) in from_text else _check_type)(f"{section}.{k}", v, hints[k])
            for k, v in raw[section].items()
        }
        try:
            built[section] = cls(**values)
        except ValueError as exc:  # name the table when the section's own message does not
            if str(exc).startswith(f"{section}."):
                raise
            raise ValueError(f"[{section}] {exc}") from None
    return TrainConfig(recipe=recipe, **built)


def load_config_file(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load a recipe TOML file.

    Args:
        path: the file.
        overrides: ``--set`` strings.

    Returns:
        The validated config.
    """
    with open(path, "rb") as f:
        tables = tomllib.load(f)
    return build_config(tables, overrides)


def load_recipe(name: str, overrides: list[str] | None = None) -> TrainConfig:
    """Load a shipped recipe (``wmtp_train/recipes/<name>.toml``) by name, or a TOML file by path.

    Args:
        name: one of :data:`RECIPES`, or a path to a ``.toml`` file.
        overrides: ``--set`` strings.

    Returns:
        The validated config.
    """
    if name.endswith(".toml"):
        return load_config_file(name, overrides)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes are {RECIPES} (or a path to a .toml file)")
    return load_config_file(RECIPE_DIR / f"{name}.toml", overrides)
