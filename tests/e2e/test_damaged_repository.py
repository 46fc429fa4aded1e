"""A damaged or unreachable repository gets one clear sentence naming the file, never a traceback."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Hozon, Run

Damage = Callable[[Path], None]


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGE = {"bit-flipped": flip_middle, "truncated": truncate, "emptied": empty}


def fails_with_one_sentence(result: Run, exit_code: int, *names: str) -> None:
    """The user sees one error (plus perhaps a hint) that names the damaged file, and the exit code."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == exit_code, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert result.stderr.startswith("hozon: error: "), result.stderr
    assert result.stderr.count("hozon: error:") == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: ")), result.stderr
    for name in names:
        assert name in result.stderr, f"{name} not named in:\n{result.stderr}"


@pytest.fixture
def backed_up(hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]) -> Hozon:
    """A repository holding one snapshot of a few files."""
    src = make_tree({"big.bin": os.urandom(1_000_000), "dir/small.txt": "hello\n"})
    hozon("backup", str(src))
    return hozon


def only_file(directory: Path) -> Path:
    (path,) = [p for p in directory.rglob("*") if p.is_file()]
    return path


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_index_file_is_named(backed_up: Hozon, tmp_path: Path, damage: str) -> None:
    index = only_file(backed_up.repo / "index")
    DAMAGE[damage](index)
    name = f"index/{index.name}"

    result = backed_up("check", check=False)
    assert "Traceback" not in result.stderr and result.returncode == 1
    assert name in result.stdout and result.stdout.strip().endswith("error(s) found")

    fails_with_one_sentence(backed_up("restore", "latest", "--target", str(tmp_path / "out"), check=False), 1, name)
    fails_with_one_sentence(backed_up("ls", "latest", check=False), 1, name)
    listing = backed_up("snapshots", check=False)  # listing snapshots does not need the index
    assert "Traceback" not in listing.stderr and listing.returncode == 0
    assert "1 snapshot(s)" in listing.stdout


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_snapshot_file_is_named(backed_up: Hozon, tmp_path: Path, damage: str) -> None:
    snapshot = only_file(backed_up.repo / "snapshots")
    DAMAGE[damage](snapshot)
    name = f"snapshots/{snapshot.name}"

    result = backed_up("check", check=False)
    assert "Traceback" not in result.stderr and result.returncode == 1
    assert name in result.stdout

    listing = backed_up("snapshots", check=False)  # lists what it can, warns about the rest
    assert listing.returncode == 1 and name in listing.stderr and "Traceback" not in listing.stderr
    fails_with_one_sentence(backed_up("restore", "latest", "--target", str(tmp_path / "out"), check=False), 1, name)
    fails_with_one_sentence(backed_up("restore", snapshot.name[:8], "--target", str(tmp_path / "o2"), check=False),
                            1, name)


def test_a_damaged_pack_is_named_by_restore_and_ls(backed_up: Hozon, tmp_path: Path) -> None:
    pack = only_file(backed_up.repo / "data")
    truncate(pack)
    fails_with_one_sentence(backed_up("restore", "latest", "--target", str(tmp_path / "out"), check=False), 1,
                            pack.name)
    fails_with_one_sentence(backed_up("ls", "latest", check=False), 1, pack.name)


def test_a_missing_pack_is_named_by_restore(backed_up: Hozon, tmp_path: Path) -> None:
    pack = only_file(backed_up.repo / "data")
    pack.unlink()
    result = backed_up("restore", "latest", "--target", str(tmp_path / "out"), check=False)
    fails_with_one_sentence(result, 1, pack.name, "missing")


def test_a_damaged_config_is_named(backed_up: Hozon) -> None:
    flip_middle(backed_up.repo / "config")
    fails_with_one_sentence(backed_up("snapshots", check=False), 1, "config")
    fails_with_one_sentence(backed_up("check", check=False), 1, "config")


@pytest.mark.parametrize("damage", ["truncated", "emptied", "structure"])
def test_a_damaged_key_file_is_named(backed_up: Hozon, damage: str) -> None:
    key = only_file(backed_up.repo / "keys")
    if damage == "structure":
        data = bytearray(key.read_bytes())
        data[0] ^= 0x01  # the JSON no longer parses
        key.write_bytes(bytes(data))
    else:
        DAMAGE[damage](key)
    for command in ("snapshots", "check"):
        fails_with_one_sentence(backed_up(command, check=False), 1, f"keys/{key.name}")


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75, 0.9])
def test_a_bit_flip_anywhere_in_the_key_file_is_a_clear_sentence(backed_up: Hozon, where: float) -> None:
    """A flip inside the wrapped key cannot be told from a wrong password (it is the same AEAD failure)."""
    key = only_file(backed_up.repo / "keys")
    data = bytearray(key.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    key.write_bytes(bytes(data))
    result = backed_up("snapshots", check=False)
    if result.returncode == 12:
        fails_with_one_sentence(result, 12, "wrong password")
    else:
        fails_with_one_sentence(result, 1, f"keys/{key.name}")


def test_a_wrong_password_exits_12(backed_up: Hozon, tmp_path: Path) -> None:
    env = {"HOZON_PASSWORD": "not the password"}
    for args in (("snapshots",), ("check",), ("check", "--read-data"),
                 ("restore", "latest", "--target", str(tmp_path / "out"))):
        fails_with_one_sentence(backed_up(*args, env=env, check=False), 12, "wrong password")


def test_a_missing_repository_exits_10(hozon: Hozon, tmp_path: Path) -> None:
    env = {"HOZON_REPO": str(tmp_path / "no-such-repo")}
    for args in (("snapshots",), ("check",), ("check", "--read-data", "--json")):
        fails_with_one_sentence(hozon(*args, env=env, check=False), 10, str(tmp_path / "no-such-repo"))
