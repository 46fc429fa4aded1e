"""Shared fixtures: a real ``hozon`` process against a real repository in a temp directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "correct horse battery staple"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


class Hozon:
    """Runs ``python -m hozon`` with a repository and password in its environment."""

    def __init__(self, repo: Path, password: str = PASSWORD) -> None:
        self.repo = repo
        self.env = {**os.environ, "HOZON_REPO": str(repo), "HOZON_PASSWORD": password}
        self.env.pop("HOZON_PASSWORD_FILE", None)

    def __call__(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
                 timeout: float = 300) -> Run:
        proc = subprocess.run(
            [sys.executable, "-m", "hozon", *args], capture_output=True, text=True,
            env={**self.env, **(env or {})}, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        result = Run(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"hozon {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "hozon", *args], env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


@pytest.fixture(autouse=True)
def client_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hozon's client records (repo.known) of this test, kept out of the real home."""
    path = tmp_path_factory.mktemp("hozon-config")
    monkeypatch.setenv("HOZON_CONFIG_DIR", str(path))
    return path


@pytest.fixture
def hozon(tmp_path: Path) -> Hozon:
    """A fresh, initialised, encrypted repository at tmp_path/repo and a runner for it."""
    h = Hozon(tmp_path / "repo")
    h("init")
    return h


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[[dict[str, bytes | str]], Path]:
    """Create files from {relative path: content} under tmp_path/src and return that directory."""

    def make(files: dict[str, bytes | str]) -> Path:
        root = tmp_path / "src"
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        return root

    return make


def tree_digest(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry below root: (type, mode bits, content or link target), for comparing trees."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, b"")
            elif p.is_file():
                out[rel] = ("file", st.st_mode & 0o7777, p.read_bytes())
            else:
                out[rel] = ("other", st.st_mode, b"")
    return out
