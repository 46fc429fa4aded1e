"""DirChain: directories opened relative to each other, a bounded number of descriptors, any depth."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hozon.restore.safe_fs import DirChain


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_deep_chain_keeps_few_descriptors_and_finds_every_directory(tmp_path: Path) -> None:
    depth = 3 * DirChain.MAX_OPEN
    parts = [f"d{i}" for i in range(depth)]
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    chain = DirChain(root_fd)
    before = open_fds()
    try:
        deepest = chain.open(parts, create=True)
        assert open_fds() - before <= DirChain.MAX_OPEN
        (Path(f"/proc/self/fd/{deepest}") / "leaf").write_text("x")
        # back up near the top (the closed descriptors are opened again), then down another branch
        shallow = chain.open(parts[:3])
        assert os.fstat(shallow).st_ino == (tmp_path / "d0" / "d1" / "d2").stat().st_ino
        side = chain.open([*parts[:5], "side"], create=True)
        assert os.fstat(side).st_ino == (tmp_path / "d0/d1/d2/d3/d4/side").stat().st_ino
        again = chain.open(parts)
        assert "leaf" in os.listdir(again)
        assert open_fds() - before <= DirChain.MAX_OPEN
        assert chain.open([]) == root_fd
    finally:
        chain.close()
        os.close(root_fd)
    assert open_fds() == before - 1


def test_a_symlink_on_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    chain = DirChain(root_fd)
    try:
        with pytest.raises(OSError):
            chain.open(["link"])
        with pytest.raises(OSError):
            chain.open(["missing", "below"])
        assert chain.open(["real"]) >= 0
    finally:
        chain.close()
        os.close(root_fd)
