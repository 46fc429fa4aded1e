"""Every option of every command says what it does (help text), checked on the command tree itself."""

from __future__ import annotations

import typer
from typer.core import TyperOption

from hozon.cli import manual, password
from hozon.cli.app import app


def test_every_option_has_help_and_every_command_a_description() -> None:
    root = manual.finish(typer.main.get_command(app))
    missing = []
    for name, command in manual.walk(root):
        if not (command.help or "").strip():
            missing.append(name)
        for param in command.params:
            if isinstance(param, TyperOption) and not (param.help or "").strip():
                missing.append(f"{name} {param.opts[0]}")
    assert missing == []


def test_every_value_has_a_name_chosen_for_it() -> None:
    """--help shows ``--exclude PATTERN``, ``SNAPSHOT``, never a name derived from a Python parameter."""
    root = typer.main.get_command(app)  # as declared, before manual.finish() fills in the gaps
    password.add_options(root)
    unnamed = [f"{name} {param.name}" for name, command in manual.walk(root) for param in command.params
               if param.metavar is None and not getattr(param, "is_flag", False)]
    assert unnamed == []


def test_pattern_options_point_at_the_pattern_syntax() -> None:
    root = typer.main.get_command(app)
    for name, command in manual.walk(root):
        for param in command.params:
            if isinstance(param, TyperOption) and param.metavar == "PATTERN":
                assert "docs/patterns.md" in (param.help or ""), f"{name} {param.opts[0]}"
