"""Running the commands of Hozon's systemd units the way systemd would, without systemd.

A unit's ExecStart/ExecStartPost lines are expanded as systemd does for what the units use:
``%i`` (the instance), ``%H`` (the host name), ``$VAR`` (split into words) and ``${VAR}`` from the
unit's Environment= lines and its EnvironmentFile (given as ``env``, which wins);
``/usr/local/bin/hozon`` becomes this checkout's ``python -m hozon``.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

UNITS = Path(__file__).resolve().parents[1] / "contrib" / "systemd"


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def unit_commands(unit: str, env: dict[str, str], instance: str = "") -> list[list[str]]:
    """ExecStart then ExecStartPost of ``unit``, as argument lists ready to run."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / unit)
    service = parser["Service"]
    env = {**unit_environment(unit), **env}
    commands = []
    for key in ("ExecStart", "ExecStartPost"):
        if key not in service:
            continue
        line = service[key].replace("%i", instance).replace("%H", socket.gethostname())
        words: list[str] = []
        for word in shlex.split(line):
            match = re.fullmatch(r"\$(\w+)", word)
            words += env.get(match[1], "").split() if match else [
                re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word)]
        assert words[0] == "/usr/local/bin/hozon", words
        commands.append([sys.executable, "-m", "hozon", *words[1:]])
    return commands


def unit_environment(unit: str) -> dict[str, str]:
    """The unit's own Environment= assignments."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / unit)
    line = parser["Service"].get("Environment", "")
    return dict(word.partition("=")[::2] for word in shlex.split(line))


def start_unit(unit: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a long-running unit's ExecStart as systemd would (stdout and stderr into ``log``)."""
    (command,) = unit_commands(unit, env)
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **unit_environment(unit), **env})


def success_codes(unit: str) -> set[int]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(UNITS / unit)
    return {0, *(int(c) for c in parser["Service"].get("SuccessExitStatus", "").split())}


def run_unit(unit: str, env: dict[str, str], instance: str = "") -> list[subprocess.CompletedProcess[str]]:
    """Run the unit's commands in order, stopping where systemd would (a code it does not count as success)."""
    done = []
    for command in unit_commands(unit, env, instance):
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=600,
                              stdin=subprocess.DEVNULL)
        done.append(proc)
        if proc.returncode not in success_codes(unit):
            break
    return done
