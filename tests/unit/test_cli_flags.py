"""`prad serve`'s flags are generated from ServeSettings (launcher/settings_cli.py): one per field, typed, with help
naming the default and the environment variable; every serve flag the docs and deploy files use still parses."""

from __future__ import annotations

import argparse
import enum
import json
import os
import re
import shlex
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from launcher import cli
from launcher.cli import build_parser
from launcher.settings import ServeSettings
from launcher.settings_cli import add_settings_flags, env_name, flag_name

ROOT = Path(__file__).resolve().parents[2]


def _serve_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def _field_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest != "help"]


def test_every_setting_has_a_serve_flag() -> None:
    flags = {action.dest for action in _serve_parser()._actions}
    assert sorted(set(ServeSettings.model_fields) - flags) == []


def test_no_serve_flag_without_a_setting() -> None:
    flags = {action.dest for action in _serve_parser()._actions} - {"help", "func"}
    assert sorted(flags - set(ServeSettings.model_fields)) == []


def test_every_setting_has_exactly_one_flag_named_after_it_defaulting_to_none() -> None:
    actions = _field_actions(_serve_parser())
    assert sorted(a.dest for a in actions) == sorted(ServeSettings.model_fields)
    for action in actions:
        is_bool = ServeSettings.model_fields[action.dest].annotation is bool
        negative = ["--no-" + flag_name(action.dest)[2:]] if is_bool else []  # --x/--no-x
        assert action.option_strings == [flag_name(action.dest), *negative], action.option_strings
        assert action.default is None, action.dest  # unset flags must fall through to PRAD_* and the defaults


def test_help_shows_description_default_and_env_var_for_every_field() -> None:
    by_dest = {a.dest: a for a in _field_actions(_serve_parser())}
    text = " ".join(_serve_parser().format_help().split())  # unwrapped
    for name, field in ServeSettings.model_fields.items():
        assert field.description, f"ServeSettings.{name} has no description for --help"
        help_text = by_dest[name].help or ""
        assert " ".join(field.description.split()) in help_text, name
        assert re.search(r"\(default: [^;]+; env PRAD_" + name.upper() + r"\)$", help_text), help_text
        assert flag_name(name) in text and f"env {env_name(ServeSettings, name)})" in text, name
    assert "(default: 8000; env PRAD_PORT)" in text and "(default: unset; env PRAD_API_KEY)" in text


def test_env_name_follows_the_model_prefix() -> None:
    assert ServeSettings.model_config["env_prefix"] == "PRAD_"
    assert env_name(ServeSettings, "max_batch_size") == "PRAD_MAX_BATCH_SIZE"


def test_serve_flags_parse_to_the_field_types() -> None:
    args = build_parser().parse_args(["serve", "--role", "prefill", "--port", "8123", "--kv-ttl-s", "2.5",
                                      "--replica-lost-s", "7", "--adapters", "some/dir", "--max-kv-tokens", "512"])
    assert (args.role, args.port, args.kv_ttl_s, args.replica_lost_s) == ("prefill", 8123, 2.5, 7.0)
    assert args.adapters == Path("some/dir") and args.max_kv_tokens == 512
    assert args.transport is None and args.threads is None  # not given: None, not the field's default


@pytest.mark.parametrize("argv", [["--role", "leader"], ["--transport", "tcp"], ["--log-format", "xml"],
                                  ["--device", "tpu"], ["--port", "eighty"], ["--kv-ttl-s", "soon"]])
def test_invalid_values_are_refused_by_argparse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", *argv])
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err


class _Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class _Toy(BaseSettings):
    """Field kinds ServeSettings does not have (yet): a bool, an enum, an optional Literal."""

    model_config = SettingsConfigDict(env_prefix="TOY_")

    verbose: bool = Field(default=False, description="say more")
    colour: _Colour = Field(default=_Colour.RED, description="a colour")
    mode: Literal["a", "b"] | None = Field(default=None, description="a mode")
    limit: int | None = Field(default=None, description="a limit")
    where: Path = Field(default=Path("/tmp"), description="a folder")


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    add_settings_flags(parser, _Toy, {"limit": "a note"})
    return parser


def test_bool_enum_optional_and_literal_fields() -> None:
    parser = _toy_parser()
    assert parser.parse_args(["--verbose"]).verbose is True
    assert parser.parse_args(["--no-verbose"]).verbose is False
    unset = parser.parse_args([])
    assert (unset.verbose, unset.colour, unset.mode, unset.limit, unset.where) == (None,) * 5
    args = parser.parse_args(["--colour", "blue", "--mode", "b", "--limit", "3", "--where", "x"])
    assert (args.colour, args.mode, args.limit, args.where) == ("blue", "b", 3, Path("x"))
    assert _Toy(**{k: v for k, v in vars(args).items() if v is not None}).colour is _Colour.BLUE
    for argv in (["--colour", "green"], ["--mode", "c"], ["--limit", "many"]):
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args(argv)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["verbose"] == "say more (default: off; env TOY_VERBOSE)"
    assert helps["colour"] == "a colour (default: red; env TOY_COLOUR)"
    assert helps["limit"] == "a limit; a note (default: unset; env TOY_LIMIT)"


def test_a_field_with_no_flag_form_is_an_error() -> None:
    class Odd(BaseSettings):
        names: list[str] = Field(default_factory=list)

    with pytest.raises(TypeError, match="names"):
        add_settings_flags(argparse.ArgumentParser(), Odd)


def _serve_with(monkeypatch: pytest.MonkeyPatch, *argv: str) -> ServeSettings:
    """The settings `prad serve argv` would serve with; nothing is loaded or started."""
    seen: list[ServeSettings] = []
    monkeypatch.setitem(sys.modules, "launcher.embedded", types.SimpleNamespace(serve=seen.append))
    monkeypatch.setattr("launcher.logs.configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "_set_threads", lambda threads: None)
    assert cli.main(["serve", *argv]) == 0
    return seen[0]


def test_an_unset_flag_leaves_the_environment_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("PRAD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PRAD_PORT", "9123")
    monkeypatch.setenv("PRAD_ROLE", "decode")
    monkeypatch.setenv("PRAD_LOG_FORMAT", "json")
    settings = _serve_with(monkeypatch, "--role", "prefill", "--max-seq-len", "256")
    assert (settings.port, settings.log_format) == (9123, "json")  # from the environment
    assert (settings.role, settings.max_seq_len) == ("prefill", 256)  # the flag wins
    assert settings.max_batch_size == ServeSettings.model_fields["max_batch_size"].default  # neither: default


# Where `prad serve` flags are documented or deployed; bench/, tests/ and launcher/local.py run the parser itself.
_DOCUMENTED = [ROOT / "README.md", ROOT / "docker-compose.yml", ROOT / "Makefile",
               *sorted((ROOT / "docs").glob("*.md")),
               *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix != ".json")]
_SERVE_WORD = re.compile(r"(?:^|[\s`\[\"'(])serve\b")  # `prad serve`, `docker run IMAGE serve`, ["serve", ...]
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_PLACEHOLDERS = {"--flag"}  # deploy/README.md: "Any `prad serve --flag` is also `PRAD_FLAG`"


def _serve_commands(text: str) -> list[str]:
    """What follows each `serve` command word, up to the end of its code span or line.

    A line ending in a backslash, or followed by a line starting with `[` or `--`, continues the command (the
    README wraps its `prad serve [--role ...]` synopsis over two lines).
    """
    lines = text.splitlines()
    commands = []
    for i, line in enumerate(lines):
        for match in _SERVE_WORD.finditer(line):
            rest, j = line[match.end():], i
            while "`" not in rest and j + 1 < len(lines) and (
                    rest.rstrip().endswith("\\") or lines[j + 1].lstrip().startswith(("[", "--"))):
                j += 1
                rest = rest.rstrip().removesuffix("\\") + " " + lines[j]
            commands.append(rest.split("`")[0])
    return commands


def test_every_documented_serve_flag_parses() -> None:
    known = set(_serve_parser()._option_string_actions)  # exact names: argparse would take --rol for --role
    found: dict[str, set[str]] = {}
    parsed: list[str] = []  # complete example commands (no placeholders): parsed with their values
    for path in _DOCUMENTED:
        text = path.read_text()
        for command in _serve_commands(text):
            for flag in set(_FLAG.findall(command)) - _PLACEHOLDERS:
                found.setdefault(flag, set()).add(str(path.relative_to(ROOT)))
            if command.lstrip().startswith("--") and not re.search(r"[\[|$]|\.\.\.|--help|--flag", command):
                build_parser().parse_args(["serve", *shlex.split(command, comments=True)])  # values too
                parsed.append(command)
        for argv in re.findall(r'\[\s*"serve"[^\]]*\]', text):  # compose command: / k8s args: lists
            assert build_parser().parse_args(json.loads(argv)).command == "serve", (path, argv)
    assert {"--role", "--transport", "--device", "--dtype", "--adapters", "--host", "--port", "--grpc-port",
            "--decode-addr", "--model"} <= set(found), sorted(found)  # the extraction works
    unknown = {flag: sorted(where) for flag, where in found.items() if flag not in known}
    assert unknown == {}
    assert parsed, "no complete `prad serve` example found: the extraction is broken"
