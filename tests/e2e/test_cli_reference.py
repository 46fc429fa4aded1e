"""The command line as users meet it: help text with names (not Python types), docs/cli.md in step
with --help, man pages, shell completion that completes, -h and --version."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def hozon(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "hozon", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_docs_cli_md_is_the_commands_own_help() -> None:
    generated = hozon("generate", "--markdown", "-")
    assert (ROOT / "docs" / "cli.md").read_text() == generated, \
        "docs/cli.md is stale: run hozon generate --markdown docs/cli.md"


def test_help_names_values_and_never_shows_python_types() -> None:
    reference = hozon("generate", "--markdown", "-")
    assert "## hozon vm checkpoint restore" in reference  # every level of the tree is there
    types = re.findall(r"<(?:str|int|bool|float|list|path|Path)[^>]*>", reference)
    assert types == [], f"--help shows Python types: {sorted(set(types))}"
    backup = hozon("backup", "-h")
    assert "Usage: hozon backup [OPTIONS] [PATH...]" in backup  # or --files-from FILE
    assert re.search(r"--tag TAG\s", backup)
    assert hozon("--version").strip() == hozon("version").strip()


def test_man_pages_cover_every_command(tmp_path: Path) -> None:
    hozon("generate", "--man", str(tmp_path))
    pages = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert {"hozon.1", "hozon-backup.1", "hozon-vm-backup.1", "hozon-vm-checkpoint-restore.1"} <= set(pages)
    backup = pages["hozon-backup.1"]
    assert backup.startswith('.TH "HOZON-BACKUP" 1') and ".SH OPTIONS" in backup and "\\-\\-exclude" in backup
    if shutil.which("man"):  # render it as a reader would (man-db is not on a minimal Debian)
        shown = subprocess.run(["man", "-l", str(tmp_path / "hozon-backup.1")], capture_output=True, text=True,
                               env={**os.environ, "MANWIDTH": "100"}, timeout=60).stdout
        assert "hozon backup [OPTIONS] [PATH...]" in shown


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_name_the_completion_variable(shell: str) -> None:
    script = hozon("generate", f"--{shell}-completion", "-")
    assert "_HOZON_COMPLETE=complete_" in script and "hozon" in script


def test_bash_completes_commands_and_options(tmp_path: Path) -> None:
    script = tmp_path / "hozon.bash"
    hozon("generate", "--bash-completion", str(script))
    shim = tmp_path / "bin" / "hozon"  # the script runs `hozon`: this checkout's, through this Python
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m hozon \"$@\"\n")
    shim.chmod(0o755)

    def complete(*words: str) -> list[str]:
        cword = len(words) - 1
        line = " ".join(f"'{w}'" for w in words)
        out = subprocess.run(
            ["bash", "-c", f"source {script}; COMP_WORDS=({line}); COMP_CWORD={cword}; _hozon_completion hozon; "
                           'printf "%s\\n" "${COMPREPLY[@]}"'],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"}).stdout
        return out.split()

    assert "backup" in complete("hozon", "ba")
    assert {"--exclude", "--exclude-file"} <= set(complete("hozon", "backup", "--exc"))
    assert {"backup", "restore", "checkpoint"} <= set(complete("hozon", "vm", ""))
