"""check --read-data-subset (a rotating part of the packs each night) and forget --keep-within."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Hozon

KiB = 1024


def packs(hozon: Hozon) -> list[Path]:
    return sorted(p for p in (hozon.repo / "data").rglob("*") if p.is_file())


def test_the_subsets_of_a_rotation_read_every_pack_once_and_find_the_damage(hozon: Hozon, tmp_path: Path) -> None:
    for i in range(6):  # each backup ends with a pack of its own
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "data.bin").write_bytes(os.urandom(300 * KiB))
        hozon("backup", str(src))
    all_packs = packs(hozon)
    assert len(all_packs) == 6
    damaged = all_packs[2]
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0x01  # inside the first blob
    damaged.write_bytes(bytes(data))

    read, found = 0, []
    for part in (1, 2, 3):
        run = hozon("check", "--read-data-subset", f"{part}/3", "--json", check=False)
        doc = json.loads(run.stdout)
        read += doc["checked"]["packs_read"]
        if doc["damaged_packs"]:
            assert run.returncode == 1
            found += doc["damaged_packs"]
        else:
            assert run.returncode == 0, run.stdout
    assert read == 6 and found == [damaged.name]
    again = json.loads(hozon("check", "--read-data-subset", "2/3", "--json", check=False).stdout)
    first = json.loads(hozon("check", "--read-data-subset", "2/3", "--json", check=False).stdout)
    assert again["checked"]["packs_read"] == first["checked"]["packs_read"]  # the same group each time

    half = json.loads(hozon("check", "--read-data-subset", "50%", "--json", check=False).stdout)
    assert half["checked"]["packs_read"] == 3
    everything = hozon("check", "--read-data-subset", "100%", check=False)
    assert everything.returncode == 1 and "read 6 pack(s)" in everything.stdout and "(subset 100%)" in everything.stdout

    for bad in ("0/3", "4/3", "0%", "abc"):
        run = hozon("check", "--read-data-subset", bad, check=False)
        assert run.returncode == 2 and "--read-data-subset" in run.stderr and "Traceback" not in run.stderr


def test_forget_keep_within_keeps_what_is_recent_and_says_why(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / "f").write_text(str(i))
        hozon("backup", str(src))
    doc = json.loads(hozon("forget", "--keep-within", "1h", "--dry-run", "--json").stdout)
    kept = doc["groups"][0]["keep"]
    assert len(kept) == 3 and doc["removed"] == []
    assert all("within 1h" in k["reasons"] for k in kept)
    bad = hozon("forget", "--keep-within", "1w", check=False)
    assert bad.returncode == 2 and "is not a duration" in bad.stderr
