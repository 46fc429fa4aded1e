"""File restores that never succeed silently: damaged repositories, an overwrite policy, --dry-run,
--json, targets that cannot work, trees of any depth."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hozon.repo.backends.local import LocalBackend
from hozon.repo.pack import TREE, pack_key
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, now_iso
from hozon.repo.tree import DIR, FILE, Node
from hozon.repo.writer import BlobWriter

if TYPE_CHECKING:
    from conftest import Hozon, Run


def open_repo(hozon: Hozon) -> Repository:
    repo = Repository.open(LocalBackend(hozon.repo), hozon.env["HOZON_PASSWORD"])
    repo.load_index()
    return repo


def file_chunks(repo: Repository, tree: str, prefix: str = "") -> dict[str, list[str]]:
    """Every file of a snapshot tree: its path and its chunk ids."""
    out: dict[str, list[str]] = {}
    for node in repo.load_tree(tree):
        path = f"{prefix}/{node.name}"
        if node.type == DIR and node.subtree:
            out.update(file_chunks(repo, node.subtree, path))
        elif node.type == FILE:
            out[path] = node.content
    return out


def restore(hozon: Hozon, target: Path | str, *args: str) -> Run:
    run = hozon("restore", "latest", "--target", str(target), *args, check=False)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def one_sentence(run: Run, exit_code: int, *words: str) -> None:
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == exit_code, f"exit {run.returncode}:\n{run.stdout}\n{run.stderr}"
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith("hozon: error: ") and len(lines) <= 2, run.stderr
    for word in words:
        assert word in run.stderr, run.stderr


# -- a damaged repository: restore everything readable, name the rest --------------------------------


def test_one_missing_pack_costs_only_the_files_with_chunks_in_it(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = random.Random(7)
    for i in range(200):  # ~56 MiB of incompressible data: several 16 MiB packs; the trees go last
        path = src / "d" / f"f{i:03}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.choice([40_000, 300_000, 600_000])))
    hozon("backup", str(src))

    repo = open_repo(hozon)
    snapshot = repo.resolve_snapshot("latest")
    assert snapshot.tree is not None
    files = file_chunks(repo, snapshot.tree)
    packs: dict[str, set[str]] = {}
    for path, chunks in files.items():
        for chunk in chunks:
            loc = repo.index.lookup(bytes.fromhex(chunk))
            assert loc is not None
            packs.setdefault(loc.pack, set()).add(path)
    tree_packs = {loc.pack for loc in (repo.index.lookup(bytes.fromhex(t)) for t in tree_ids(repo, snapshot.tree))
                  if loc is not None}
    data_only = sorted(p for p in packs if p not in tree_packs)
    assert len(packs) >= 3 and data_only, packs.keys()
    lost = data_only[0]
    (hozon.repo / pack_key(lost)).unlink()
    affected = packs[lost]
    assert 0 < len(affected) < len(files)

    target = tmp_path / "out"
    run = restore(hozon, target)
    assert run.returncode == 3, run.stdout + run.stderr
    for path in files:
        restored = target / path.lstrip("/")
        if path in affected:
            assert f"{path}: " in run.stderr and lost in run.stderr
            assert not restored.exists(), f"{path} is in the target though a chunk of it is lost"
        else:
            assert restored.read_bytes() == Path(path).read_bytes(), path
    warned = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == len(affected)
    assert f"{len(files) - len(affected)} files" in run.stdout
    assert not list(target.rglob(".hozon-restore-*"))


def tree_ids(repo: Repository, tree: str) -> list[str]:
    out = [tree]
    for node in repo.load_tree(tree):
        if node.type == DIR and node.subtree:
            out += tree_ids(repo, node.subtree)
    return out


def test_a_lost_tree_costs_only_its_directory(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel in ("good/a.txt", "bad/b.txt", "top.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    hozon("backup", str(src))
    repo = open_repo(hozon)
    snapshot = repo.resolve_snapshot("latest")
    assert snapshot.tree is not None
    # a new snapshot of the same trees whose directory "bad" points at a tree the repository lacks
    with BlobWriter(repo) as writer:
        def rewrite(tree: str, path: str) -> str:
            nodes = repo.load_tree(tree)
            for node in nodes:
                if node.type == DIR and node.subtree:
                    node.subtree = "ab" * 32 if f"{path}/{node.name}" == f"{src}/bad" else \
                        rewrite(node.subtree, f"{path}/{node.name}")
            return writer.store(json.dumps({"nodes": [n.to_json() for n in nodes]}).encode(), TREE).hex()
        root = rewrite(snapshot.tree, "")
    repo.save_snapshot(Snapshot(time=now_iso(), hostname="h", paths=[str(src)], kind="files", tree=root))

    target = tmp_path / "out"
    run = restore(hozon, target)
    assert run.returncode == 3, run.stderr
    out = target / src.relative_to("/")
    assert (out / "good/a.txt").read_text() == "good/a.txt" and (out / "top.txt").read_text() == "top.txt"
    assert (out / "bad").is_dir() and not list((out / "bad").iterdir())
    assert f"{src}/bad: its contents cannot be read" in run.stderr


# -- the overwrite policy, --dry-run, --json ---------------------------------------------------------


@pytest.fixture
def restored_once(hozon: Hozon, tmp_path: Path) -> tuple[Hozon, Path, Path]:
    """A snapshot of a.txt, b.txt, c.txt restored once to a target; the source and the target."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (src / name).write_text(f"{name} as backed up\n")
        os.utime(src / name, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    hozon("backup", str(src))
    target = tmp_path / "t"
    assert restore(hozon, target).returncode == 0
    return hozon, src, target


def edit(copy: Path) -> dict[str, str]:
    """a: edited now (newer, longer); b: edited, older than the snapshot; c: same size and mtime, other bytes."""
    (copy / "a.txt").write_text("a.txt edited in the target, longer\n")
    (copy / "b.txt").write_text("b.txt edited\n")
    os.utime(copy / "b.txt", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    (copy / "c.txt").write_text("C.TXT AS BACKED UP\n")
    os.utime(copy / "c.txt", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return {n: (copy / n).read_text() for n in ("a.txt", "b.txt", "c.txt")}


@pytest.mark.parametrize(("policy", "replaced"), [
    (None, {"a.txt", "b.txt", "c.txt"}),  # restic's default: always
    ("always", {"a.txt", "b.txt", "c.txt"}),
    ("if-changed", {"a.txt", "b.txt"}),  # c has the snapshot's size and mtime: taken as unchanged
    ("if-newer", {"b.txt"}),  # only b is older than the snapshot
    ("never", set()),
])
def test_overwrite_policy(restored_once: tuple[Hozon, Path, Path], policy: str | None, replaced: set[str]) -> None:
    hozon, src, target = restored_once
    copy = target / src.relative_to("/")
    edited = edit(copy)
    args = ["--overwrite", policy] if policy else []

    dry = restore(hozon, target, "--dry-run", "--json", *args)
    assert dry.returncode == 0, dry.stderr
    assert {n: (copy / n).read_text() for n in edited} == edited  # a dry run writes nothing
    summary = json.loads(dry.stdout)
    assert summary["dry_run"] is True
    assert (summary["overwritten"], summary["skipped"]) == (len(replaced), 3 - len(replaced))
    assert sorted(summary["existing"], key=lambda e: e["path"]) == [
        {"action": "replace" if n in replaced else "keep", "path": str(src / n)} for n in sorted(edited)]
    listing = restore(hozon, target, "--dry-run", *args).stdout
    assert all(f"would {'replace' if n in replaced else 'keep'} {src / n}\n" in listing for n in edited), listing

    run = restore(hozon, target, "--json", *args)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert {k: summary[k] for k in ("files", "overwritten", "skipped", "warnings", "dry_run")} == {
        "files": len(replaced), "overwritten": len(replaced), "skipped": 3 - len(replaced), "warnings": [],
        "dry_run": False}
    assert summary["bytes"] == sum((src / n).stat().st_size for n in replaced)
    for name in edited:
        expected = (src / name).read_text() if name in replaced else edited[name]
        assert (copy / name).read_text() == expected, name


def test_dry_run_of_a_new_target_creates_nothing(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x").write_bytes(b"12345")
    hozon("backup", str(src))
    run = restore(hozon, tmp_path / "new", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "would restore" in run.stdout and "1 files" in run.stdout and "5 B" in run.stdout
    assert not (tmp_path / "new").exists()


# -- targets that cannot work: one sentence, a documented exit code -----------------------------------


def test_targets_that_cannot_work(hozon: Hozon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    hozon("backup", str(src))
    monkeypatch.chdir(tmp_path)

    one_sentence(restore(hozon, "-"), 2, "--target -")
    assert not (tmp_path / "-").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    one_sentence(restore(hozon, a_file), 2, str(a_file), "not a directory")
    one_sentence(restore(hozon, a_file / "below"), 2, "below a file")
    one_sentence(restore(hozon, a_file / "below", "--dry-run"), 2, "below a file")
    one_sentence(restore(hozon, tmp_path / "new", "--overwrite", "sometimes"), 2, "'sometimes'", "if-newer")
    assert not (tmp_path / "new").exists()
    assert a_file.read_text() == "keep me"


def test_a_read_only_target(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    hozon("backup", str(src))
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(ro)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        one_sentence(restore(hozon, ro), 1, str(ro), "read-only")
        one_sentence(restore(hozon, ro / "sub"), 1, str(ro / "sub"), "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


# -- depth -------------------------------------------------------------------------------------------


def test_a_600_deep_tree_restores(hozon: Hozon, tmp_path: Path) -> None:
    """Deeper than Python's recursion allows and longer than PATH_MAX (600 × 11 bytes)."""
    depth = 600
    repo = open_repo(hozon)
    with BlobWriter(repo) as writer:
        def tree(nodes: list[Node]) -> str:
            return writer.store(json.dumps({"nodes": [n.to_json() for n in nodes]}).encode(), TREE).hex()

        data = writer.store(b"at the bottom\n", 0).hex()
        below = tree([Node("leaf.txt", FILE, mode=0o644, size=14, content=[data])])
        for level in reversed(range(depth)):
            below = tree([Node(f"level-{level:04}", DIR, mode=0o755, subtree=below)])
    repo.save_snapshot(Snapshot(time=now_iso(), hostname="h", paths=["/"], kind="files", tree=below))

    run = restore(hozon, tmp_path / "all")
    assert run.returncode == 0, run.stderr
    assert f"1 files, {depth} dirs" in run.stdout
    target = tmp_path / "out"
    run = restore(hozon, target, "--include", "leaf.txt")  # an include found only at the bottom
    assert run.returncode == 0, run.stderr
    assert f"1 files, {depth} dirs" in run.stdout
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):  # walked by descriptor, as no path this long can be opened
            assert os.listdir(fd) == [f"level-{level:04}"]
            next_fd = os.open(f"level-{level:04}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        assert os.listdir(fd) == ["leaf.txt"]
        leaf = os.open("leaf.txt", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 100) == b"at the bottom\n"
        os.close(leaf)
    finally:
        os.close(fd)



def test_a_chunk_in_no_index_costs_its_file_and_every_hard_link_of_it(hozon: Hozon, tmp_path: Path) -> None:
    repo = open_repo(hozon)
    with BlobWriter(repo) as writer:
        good = writer.store(b"fine\n", 0).hex()
        lost = "ab" * 32  # a chunk no index lists
        nodes = [Node("a-lost", FILE, mode=0o644, size=5, content=[lost], inode=7, device=1, links=2),
                 Node("b-link", FILE, mode=0o644, size=5, content=[lost], inode=7, device=1, links=2),
                 Node("c-good", FILE, mode=0o644, size=5, content=[good])]
        root = writer.store(json.dumps({"nodes": [n.to_json() for n in nodes]}).encode(), TREE).hex()
    repo.save_snapshot(Snapshot(time=now_iso(), hostname="h", paths=["/"], kind="files", tree=root))

    target = tmp_path / "out"
    run = restore(hozon, target)
    assert run.returncode == 3, run.stderr
    assert "/a-lost: " in run.stderr and lost[:16] in run.stderr and "not restored" in run.stderr
    assert "/b-link: not restored: it is a hard link of /a-lost" in run.stderr
    assert sorted(os.listdir(target)) == ["c-good"]
    assert (target / "c-good").read_bytes() == b"fine\n"
