"""Nobody who can only write the repository can downgrade it, lock its owner out, or crash Hozon.

An attacker here has write access to the repository's directory but not the password, and runs as
another user: their Hozon keeps its client records elsewhere (``HOZON_CONFIG_DIR``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.e2e.test_damaged_repository import fails_with_one_sentence

if TYPE_CHECKING:
    from conftest import Hozon

MARKER = b"the owner's secret: only ever stored encrypted\n"
MakeTree = Callable[[dict[str, bytes | str]], Path]


def without_password(hozon: Hozon) -> Hozon:
    """The same runner with neither HOZON_PASSWORD nor HOZON_PASSWORD_FILE set."""
    other = type(hozon)(hozon.repo)
    other.env.pop("HOZON_PASSWORD")
    return other


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def made_by_another_client(hozon: Hozon, client_config: Path, *init_args: str) -> None:
    """Replace the fixture's repository with one made elsewhere: this client has never seen it."""
    shutil.rmtree(hozon.repo)
    shutil.rmtree(client_config / "known")
    hozon("init", *init_args, env={"HOZON_CONFIG_DIR": str(client_config.parent / "other-client")})


def swap_for_unencrypted(hozon: Hozon, tmp_path: Path) -> None:
    """What the attacker does: move the repository's files aside and init an unencrypted one there."""
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in ("config", "keys", "index", "snapshots"):
        shutil.move(hozon.repo / name, aside / name)
    hozon("init", "--insecure-no-encryption", env={"HOZON_CONFIG_DIR": str(tmp_path / "attacker-config")})


@pytest.mark.parametrize("how", ["created-here", "first-opened-here"])
def test_an_encrypted_repository_swapped_for_an_unencrypted_one_is_refused(
        hozon: Hozon, make_tree: MakeTree, tmp_path: Path, client_config: Path, how: str) -> None:
    src = make_tree({"secret.txt": MARKER * 100})
    if how == "first-opened-here":  # this client trusts it at first use
        made_by_another_client(hozon, client_config)
    hozon("backup", str(src))  # the owner's cron job, with the password set
    swap_for_unencrypted(hozon, tmp_path)

    result = hozon("backup", str(src), check=False)
    fails_with_one_sentence(result, 13, str(hozon.repo), "was encrypted")
    assert not (hozon.repo / "snapshots").exists()
    assert files_containing(hozon.repo, MARKER) == [], "data was written in the clear"
    for args in (("snapshots",), ("check",), ("restore", "latest", "--target", str(tmp_path / "out"))):
        fails_with_one_sentence(hozon(*args, check=False), 13, "was encrypted")
    fails_with_one_sentence(without_password(hozon)("snapshots", check=False), 13, "was encrypted")


def test_a_repository_whose_id_changed_is_refused_until_the_client_forgets_it(hozon: Hozon, tmp_path: Path) -> None:
    shutil.rmtree(hozon.repo)
    hozon("init", env={"HOZON_CONFIG_DIR": str(tmp_path / "other-client")})  # same password, another repository

    result = hozon("snapshots", check=False)
    fails_with_one_sentence(result, 13, "not the one this client knows")
    hint = result.stderr.splitlines()[1]
    assert "rm " in hint
    Path(hint.split("rm ", 1)[1].strip()).unlink()  # as the hint says: the owner accepts the new repository
    assert "0 snapshot(s)" in hozon("snapshots").stdout


def test_an_init_by_the_owner_replaces_what_the_client_knew(hozon: Hozon) -> None:
    shutil.rmtree(hozon.repo)
    hozon("init", "--insecure-no-encryption")
    assert "0 snapshot(s)" in without_password(hozon)("snapshots").stdout


def test_a_password_given_to_an_unencrypted_repository_it_never_saw_is_refused(hozon: Hozon,
                                                                              client_config: Path) -> None:
    made_by_another_client(hozon, client_config, "--insecure-no-encryption")

    fails_with_one_sentence(hozon("snapshots", check=False), 13, "not encrypted, but a password was given")
    assert "0 snapshot(s)" in without_password(hozon)("snapshots").stdout  # the user trusts it knowingly
    assert "0 snapshot(s)" in hozon("snapshots").stdout  # remembered as unencrypted: a password does no harm


# -- empty passwords ------------------------------------------------------------------------------
def test_an_empty_password_is_refused_for_a_new_repository(tmp_path: Path) -> None:
    from tests.conftest import Hozon as Runner

    empty_file = tmp_path / "password"
    empty_file.write_text("\n")
    for env in ({"HOZON_PASSWORD": ""}, {"HOZON_PASSWORD_FILE": str(empty_file)}):
        runner = Runner(tmp_path / "repo")
        runner.env.pop("HOZON_PASSWORD")
        fails_with_one_sentence(runner("init", env=env, check=False), 2, "empty password")
        assert not (tmp_path / "repo" / "config").exists()
        assert not any((tmp_path / "repo" / "keys").glob("*"))


def test_an_empty_new_password_is_refused_by_key_passwd(hozon: Hozon) -> None:
    keys = sorted((hozon.repo / "keys").iterdir())
    result = hozon("key", "passwd", env={"HOZON_NEW_PASSWORD": ""}, check=False)
    fails_with_one_sentence(result, 2, "empty password")
    assert sorted((hozon.repo / "keys").iterdir()) == keys
    hozon("snapshots")  # the old password still opens it


def test_an_empty_password_for_an_existing_repository_is_a_wrong_password(hozon: Hozon) -> None:
    fails_with_one_sentence(hozon("snapshots", env={"HOZON_PASSWORD": ""}, check=False), 12, "wrong password")


# -- key files ------------------------------------------------------------------------------------
FIRST = "0" * 64  # sorts before every content-addressed key name
LAST = "f" * 64  # …and after every one


def test_a_key_file_of_another_repository_is_passed_over(hozon: Hozon, make_tree: MakeTree, tmp_path: Path) -> None:
    other = type(hozon)(tmp_path / "other")
    other("init")  # same password
    (other_key,) = (other.repo / "keys").iterdir()
    shutil.copy(other_key, hozon.repo / "keys" / FIRST)

    src = make_tree({"a.txt": "hello\n"})
    hozon("backup", str(src))
    hozon("restore", "latest", "--target", str(tmp_path / "out"))
    assert (tmp_path / "out" / src.relative_to("/") / "a.txt").read_text() == "hello\n"
    assert "no errors were found" in hozon("check").stdout


@pytest.mark.parametrize("content", ["[]", '{"kdf": "none", "master": 5}', '{"kdf": "argon2id"}', "not json",
                                     '{"kdf": "argon2id", "salt": "AA==", "wrapped": "AA==", "memory_kib": 1, '
                                     '"iterations": 1, "lanes": 1}'])
def test_a_key_file_that_is_no_key_is_passed_over_and_named_when_alone(hozon: Hozon, content: str) -> None:
    (real,) = (hozon.repo / "keys").iterdir()
    for name in (FIRST, LAST):
        (hozon.repo / "keys" / name).write_text(content)
    assert "0 snapshot(s)" in hozon("snapshots").stdout
    fails_with_one_sentence(hozon("snapshots", env={"HOZON_PASSWORD": "not it"}, check=False), 12, "wrong password")

    real.unlink()
    fails_with_one_sentence(hozon("snapshots", check=False), 1, "keys/")


def test_an_unencrypted_key_added_to_an_encrypted_repository_does_not_drop_the_password(hozon: Hozon) -> None:
    plain = type(hozon)(hozon.repo.parent / "plain")
    plain("init", "--insecure-no-encryption")
    (plain_key,) = (plain.repo / "keys").iterdir()
    shutil.copy(plain_key, hozon.repo / "keys" / FIRST)
    assert "0 snapshot(s)" in hozon("snapshots").stdout
    fails_with_one_sentence(without_password(hozon)("snapshots", check=False), 2, "no password given")


# -- other expected failures ----------------------------------------------------------------------
def test_a_password_file_that_is_not_utf8_is_one_sentence(hozon: Hozon, tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_bytes(b"\xff\xfepassword\n")
    runner = without_password(hozon)
    fails_with_one_sentence(runner("snapshots", env={"HOZON_PASSWORD_FILE": str(path)}, check=False), 2, str(path))


@pytest.mark.parametrize("args", [("tree", "zz"), ("blob", "zz"), ("index", "zz"), ("pack", "../config"),
                                  ("tree", "ab" * 31), ("blob", ""), ("bogus", "x")])
def test_cat_with_an_id_that_is_not_one_is_one_sentence(hozon: Hozon, args: tuple[str, str]) -> None:
    fails_with_one_sentence(hozon("cat", *args, check=False), 2)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs with all but one page taken: room for a key file, none for the config after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; CI runs the tests as root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        (mount / "filler").write_bytes(bytes(60 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_an_init_that_ran_out_of_space_is_finished_by_the_next(small_disk: Path, make_tree: MakeTree,
                                                               tmp_path: Path) -> None:
    from tests.conftest import Hozon as Runner

    hozon = Runner(small_disk / "repo")
    failed = hozon("init", check=False)
    fails_with_one_sentence(failed, 1, "no space left", "run hozon init again")
    assert any((hozon.repo / "keys").iterdir()) and not (hozon.repo / "config").exists()  # today's half-made state
    fails_with_one_sentence(hozon("snapshots", check=False), 10, "no Hozon repository")

    (small_disk / "filler").unlink()
    hozon("init")
    assert len(list((hozon.repo / "keys").iterdir())) == 1
    src = make_tree({"a.txt": "hello\n"})
    hozon("backup", str(src))
    assert "no errors were found" in hozon("check").stdout
    assert json.loads(hozon("snapshots", "--json").stdout)[0]["paths"] == [str(src)]
