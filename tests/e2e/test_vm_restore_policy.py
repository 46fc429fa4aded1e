"""hozon vm restore over images already there: refused by default, or as --overwrite says; --dry-run, --json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Hozon, Run

MiB = 1 << 20


@pytest.fixture
def image_snapshot(hozon: Hozon, tmp_path: Path) -> tuple[Hozon, bytes]:
    """A snapshot of a shut-off VM's 8 MiB raw disk (one MiB of data); the disk's bytes."""
    disk = tmp_path / "vda.img"
    content = bytes(MiB) + os.urandom(MiB) + bytes(6 * MiB)
    disk.write_bytes(content)
    hozon("vm", "backup", "--image", str(disk), "--name", "off")
    return hozon, content


def vm_restore(hozon: Hozon, out: Path | str, *args: str) -> Run:
    run = hozon("vm", "restore", "latest:off", "--to", str(out), "--format", "raw", *args, check=False)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def test_an_image_already_there_is_refused_unless_overwrite_says(image_snapshot: tuple[Hozon, bytes],
                                                                 tmp_path: Path) -> None:
    hozon, content = image_snapshot
    out = tmp_path / "out"
    assert vm_restore(hozon, out).returncode == 0
    image = out / "vda.raw"
    assert image.read_bytes() == content
    image.write_bytes(b"edited by the operator")

    run = vm_restore(hozon, out)  # the safe default
    assert run.returncode == 1 and "vda.raw exists" in run.stderr and "--overwrite" in run.stderr
    run = vm_restore(hozon, out, "--overwrite", "never")
    assert run.returncode == 0 and "left as it is" in run.stdout
    os.utime(image, (2_000_000_000, 2_000_000_000))  # newer than the snapshot
    run = vm_restore(hozon, out, "--overwrite", "if-newer", "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["skipped"] == 1
    assert image.read_bytes() == b"edited by the operator"

    run = vm_restore(hozon, out, "--overwrite", "always", "--dry-run", "--json")
    assert run.returncode == 0
    summary = json.loads(run.stdout)
    assert summary["dry_run"] is True and summary["overwritten"] == 1 and summary["disks"][0]["action"] == "replaced"
    assert image.read_bytes() == b"edited by the operator"  # a dry run writes nothing

    os.utime(image, (1_000_000_000, 1_000_000_000))  # older than the snapshot
    run = vm_restore(hozon, out, "--overwrite", "if-newer", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["overwritten"], summary["skipped"], summary["bytes"]) == (1, 0, MiB)
    assert image.read_bytes() == content
    assert sorted(p.name for p in out.iterdir()) == sorted(["vda.raw", f"{summary['snapshot'][:8]}.json"])


def test_dry_run_into_a_new_directory_writes_nothing(image_snapshot: tuple[Hozon, bytes], tmp_path: Path) -> None:
    hozon, _ = image_snapshot
    run = vm_restore(hozon, tmp_path / "new", "--dry-run")
    assert run.returncode == 0 and "would write" in run.stdout
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(("args", "words"), [
    (["--overwrite", "if-changed"], "if-changed"),
    (["--overwrite", "sometimes"], "sometimes"),
])
def test_policies_an_image_cannot_follow_are_usage_errors(image_snapshot: tuple[Hozon, bytes], tmp_path: Path,
                                                         args: list[str], words: str) -> None:
    run = vm_restore(image_snapshot[0], tmp_path / "out", *args)
    assert run.returncode == 2 and run.stderr.startswith("hozon: error: ") and words in run.stderr


def test_to_dash_is_refused(image_snapshot: tuple[Hozon, bytes], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = vm_restore(image_snapshot[0], "-")
    assert run.returncode == 2 and "--to '-'" in run.stderr
    assert not (tmp_path / "-").exists()
