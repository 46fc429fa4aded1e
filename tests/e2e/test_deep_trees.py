"""Deep directory trees: backup, ls and diff walk them without recursion, past PATH_MAX too.

The trees are made one level at a time through directory descriptors (``mkdir`` relative to the
parent's descriptor), as a full path of thousands of levels is longer than any system call takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Hozon

_DIR = os.O_RDONLY | os.O_DIRECTORY


def make_deep(root: Path, depth: int, files_every: int = 1) -> str:
    """``depth`` nested directories ``d`` below ``root``, a file ``f`` in every ``files_every``-th; the
    deepest directory's path (as text: too long to open)."""
    root.mkdir()
    fd = os.open(root, _DIR)
    try:
        for level in range(1, depth + 1):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", _DIR, dir_fd=fd)
            os.close(fd)
            fd = below
            if level % files_every == 0 or level == depth:
                _write(fd, "f", f"level {level}\n".encode())
    finally:
        os.close(fd)
    return str(root) + "/d" * depth


def _write(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _deepest(root: Path) -> Iterator[int]:
    """Walk down the ``d`` chain below ``root``; yields the descriptor of the deepest directory, then closes all."""
    fds = [os.open(root, _DIR)]
    try:
        while os.path.isdir(f"/proc/self/fd/{fds[-1]}/d"):
            fds.append(os.open("d", _DIR, dir_fd=fds[-1]))
        yield fds[-1]
    finally:
        for fd in fds:
            os.close(fd)


def remove_deep(root: Path) -> None:
    """``shutil.rmtree`` recurses (and fails) at these depths: remove the chain bottom up, by descriptors."""
    fds = [os.open(root, _DIR)]
    while os.path.isdir(f"/proc/self/fd/{fds[-1]}/d"):
        fds.append(os.open("d", _DIR, dir_fd=fds[-1]))
    while fds:
        fd = fds.pop()
        for name in os.listdir(fd):
            if name != "d":
                os.unlink(name, dir_fd=fd)
        os.close(fd)
        if fds:
            os.rmdir("d", dir_fd=fds[-1])
    os.rmdir(root)


@pytest.fixture
def deep_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "deep"
    yield root
    if root.exists():
        remove_deep(root)


def _ls(hozon: Hozon, path: str = "/") -> dict[str, dict[str, object]]:
    run = hozon("ls", "latest", path, "--json", check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    return {e["path"]: e for e in json.loads(run.stdout)}


def _diff(hozon: Hozon, first: str, second: str, below: Path) -> list[dict[str, str]]:
    """The changes below ``below`` (the levels above it are other tests' business)."""
    run = hozon("diff", first, second, "--json", check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    return [c for c in json.loads(run.stdout) if c["path"].startswith(f"{below}/")]


def test_backup_ls_and_diff_of_a_600_level_tree(hozon: Hozon, deep_root: Path) -> None:
    bottom = make_deep(deep_root, 600)
    run = hozon("backup", str(deep_root), check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    listed = _ls(hozon, str(deep_root))
    assert len([p for p in listed if p.endswith("/f")]) == 600
    assert listed[f"{bottom}/f"]["size"] == len(b"level 600\n")

    for fd in _deepest(deep_root):
        _write(fd, "f", b"changed at the bottom\n")
    hozon("backup", str(deep_root))
    first, second = (s["id"] for s in json.loads(hozon("snapshots", "--json").stdout))
    assert _diff(hozon, first, second, deep_root) == [{"change": "M", "path": f"{bottom}/f"}]


def test_a_tree_deeper_than_path_max(hozon: Hozon, deep_root: Path) -> None:
    bottom = make_deep(deep_root, 3000, files_every=500)
    assert len(bottom) > 4096  # no system call takes this path whole
    run = hozon("backup", str(deep_root), check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr[-2000:]
    listed = _ls(hozon)
    assert listed[f"{bottom}/f"]["size"] == len(b"level 3000\n")
    assert len([p for p in listed if p.endswith("/f")]) == 6

    for fd in _deepest(deep_root):
        _write(fd, "new", b"")
    hozon("backup", str(deep_root))
    first, second = (s["id"] for s in json.loads(hozon("snapshots", "--json").stdout))
    assert _diff(hozon, first, second, deep_root) == [{"change": "U", "path": f"{bottom}/"},
                                                      {"change": "+", "path": f"{bottom}/new"}]


@pytest.mark.skipif(not os.path.exists("/usr/bin/prlimit"), reason="needs prlimit (util-linux)")
def test_deeper_than_the_open_file_limit_warns_per_entry(hozon: Hozon, deep_root: Path) -> None:
    """The walk holds one descriptor per level; past the process's limit, what is below is named, not a crash."""
    make_deep(deep_root, 400)
    proc = subprocess.run(["prlimit", "--nofile=150:150", sys.executable, "-m", "hozon", "backup", str(deep_root)],
                          capture_output=True, text=True, env=hozon.env, timeout=300, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert warned and all(w.endswith(": Too many open files") for w in warned), warned
    listed = _ls(hozon, str(deep_root))
    assert len([p for p in listed if p.endswith("/f")]) > 100
