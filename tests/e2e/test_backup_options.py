"""The backup options operators reach for first: --dry-run, --files-from, --exclude-caches,
--exclude-larger-than, --compression, --workers/--read-concurrency, --nice/--ionice."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.test_damaged_repository import fails_with_one_sentence
from tests.e2e.test_files_options import listed

if TYPE_CHECKING:
    from conftest import Hozon

MakeTree = Callable[[dict[str, bytes | str]], Path]
CACHEDIR_TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag.\n"


def summary(hozon: Hozon, *args: str) -> dict[str, Any]:
    run = hozon("backup", "--json", *args)
    assert "Traceback" not in run.stderr
    doc: dict[str, Any] = json.loads(run.stdout)
    return doc


def repository_files(hozon: Hozon) -> set[str]:
    """Every data, index and snapshot file of the repository (locks come and go)."""
    return {str(p.relative_to(hozon.repo)) for d in ("data", "index", "snapshots")
            for p in (hozon.repo / d).rglob("*") if p.is_file()}


def test_a_dry_run_stores_nothing_and_says_what_would_be_added(hozon: Hozon, make_tree: MakeTree) -> None:
    src = make_tree({"a.txt": "alpha" * 1000, "sub/b.bin": os.urandom(300_000)})
    before = repository_files(hozon)
    doc = summary(hozon, "--dry-run", str(src))
    assert doc["dry_run"] is True and doc["snapshot"]["id"] == ""
    assert doc["snapshot"]["summary"]["files_new"] == 2 and doc["snapshot"]["summary"]["data_added"] >= 300_000
    assert repository_files(hozon) == before  # no pack, no index, no snapshot
    assert "0 snapshot(s)" in hozon("snapshots").stdout
    text = hozon("backup", "--dry-run", str(src)).stdout
    assert "would add to the repository" in text and "no snapshot saved" in text
    real = summary(hozon, str(src))["snapshot"]["summary"]
    assert real["data_added"] == doc["snapshot"]["summary"]["data_added"]  # the dry run told the truth


def test_files_from_lists_paths_with_comments(hozon: Hozon, make_tree: MakeTree, tmp_path: Path) -> None:
    src = make_tree({"one/a": "a", "two/b": "b", "three/c": "c"})
    listing = tmp_path / "list"
    listing.write_text(f"# what to keep\n{src / 'one'}\n\n  {src / 'two'}  \n")
    hozon("backup", "--files-from", str(listing))
    assert listed(hozon, "latest", src) == {"one/", "one/a", "two/", "two/b"}
    listing.write_text(f"{src / 'gone'}\n")
    fails_with_one_sentence(hozon("backup", "--files-from", str(listing), check=False), 2, str(src / "gone"))
    fails_with_one_sentence(hozon("backup", "--files-from", str(tmp_path / "nope"), check=False), 2, "nope")
    fails_with_one_sentence(hozon("backup", check=False), 2, "nothing to back up")


def test_exclude_caches_keeps_the_tag_and_leaves_the_rest_out(hozon: Hozon, make_tree: MakeTree) -> None:
    src = make_tree({"keep.txt": "k", "cache/CACHEDIR.TAG": CACHEDIR_TAG, "cache/blob": "x", "cache/deep/y": "y",
                     "fake/CACHEDIR.TAG": "not the signature\n", "fake/kept": "z"})
    hozon("backup", "--exclude-caches", str(src))
    assert listed(hozon, "latest", src) == {"keep.txt", "cache/", "cache/CACHEDIR.TAG", "fake/",
                                            "fake/CACHEDIR.TAG", "fake/kept"}
    hozon("backup", str(src))  # without the option a cache is an ordinary directory
    assert "cache/deep/y" in listed(hozon, "latest", src)


def test_exclude_larger_than_skips_big_files_silently(hozon: Hozon, make_tree: MakeTree) -> None:
    src = make_tree({"small": b"s" * 1000, "exact": b"e" * 2048, "big": b"b" * 2049})
    run = hozon("backup", "--exclude-larger-than", "2K", str(src))
    assert run.returncode == 0 and "warning" not in run.stderr  # chosen, like an exclude: no warning, exit 0
    assert listed(hozon, "latest", src) == {"small", "exact"}
    fails_with_one_sentence(hozon("backup", "--exclude-larger-than", "lots", str(src), check=False), 2, "lots")


def test_compression_off_and_max_store_what_they_say_and_restore_alike(hozon: Hozon, make_tree: MakeTree,
                                                                        tmp_path: Path) -> None:
    data = b"a compressible line of text\n" * 40_000  # ~1.1 MB
    stored = {}
    for mode in ("off", "max", "fast"):
        src = make_tree({f"{mode}.txt": data + mode.encode()})
        s = summary(hozon, "--compression", mode, str(src / f"{mode}.txt"))["snapshot"]["summary"]
        stored[mode] = s["data_added_stored"]
        hozon("restore", "latest", "--target", str(tmp_path / mode))
        assert (tmp_path / mode / str(src / f"{mode}.txt").lstrip("/")).read_bytes() == data + mode.encode()
    assert stored["off"] > len(data) > 20 * stored["max"]
    assert stored["max"] <= stored["fast"]
    hozon("check", "--read-data")
    fails_with_one_sentence(hozon("backup", "--compression", "best", str(src), check=False), 2, "best")


def test_workers_and_read_concurrency_of_one_still_back_up_everything(hozon: Hozon, make_tree: MakeTree,
                                                                      tmp_path: Path) -> None:
    files = {f"f{i}": os.urandom(100 + i) for i in range(50)} | {"large": os.urandom(3_000_000)}
    src = make_tree(files)
    hozon("backup", "--workers", "1", "--read-concurrency", "1", str(src))
    hozon("restore", "latest", "--target", str(tmp_path / "r"))
    for name, content in files.items():
        assert (tmp_path / "r" / str(src).lstrip("/") / name).read_bytes() == content


def test_nice_and_ionice_are_hozons_own(hozon: Hozon, make_tree: MakeTree, tmp_path: Path) -> None:
    """The password command runs once the priorities are set: it reads them off its parent, Hozon."""
    src = make_tree({"a": "a"})
    seen = tmp_path / "seen"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, subprocess, sys\n"
        "parent = os.getppid()\n"
        "io = subprocess.run(['ionice', '-p', str(parent)], capture_output=True, text=True).stdout.strip()\n"
        f"open({str(seen)!r}, 'w').write(f'{{os.getpriority(os.PRIO_PROCESS, parent)}}\\n{{io}}\\n')\n"
        f"print(os.environ['PROBE_PASSWORD'])\n")
    env = {"HOZON_PASSWORD_COMMAND": f"{sys.executable} {probe}", "PROBE_PASSWORD": hozon.env["HOZON_PASSWORD"]}
    runner = type(hozon)(hozon.repo)
    runner.env.pop("HOZON_PASSWORD")
    runner("backup", "--nice", "10", "--ionice", "idle", str(src), env=env)
    nice, io = seen.read_text().splitlines()
    assert nice == "10" and io == "idle"
    runner("backup", "--ionice", "best-effort:6", str(src), env=env)
    assert seen.read_text().splitlines()[1] == "best-effort: prio 6"
    fails_with_one_sentence(hozon("backup", "--ionice", "fastest", str(src), check=False), 2, "fastest")
    fails_with_one_sentence(hozon("backup", "--nice", "25", str(src), check=False), 2, "0 to 19")


def test_vm_backup_takes_compression_workers_and_priorities(hozon: Hozon, tmp_path: Path) -> None:
    """The images of a shut-off VM (read through qemu-nbd): stored raw with --compression off, small with max."""
    stored = {}
    for mode in ("off", "max"):
        image = tmp_path / f"{mode}.raw"
        image.write_bytes((f"{mode} disk block ".encode() * 70_000)[:1 << 20])
        run = hozon("vm", "backup", "--image", str(image), "--name", mode, "--compression", mode, "--workers", "1",
                    "--nice", "5", "--ionice", "idle", "--json")
        summary = json.loads(run.stdout)["snapshot"]["summary"]
        stored[mode] = summary["data_added_stored"]
        for line in run.stderr.splitlines():  # progress for scripts: JSON lines only
            assert json.loads(line)["message_type"] == "status"
        hozon("vm", "restore", f"latest:{mode}", "--to", str(tmp_path / f"restored-{mode}"), "--format", "raw")
        assert (tmp_path / f"restored-{mode}" / f"{mode}.raw").read_bytes() == image.read_bytes()
    assert stored["off"] > 1 << 20 > 20 * stored["max"]
    quiet = hozon("vm", "backup", "--image", str(tmp_path / "off.raw"), "--name", "off", "-q")
    assert quiet.stdout == ""


def threads_while_backing_up(hozon: Hozon, src: Path, *args: str) -> int:
    """The most threads a running backup had, seen through /proc (Python names none of them there)."""
    proc = hozon.popen("backup", *args, str(src))
    most = 0
    while proc.poll() is None:
        most = max(most, len(list(Path(f"/proc/{proc.pid}/task").glob("*"))))
    assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    return most


def test_workers_bounds_the_threads_that_hash_compress_and_encrypt(hozon: Hozon, make_tree: MakeTree) -> None:
    src = make_tree({"large": os.urandom(96 << 20)})
    counts = {}
    for workers in (1, 4):
        (src / "large").write_bytes(os.urandom(96 << 20))  # new data: every worker is kept busy
        counts[workers] = threads_while_backing_up(hozon, src, "--workers", str(workers))
    assert counts[4] - counts[1] == 3, counts
