"""`prad serve` offers a flag for every ServeSettings field (the README documents them as flags)."""

from __future__ import annotations

import argparse

from launcher.cli import build_parser
from launcher.settings import ServeSettings


def _serve_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def test_every_setting_has_a_serve_flag() -> None:
    flags = {action.dest for action in _serve_parser()._actions}
    assert sorted(set(ServeSettings.model_fields) - flags) == []


def test_no_serve_flag_without_a_setting() -> None:
    flags = {action.dest for action in _serve_parser()._actions} - {"help", "func"}
    assert sorted(flags - set(ServeSettings.model_fields)) == []
