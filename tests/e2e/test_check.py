"""hozon check: a healthy repository passes; a damaged pack is named with the snapshots and files it costs."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Hozon, Run

MiB = 1024 * 1024


def run(hozon: Hozon, *args: str, expect: int = 0) -> Run:
    result = hozon(*args, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def backup(hozon: Hozon, source: Path) -> str:
    """Back up and return the new snapshot's full id."""
    doc = json.loads(run(hozon, "backup", str(source), "--json").stdout)
    return str(doc["snapshot"]["id"])


def pack_files(hozon: Hozon) -> list[Path]:
    return sorted(p for p in (hozon.repo / "data").rglob("*") if p.is_file())


def pack_holding(hozon: Hozon, blob_type: str = "data") -> tuple[Path, dict[str, Any]]:
    """The pack holding the largest blob of a type, and that blob's header entry."""
    best: tuple[Path, dict[str, Any]] | None = None
    for path in pack_files(hozon):
        for entry in json.loads(run(hozon, "cat", "pack", path.name).stdout):
            if entry["type"] == blob_type and (best is None or entry["length"] > best[1]["length"]):
                best = (path, entry)
    assert best is not None
    return best


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_clean_repository_passes(hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    src = make_tree({"big.bin": os.urandom(3 * MiB), "docs/a.txt": "alpha\n" * 1000, "docs/b.txt": "beta"})
    backup(hozon, src)
    (src / "docs" / "c.txt").write_text("gamma")
    backup(hozon, src)
    out = run(hozon, "check").stdout
    assert out.strip().endswith("no errors were found")
    assert "error:" not in out
    out = run(hozon, "check", "--read-data").stdout
    assert out.strip().endswith("no errors were found")
    assert "read 2 pack(s)" in out
    doc = json.loads(run(hozon, "check", "--read-data", "--json").stdout)
    assert doc["errors"] == [] and doc["notes"] == [] and doc["damaged_packs"] == [] and doc["affected"] == []


def test_a_flipped_bit_in_a_data_blob_is_found_by_read_data(
    hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]
) -> None:
    src = make_tree({"big.bin": os.urandom(3 * MiB), "small.txt": "hello"})
    snapshot = backup(hozon, src)
    pack, entry = pack_holding(hozon, "data")
    flip(pack, entry["offset"] + entry["length"] // 2)

    run(hozon, "check")  # the structure is intact: data blobs are only read with --read-data
    result = run(hozon, "check", "--read-data", expect=1)
    out = result.stdout
    assert pack.name in out
    assert snapshot[:8] in out
    assert str(src / "big.bin") in out
    assert str(src / "small.txt") not in out
    assert "does not authenticate" in out
    assert out.strip().endswith("1 error(s) found")

    doc = json.loads(run(hozon, "check", "--read-data", "--json", expect=1).stdout)
    assert doc["damaged_packs"] == [pack.name]
    assert doc["affected"] == [{"snapshot": snapshot, "paths": [str(src / "big.bin")], "more_paths": 0}]
    assert len(doc["errors"]) == 1 and pack.name in doc["errors"][0]

    out_dir = hozon.repo.parent / "out"
    restored = hozon("restore", "latest", "--target", str(out_dir), check=False)  # all it can, naming the rest
    assert restored.returncode == 3 and "Traceback" not in restored.stderr
    assert pack.name in restored.stderr and f"{src / 'big.bin'}: " in restored.stderr
    assert (out_dir / src.relative_to("/") / "small.txt").read_text() == "hello"
    assert not (out_dir / src.relative_to("/") / "big.bin").exists()


def test_a_flipped_bit_in_a_tree_blob_is_found_without_read_data(
    hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]
) -> None:
    src = make_tree({"a/b/file.txt": "deep", "top.txt": "top"})
    snapshot = backup(hozon, src)
    pack, entry = pack_holding(hozon, "tree")
    flip(pack, entry["offset"] + entry["length"] // 2)
    out = run(hozon, "check", expect=1).stdout
    assert pack.name in out and snapshot[:8] in out and "tree blob" in out


def test_a_truncated_pack_is_named(hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    src = make_tree({"big.bin": os.urandom(2 * MiB), "small.txt": "hello"})
    snapshot = backup(hozon, src)
    (pack,) = pack_files(hozon)
    pack.write_bytes(pack.read_bytes()[: pack.stat().st_size // 2])
    out = run(hozon, "check", "--read-data", expect=1).stdout
    assert pack.name in out and "truncated" in out and snapshot[:8] in out
    doc = json.loads(run(hozon, "check", "--read-data", "--json", expect=1).stdout)
    assert doc["damaged_packs"] == [pack.name]
    assert [a["snapshot"] for a in doc["affected"]] == [snapshot]


def test_a_missing_pack_is_an_error_naming_the_snapshots_it_costs(
    hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]
) -> None:
    src = make_tree({"one.txt": "one"})
    first = backup(hozon, src)
    (pack,) = pack_files(hozon)
    (src / "two.bin").write_bytes(os.urandom(100_000))
    second = backup(hozon, src)  # one.txt's chunk is shared: losing the first pack costs both snapshots
    pack.unlink()
    out = run(hozon, "check", expect=1).stdout
    (error,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert pack.name in error and "missing" in error
    assert first[:8] in error and second[:8] in error
    assert str(src / "one.txt") in error
    doc = json.loads(run(hozon, "check", "--json", expect=1).stdout)
    assert doc["missing_packs"] == [pack.name]
    assert {a["snapshot"] for a in doc["affected"]} == {first, second}


def test_packs_left_by_a_killed_backup_are_a_note(
    hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]
) -> None:
    src = make_tree({f"f{i}.bin": os.urandom(8 * MiB) for i in range(8)})
    proc = hozon.popen("backup", str(src))
    deadline = time.monotonic() + 60
    while not pack_files(hozon) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    index_files = list((hozon.repo / "index").glob("*"))
    out = run(hozon, "check").stdout  # kill -9 at any instant leaves a repository that passes
    if pack_files(hozon) and not index_files:
        assert "unreferenced pack(s), left by an interrupted backup; `hozon prune` removes them" in out
    run(hozon, "check", "--read-data")
    backup(hozon, src)  # the next backup simply continues
    run(hozon, "check", "--read-data")


def test_a_stray_pack_is_a_note_not_an_error(hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    backup(hozon, make_tree({"a.txt": "a"}))
    (hozon.repo / "data" / "ff").mkdir(exist_ok=True)
    (hozon.repo / "data" / "ff" / ("ff" * 32)).write_bytes(b"half a pack")
    out = run(hozon, "check", "--read-data").stdout
    assert "note: 1 unreferenced pack(s)" in out
    assert out.strip().endswith("no errors were found")
    doc = json.loads(run(hozon, "check", "--json").stdout)
    assert doc["errors"] == [] and len(doc["notes"]) == 1
