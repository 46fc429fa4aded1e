"""The local backend's durability: a committed name survives a power cut only if its directory is synced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hozon.repo.backends.local import LocalBackend


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """What the backend does, in order: ("link", new name), ("mkdir", dir), ("unlink", name), ("fsync", path)."""
    seen: list[tuple[str, Path]] = []
    real_fsync, real_link, real_mkdir, real_unlink = os.fsync, os.link, Path.mkdir, Path.unlink

    def fsync(fd: int) -> None:
        real_fsync(fd)
        seen.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))

    def link(src: str | Path, dst: str | Path) -> None:
        real_link(src, dst)
        seen.append(("link", Path(dst)))

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]
        seen.append(("mkdir", self))

    def unlink(self: Path, *args: object, **kwargs: object) -> None:
        real_unlink(self, *args, **kwargs)  # type: ignore[arg-type]
        seen.append(("unlink", self))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(Path, "unlink", unlink)
    return seen


def _synced_after(events: list[tuple[str, Path]], what: str, path: Path, directory: Path) -> bool:
    start = events.index((what, path))
    return ("fsync", directory) in events[start + 1:]


def test_put_syncs_the_directory_after_the_link_and_every_directory_it_creates(
        tmp_path: Path, events: list[tuple[str, Path]]) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.put("data/ab/ab12", b"pack")
    root = tmp_path / "repo"
    assert (root / "data/ab/ab12").read_bytes() == b"pack"
    assert _synced_after(events, "link", root / "data/ab/ab12", root / "data/ab")
    for new_dir in (root, root / "data", root / "data/ab", root / "tmp"):
        assert _synced_after(events, "mkdir", new_dir, new_dir.parent), new_dir

    events.clear()
    backend.put("snapshots/cd34", b"snapshot")  # into existing directories: the link is still synced
    assert _synced_after(events, "link", root / "snapshots/cd34", root / "snapshots")


def test_delete_syncs_the_directory(tmp_path: Path, events: list[tuple[str, Path]]) -> None:
    backend = LocalBackend(tmp_path / "repo")
    backend.put("index/ef56", b"index")
    events.clear()
    backend.delete("index/ef56")
    assert _synced_after(events, "unlink", tmp_path / "repo/index/ef56", tmp_path / "repo/index")
