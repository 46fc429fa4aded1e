"""Repositories written by format version 1 stay readable (tests/data/repo-v1 was made by Hozon 0.1.0).

Never regenerate that repository: it is the proof that today's code reads yesterday's bytes.
It holds two snapshots of /tmp/compat/src (host compat-host, tag v1); the second one has a line
appended to docs/text.txt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tests.conftest import Hozon

DATA = Path(__file__).resolve().parents[1] / "data" / "repo-v1"
FIRST = "8a9723c65024574050fc134c5db88b4229bb95ff79592cc1edfb850ea9822e2d"
SECOND = "b7e6dd7d91e11e1c9f0ac7e54ec80c983e2437ad4386803b270b1b70395455d3"
SHA256 = {
    "docs/random.bin": "efff47644a4494e0be421d1e8c384448b3cd70f9211515690fa46a73f5e0bfd1",
    "docs/text.txt": "66add206e55de1346988c94fe1e34f6bbee354a4eed7f45400221c8d73b1fb5b",
    "hello.txt": "9f4a2b7f76354735096c4473e2851d7f3a4312691c1ea49356ba61ad0c4a8eea",
}


def _copy(tmp_path: Path) -> Hozon:
    repo = tmp_path / "repo-v1"
    shutil.copytree(DATA, repo)  # locks are written while reading: never touch tests/data itself
    return Hozon(repo, password="hozon-compat")


def test_version_1_repository_lists_checks_and_restores(tmp_path: Path) -> None:
    hozon = _copy(tmp_path)
    snaps = json.loads(hozon("snapshots", "--json").stdout)
    assert [s["id"] for s in snaps] == [FIRST, SECOND]
    assert all(s["hostname"] == "compat-host" and s["tags"] == ["v1"] and s["kind"] == "files" for s in snaps)
    assert snaps[1]["parent"] == FIRST

    assert "no errors were found" in hozon("check", "--read-data").stdout

    hozon("restore", FIRST[:8], "--target", str(tmp_path / "out"))
    root = tmp_path / "out" / "tmp" / "compat" / "src"
    for rel, digest in SHA256.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel
    assert os.readlink(root / "link") == "hello.txt"
    assert (root / "empty").is_dir() and not any((root / "empty").iterdir())
    st = (root / "hello.txt").stat()
    assert st.st_mode & 0o777 == 0o640
    assert st.st_mtime_ns == 1577934245123456789

    hozon("restore", SECOND[:8], "--target", str(tmp_path / "out2"))
    text = (tmp_path / "out2" / "tmp" / "compat" / "src" / "docs" / "text.txt").read_bytes()
    assert text.endswith(b"extra\n")
    assert hashlib.sha256(text).hexdigest() == "3a4c4321096548b584b34ec7b04415ad305f24fafdc69b747ac3125c6cc6252b"
