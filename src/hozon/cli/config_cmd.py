"""hozon config show: the effective settings and where each came from (never a password)."""

from __future__ import annotations

import json
import os

import typer
from rich.text import Text
from typer import _click as click  # typer carries its own copy of click

from hozon.cli import config
from hozon.cli.common import RepoOption, console
from hozon.cli.password import password_origin

config_app = typer.Typer(help="The config file (hozon.toml) and the settings in effect.", no_args_is_help=True)

_SOURCES = {click.core.ParameterSource.COMMANDLINE: "command line",
            click.core.ParameterSource.ENVIRONMENT: "environment HOZON_REPO"}


@config_app.command("show")
def show(ctx: typer.Context, repo: str | None = RepoOption) -> None:
    """Print the settings in effect: the repository, the password's source, each command's defaults.

    Each is followed by where it came from: the command line, the environment, a config file, or the
    default. Config files: /etc/hozon/hozon.toml, then ~/.config/hozon/hozon.toml (HOZON_CONFIG: one
    other file instead).
    """
    settings = config.load()
    files = ", ".join(f if os.path.exists(f) else f"{f} (absent)" for f in settings.files)
    _line("config files", files)
    source = ctx.get_parameter_source("repo")
    repo_from = _SOURCES.get(source) if source is not None else None
    if repo_from is None:
        repo_from = settings.origins.get("repo", "not set")
    _line("repo", f"{repo or '-'}  ({repo_from})")
    _line("password", password_origin())
    for key, origin in settings.origins.items():
        if key not in config.GLOBAL_KEYS:
            _line(key, f"{json.dumps(_value(settings.values, key))}  ({origin})")


def _value(values: dict[str, object], key: str) -> object:
    found: object = values
    for part in key.split("."):
        assert isinstance(found, dict)
        found = found[part]
    return found


def _line(name: str, value: str) -> None:
    console.print(Text.assemble((f"{name}: ", "bold"), value), soft_wrap=True)
