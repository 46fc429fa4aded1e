"""A hostile repository cannot make ``hozon restore`` write outside its target.

The snapshots here are crafted with the Python API (as someone with the repository key could):
names that climb out ('..', '../../etc/x', 'a/b', absolute paths), a symlink followed by a
directory of the same name, and a target that already holds symlinks pointing outside. The real
``hozon restore`` must refuse or neutralise each, say so, and leave everything outside untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hozon.repo.backends.local import LocalBackend
from hozon.repo.pack import DATA, TREE
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, now_iso
from hozon.repo.writer import BlobWriter

if TYPE_CHECKING:
    from conftest import Hozon

EVIL = b"written by a hostile snapshot\n"


def state_of(root: Path) -> dict[str, bytes | str | None]:
    """Every entry below ``root``: file bytes, link target, or None for a directory."""
    out: dict[str, bytes | str | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = None
            else:
                out[rel] = path.read_bytes()
    return out


class Crafter:
    """Writes blobs, raw tree JSON (any names, any order, duplicates) and snapshots into a repository."""

    def __init__(self, hozon: Hozon) -> None:
        self.repo = Repository.open(LocalBackend(hozon.repo), hozon.env["HOZON_PASSWORD"])
        self.repo.load_index()
        self.writer = BlobWriter(self.repo)

    def data(self, content: bytes) -> list[str]:
        return [self.writer.store(content, DATA).hex()]

    def file(self, name: str, content: bytes = EVIL, **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": "file", "mode": 0o644, "size": len(content), "content": self.data(content),
                **extra}

    def dir(self, name: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
        return {"name": name, "type": "dir", "mode": 0o755, "subtree": self.tree(nodes)}

    def symlink(self, name: str, target: str) -> dict[str, Any]:
        return {"name": name, "type": "symlink", "mode": 0o777, "target": target}

    def tree(self, nodes: list[dict[str, Any]]) -> str:
        raw = json.dumps({"nodes": nodes}, separators=(",", ":")).encode()  # unsorted, unchecked: as given
        return self.writer.store(raw, TREE).hex()

    def snapshot(self, root_nodes: list[dict[str, Any]]) -> str:
        root = self.tree(root_nodes)
        self.writer.close()
        snap = Snapshot(time=now_iso(), hostname="mallory", paths=["/"], kind="files", tree=root)
        return self.repo.save_snapshot(snap)


def restore(hozon: Hozon, snapshot_id: str, target: Path) -> tuple[int, list[str]]:
    run = hozon("restore", snapshot_id, "--target", str(target), check=False)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode in (1, 3), run.stdout + run.stderr
    return run.returncode, [line for line in run.stderr.splitlines() if line.strip()]


def test_names_that_climb_out_are_refused(hozon: Hozon, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original\n")
    before_outside = state_of(outside)
    before_top = sorted(os.listdir(tmp_path))

    c = Crafter(hozon)
    snapshot_id = c.snapshot([
        c.file(".."),
        c.dir("..", [c.file("pwned"), c.dir("outside", [c.file("victim")])]),
        c.file("../outside/victim"),
        c.file("../../etc/x"),
        c.file("a/b"),
        c.file(str(outside / "victim")),
        c.dir(str(outside), [c.file("abs_pwned")]),
        c.file("."),
        c.dir(".", [c.file("dot_pwned")]),
        c.file(""),
        c.file("nul\x00byte"),
        c.dir("ok", [c.file("fine.txt", b"a harmless file\n"), c.file("../../outside/victim")]),
    ])
    target = tmp_path / "target"
    code, messages = restore(hozon, snapshot_id, target)

    assert state_of(outside) == before_outside
    assert set(os.listdir(tmp_path)) == {*before_top, "target"}
    assert not (tmp_path.parent / "etc").exists()
    assert not Path("/etc/x").exists()
    # The harmless part is restored; every hostile name is named in a warning.
    assert state_of(target) == {"ok": None, "ok/fine.txt": b"a harmless file\n"}
    text = "\n".join(messages)
    for name in ("'..'", "'../outside/victim'", "'../../etc/x'", "'a/b'", repr(str(outside / "victim")), "'.'",
                 "'nul\\x00byte'", "'../../outside/victim'"):
        assert name in text, f"no warning names {name}:\n{text}"
    assert code == 3


def test_symlinks_never_lead_a_write_outside(hozon: Hozon, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original\n")
    before_outside = state_of(outside)

    c = Crafter(hozon)
    snapshot_id = c.snapshot([
        # A symlink pointing outside, then a directory of the same name holding a file.
        c.symlink("evil", str(outside)),
        c.dir("evil", [c.file("through_symlink"), c.file("victim")]),
        # The other order: the directory first, then a symlink that would replace it.
        c.dir("evil2", [c.file("inside")]),
        c.symlink("evil2", str(outside)),
        # A relative symlink that climbs out, with a file "below" it in a same-named directory.
        c.symlink("up", "../outside"),
        c.dir("up", [c.file("victim")]),
        # Names the target already holds as symlinks pointing outside (see below).
        c.dir("preexisting_dir", [c.file("victim"), c.file("new_file")]),
        c.file("preexisting_file"),
        # Hard links: the second name must link to what the restore wrote, not to a symlink.
        c.file("h1", links=2, inode=4242, device=7),
        c.symlink("h1", str(outside / "victim")),
        c.file("h2", links=2, inode=4242, device=7),
        c.symlink("kept_link", str(outside / "victim")),  # a symlink itself is fine to restore
    ])
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(outside, target / "preexisting_dir")
    os.symlink(outside / "victim", target / "preexisting_file")

    _code, messages = restore(hozon, snapshot_id, target)
    text = "\n".join(messages)

    assert state_of(outside) == before_outside, text
    after = state_of(target)
    # Nothing below the target is a path through a symlink; files the restore wrote are its own.
    for rel in after:
        parent = (target / rel).parent
        assert not any(p.is_symlink() for p in [parent, *parent.parents] if target in p.parents), rel
    assert after["preexisting_dir"] is None  # the old symlink was replaced by a real directory
    assert after["preexisting_dir/new_file"] == EVIL
    assert after["preexisting_file"] == EVIL
    assert after["kept_link"] == f"-> {outside / 'victim'}"
    for name in ("/evil'", "/evil2'", "/up'", "/h1'"):
        assert name in text and "second entry" in text, f"no warning names {name}:\n{text}"
    assert after["evil"] == f"-> {outside}"  # the first entry of each name won
    assert after["evil2"] is None and after["evil2/inside"] == EVIL
    assert after["h1"] == after["h2"] == EVIL
    assert os.stat(target / "h1").st_ino == os.stat(target / "h2").st_ino


def test_malformed_entries_cost_only_themselves(hozon: Hozon, tmp_path: Path) -> None:
    """Well-typed but hostile values; a field of the wrong JSON type makes the whole tree damaged
    (tests/e2e/test_documents.py)."""
    c = Crafter(hozon)
    snapshot_id = c.snapshot([
        c.file("good.txt", b"restored in spite of its neighbours\n"),
        c.symlink("nul_target", "/etc\x00passwd"),
        c.file("nul_xattr", xattrs={"user.a\x00b": "eA=="}),
        {"name": "huge_rdev", "type": "chardev", "mode": 0o600, "rdev": 2**70},
        c.file("negative_uid", uid=-7),
        c.file("far_extent", extents=[[2**63, len(EVIL)]], size=2**63 + 100),  # beyond off_t on any file system
        {"name": "strange_type", "type": "portal"},
    ])
    target = tmp_path / "target"
    code, messages = restore(hozon, snapshot_id, target)
    assert code == 3
    assert (target / "good.txt").read_bytes() == b"restored in spite of its neighbours\n"
    text = "\n".join(messages)
    for name in ("nul_target", "nul_xattr", "huge_rdev", "negative_uid", "far_extent", "strange_type"):
        assert any(name in line for line in messages), f"no warning names {name}:\n{text}"
