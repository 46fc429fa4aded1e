"""The config file: the repository, the password source and each command's defaults, in TOML.

``/etc/hozon/hozon.toml``, then the user's ``hozon.toml`` in the config dir (``~/.config/hozon``,
``$HOZON_CONFIG_DIR``), each key of the later file winning; ``HOZON_CONFIG`` names one file to read
instead of both. The settings become click's ``default_map``, so the environment and flags override
them as they override any default::

    repo = "/srv/backup/repo"
    password_file = "/etc/hozon/password"      # or password_command = "pass show hozon"
    [backup]
    exclude = ["*.tmp", "/home/*/.cache"]
    compression = "max"
    [forget]
    keep_daily = 7
    [vm.backup]                                # a subcommand's table
    compression = "fast"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from typer import _click as click  # typer carries its own copy of click
from typer.core import TyperGroup

from hozon.cli.manual import walk
from hozon.errors import UsageError
from hozon.repo.known import config_dir

SYSTEM_FILE = "/etc/hozon/hozon.toml"
GLOBAL_KEYS = ("repo", "password_file", "password_command")  # for every command that has the option


@dataclass
class Settings:
    """What the config files say, and which file said each top-level key or table entry."""

    files: list[str]  # the files looked for, in the order read
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)  # "backup.exclude" → file


def config_files() -> list[str]:
    named = os.environ.get("HOZON_CONFIG")
    return [named] if named else [SYSTEM_FILE, str(config_dir() / "hozon.toml")]


def load() -> Settings:
    """The merged settings; a file named by HOZON_CONFIG must exist, the usual ones may not."""
    settings = Settings(config_files())
    for path in settings.files:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            if "HOZON_CONFIG" in os.environ:
                raise UsageError(f"the config file {path} (HOZON_CONFIG) does not exist") from None
            continue
        except OSError as exc:
            raise UsageError(f"cannot read the config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"the config file {path} is not valid TOML: {exc}") from exc
        _merge(settings, doc, path, "")
    return settings


def _merge(settings: Settings, doc: dict[str, Any], path: str, prefix: str) -> None:
    target = settings.values
    for part in prefix.split(".")[:-1] if prefix else []:
        target = target.setdefault(part, {})
    for key, value in doc.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            _merge(settings, value, path, f"{prefix}{key}.")
        else:
            target[name] = value
            settings.origins[f"{prefix}{name}"] = path


def default_map(root: click.Command, settings: Settings) -> dict[str, Any]:
    """click's ``default_map`` for ``root``; a setting no command has is an error naming it and its file."""
    result: dict[str, Any] = {}
    used: set[str] = set()
    for name, cmd in walk(root):
        if isinstance(cmd, TyperGroup):  # a group's table holds its subcommands' tables
            continue
        parts = name.split()[1:]
        table: dict[str, Any] = settings.values
        for part in parts:
            table = table.get(part, {}) if isinstance(table.get(part), dict) else {}
        params = _setting_names(cmd)
        defaults = {params[k]: settings.values[k] for k in GLOBAL_KEYS if k in settings.values and k in params}
        for key, value in table.items():
            if isinstance(value, dict):
                continue
            if key not in params:
                raise _unknown(settings, ".".join([*parts, key]))
            defaults[params[key]] = value
            used.add(".".join([*parts, key]))
        if defaults:
            level = result
            for part in parts:
                level = level.setdefault(part, {})
            level.update(defaults)
    for key in settings.origins:
        if key not in used and key not in GLOBAL_KEYS:
            raise _unknown(settings, key)
    return result


def _setting_names(cmd: click.Command) -> dict[str, str]:
    """A setting's name (an option's long name, ``-`` as ``_``: ``keep_daily``, ``json``) → its parameter."""
    names: dict[str, str] = {}
    for param in cmd.params:
        if param.name and getattr(param, "param_type_name", "") == "option":
            names[param.name] = param.name
            for opt in param.opts:
                if opt.startswith("--"):
                    names[opt[2:].replace("-", "_")] = param.name
    return names


def _unknown(settings: Settings, key: str) -> UsageError:
    return UsageError(f"the config file {settings.origins.get(key, settings.files[-1])} sets {key}, which no "
                      "command has", hint="a table per command ([backup], [vm.backup]) holds its options' "
                                          "names (exclude, keep_daily); see hozon config show")
