"""Output for people and scripts: --json progress lines on stderr, -q, -v, and binary units."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Hozon

MakeTree = Callable[[dict[str, bytes | str]], Path]
STATUS_KEYS = {"message_type", "percent_done", "total_files", "files_done", "total_bytes", "bytes_done",
               "current_files"}


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line parsed: each one must be a JSON object."""
    docs = [json.loads(line) for line in stderr.splitlines()]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def test_backup_json_prints_status_lines_on_stderr_and_one_document_on_stdout(hozon: Hozon,
                                                                               make_tree: MakeTree) -> None:
    src = make_tree({f"d{i}/f{j}": os.urandom(2000) for i in range(10) for j in range(20)})
    run = hozon("backup", "--json", str(src))
    lines = json_lines(run.stderr)
    statuses = [d for d in lines if d["message_type"] == "status"]
    assert statuses and all(set(d) == STATUS_KEYS for d in statuses)
    assert all(0.0 <= d["percent_done"] <= 1.0 and isinstance(d["current_files"], list) for d in statuses)
    assert json.loads(run.stdout)["snapshot"]["summary"]["files_new"] == 200


def test_backup_json_reports_a_warning_as_an_error_line(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "readable.txt").write_bytes(b"root reads this")
    unreadable = src / "drop_caches"
    unreadable.write_bytes(b"")
    mounted = subprocess.run(["mount", "--bind", "/proc/sys/vm/drop_caches", str(unreadable)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount a /proc/sys file here: {mounted.stderr.strip()}")
    try:
        run = hozon("backup", "--json", str(src), check=False)
        assert run.returncode == 3
        errors = [d for d in json_lines(run.stderr) if d["message_type"] == "error"]
        assert errors == [{"message_type": "error", "error": {"message": f"{unreadable}: Permission denied"},
                           "during": "backup"}]
        assert json.loads(run.stdout)["warnings"] == [f"{unreadable}: Permission denied"]
        quiet = hozon("backup", "-q", str(src), check=False)
        assert quiet.returncode == 3 and quiet.stdout == ""
        assert f"warning: {unreadable}: Permission denied" in quiet.stderr.splitlines()
    finally:
        subprocess.run(["umount", str(unreadable)], check=True)


def test_quiet_prints_nothing_and_verbose_names_each_file(hozon: Hozon, make_tree: MakeTree, tmp_path: Path) -> None:
    src = make_tree({"a.txt": "a", "sub/b.txt": "b"})
    quiet = hozon("backup", "-q", str(src))
    assert quiet.stdout == "" and quiet.stderr == ""
    (src / "a.txt").write_text("changed")
    verbose = hozon("backup", "-v", str(src)).stdout.splitlines()
    assert f"changed    {src / 'a.txt'}" in verbose and f"unmodified {src / 'sub' / 'b.txt'}" in verbose
    (src / "c.txt").write_text("c")
    assert f"new        {src / 'c.txt'}" in hozon("backup", "--verbose", str(src)).stdout.splitlines()
    restored = hozon("restore", "latest", "--target", str(tmp_path / "r"), "-v").stdout.splitlines()
    assert {f"restored {src / n}" for n in ("a.txt", "c.txt", "sub/b.txt")} <= set(restored)
    assert hozon("restore", "latest", "--target", str(tmp_path / "q"), "-q").stdout == ""
    run = hozon("restore", "latest", "--target", str(tmp_path / "j"), "--json")
    assert all(d["message_type"] == "status" and set(d) == STATUS_KEYS for d in json_lines(run.stderr))
    assert json.loads(run.stdout)["files"] == 3


def test_restore_progress_on_a_terminal_counts_in_binary_units(hozon: Hozon, make_tree: MakeTree,
                                                               tmp_path: Path) -> None:
    src = make_tree({f"f{i}": os.urandom(4 << 20) for i in range(12)})
    hozon("backup", str(src))
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hozon", "restore", "latest", "--target", str(tmp_path / "r")],
                            env={**hozon.env, "COLUMNS": "200", "TERM": "xterm-256color"},  # a terminal that draws
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end closed: the command is done
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(120) == 0
    os.close(leader)
    text = shown.decode(errors="replace")
    assert "MiB" in text and " MB" not in text, text[-2000:]
