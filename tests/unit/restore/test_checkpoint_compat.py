"""A checkpoint only resumes on a QEMU that can load it: what restore checks first, against the real binary."""

from __future__ import annotations

import shutil

import pytest

from hozon.repo.snapshots import Snapshot
from hozon.restore.checkpoint import compatibility, qemu_binary

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="needs qemu-system-x86_64 (CI installs it)")


def checkpoint(**extra: object) -> Snapshot:
    return Snapshot(time="2026-12-01T00:00:00+00:00", hostname="h", paths=["vm"], kind="checkpoint",
                    extra={"vm": "vm", **extra})


def test_the_machine_type_and_version_that_took_it_are_accepted() -> None:
    local = compatibility(checkpoint(machine="pc-q35-7.2", qemu_version=""))
    assert local.problems == [] and local.notes == []


def test_an_unknown_machine_type_a_newer_qemu_and_a_missing_binary_are_refused_with_the_reason() -> None:
    newer = compatibility(checkpoint(machine="pc-q35-99.0", qemu_version="99.0.0"))
    assert any("older than the 99.0.0 that took the checkpoint" in p for p in newer.problems), newer
    assert any("machine type pc-q35-99.0" in p for p in newer.problems), newer
    older = compatibility(checkpoint(machine="pc-q35-7.2", qemu_version="6.2.0"))
    assert older.problems == [] and "the checkpoint was taken on 6.2.0" in older.notes[0]
    missing = compatibility(checkpoint(qemu_binary="qemu-system-nonesuch"))
    assert missing.problems == ["qemu-system-nonesuch, which ran the VM, is not installed here"]
    assert qemu_binary(checkpoint()) == "qemu-system-x86_64"
