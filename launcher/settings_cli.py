"""Command-line flags generated from a pydantic-settings model, so `prad serve` cannot drift from ServeSettings.

One flag per field: `--field-name`, typed from the annotation, help = the field's description plus its default and
its environment variable. Every flag defaults to None: a flag not given falls through to the environment, then to
the field's default (the caller builds the settings from the non-None values only).
"""

from __future__ import annotations

import argparse
import enum
import shutil
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

# argparse metavars by value type: short, so the help column stays wide enough for the descriptions
_METAVARS: dict[type, str] = {int: "INT", float: "FLOAT", str: "STR", Path: "PATH"}


class SettingsHelpFormatter(argparse.HelpFormatter):
    """Help column at 34 (room for `--exit-when-unhealthy-s FLOAT`) and lines of at most 110 characters."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 34,
                 width: int | None = None) -> None:
        width = width or min(110, shutil.get_terminal_size().columns - 2)
        super().__init__(prog, indent_increment, max_help_position, width)

    def _split_lines(self, text: str, width: int) -> list[str]:
        """Wrap at spaces only: a flag or variable name (--api-key-file, PRAD_API_KEY) stays on one line."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def flag_name(field: str) -> str:
    """`max_batch_size` -> `--max-batch-size`."""
    return "--" + field.replace("_", "-")


def env_name(settings: type[BaseSettings], field: str) -> str:
    """The environment variable pydantic-settings reads `field` from, e.g. PRAD_PORT (the model's env_prefix)."""
    name = f"{settings.model_config.get('env_prefix', '')}{field}"
    return name if settings.model_config.get("case_sensitive") else name.upper()


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X: on the command line, None already means 'not given'."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _choices(name: str, values: list[Any]) -> dict[str, Any]:
    """argparse kwargs for a closed set of str/int/float values (Literal or enum)."""
    kinds = {type(v) for v in values}
    if len(kinds) != 1 or not kinds <= {str, int, float}:
        raise TypeError(f"{name}: choices must all be str, int or float, got {values!r}")
    return {"type": kinds.pop(), "choices": values}


def flag_kwargs(name: str, annotation: Any) -> dict[str, Any]:
    """argparse kwargs (type, choices, action, metavar) for a field annotated `annotation`.

    An annotation with no obvious flag form (a list, a model, a union of two types) is a TypeError, so a new field
    of such a type fails the parser's construction (and the tests) instead of silently getting no flag.
    """
    base = _without_none(annotation)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is Literal:
        return _choices(name, list(typing.get_args(base)))
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return _choices(name, [member.value for member in base])  # pydantic turns the value into the member
    if base in _METAVARS:
        return {"type": base, "metavar": _METAVARS[base]}
    raise TypeError(f"{name}: no command-line form for the annotation {annotation!r}")


def _shown_default(field: FieldInfo) -> str:
    """The default as help shows it: `unset` for None, the value of an enum, `required` when there is none."""
    default = field.get_default(call_default_factory=True)
    if default is PydanticUndefined:
        return "required"
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default.value if isinstance(default, enum.Enum) else default)


def flag_help(settings: type[BaseSettings], name: str, field: FieldInfo, note: str | None = None) -> str:
    """`<description>[; <note>] (default: X; env PRAD_NAME)`, %-escaped for argparse."""
    text = "; ".join(part for part in (field.description, note) if part)
    text = f"{text} (default: {_shown_default(field)}; env {env_name(settings, name)})".lstrip()
    return text.replace("%", "%%")


def add_settings_flags(parser: argparse.ArgumentParser, settings: type[BaseSettings],
                       notes: Mapping[str, str] | None = None) -> None:
    """Add one flag per field of `settings` to `parser` (dest = the field name, default None).

    `notes` adds command-line-only remarks to some fields' help (e.g. that a secret given as a flag shows in ps).
    """
    for name, field in settings.model_fields.items():
        if field.alias or field.validation_alias:
            raise TypeError(f"{name}: aliased fields are not supported (the flag's dest must be the field name)")
        parser.add_argument(flag_name(name), dest=name, default=None,
                            help=flag_help(settings, name, field, (notes or {}).get(name)),
                            **flag_kwargs(name, field.annotation))
