"""`docker compose config` without Docker: load compose files, interpolate, merge, validate.

The subset of Compose this project's files use: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?error}``, ``${VAR?error}``, ``$$``; overrides merge mappings key by key and replace other
values, ``!reset`` removes a key and ``!override`` replaces a mapping whole (Compose 2.24+). The
result is validated against the Compose Specification's JSON schema vendored by check-jsonschema.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                       r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


class Reset:
    """A ``!reset`` value: the key is removed from the merged service."""


class Override:
    """A ``!override`` value: replaces what the earlier file had instead of merging with it."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader (resolves ``<<`` merges) that also knows Compose's ``!reset`` and ``!override``."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor(
    "!override", lambda loader, node: Override(
        loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)))


def interpolate(value, env: dict[str, str]):
    """Expand variables in every string of ``value`` as Compose does; ``:?`` raises ValueError."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def expand(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg, current = match["op"], match["arg"] or "", env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return arg if missing else current
        if op in ("?", ":?"):
            if missing:
                raise ValueError(f"required variable {name} is missing a value: {arg}")
            return current
        return current or ""

    return _VARIABLE.sub(expand, value)


def merge(base, override):
    """Merge one override document into ``base`` (see the module docstring for the rules)."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = value.value if isinstance(value, Override) else value
        return merged
    return override


def load(paths: list[Path], env: dict[str, str]) -> dict:
    """The project model of ``docker compose -f A -f B ... config``: merged, interpolated, validated."""
    model: dict = {}
    for path in paths:
        document = yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 (SafeLoader subclass)
        model = merge(model, interpolate(document, env))
    validate(model)
    return model


def compose_schema() -> dict:
    schema = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(schema.read_text())


def validate(model: dict) -> None:
    """Raise ValueError naming every place where ``model`` breaks the Compose Specification."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(model), key=lambda error: list(error.absolute_path))
    if errors:
        raise ValueError("compose file invalid:\n" + "\n".join(
            f"  {'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors))
