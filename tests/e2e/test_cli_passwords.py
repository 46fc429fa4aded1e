"""Where the password comes from: --password-file, --password-command (and their variables), and the
new password of ``key passwd`` (--new-password-file, HOZON_NEW_PASSWORD)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import PASSWORD
from tests.e2e.test_damaged_repository import fails_with_one_sentence
from tests.e2e.test_security import without_password

if TYPE_CHECKING:
    from conftest import Hozon


def password_file(tmp_path: Path, text: str = PASSWORD + "\n", name: str = "password") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def printer(tmp_path: Path, text: str, status: int = 0) -> str:
    """A password command: a script printing ``text`` and exiting ``status``."""
    script = tmp_path / "print-password"
    script.write_text(f"import sys\nsys.stdout.write({text!r})\nsys.exit({status})\n")
    return f"{sys.executable} {script}"


def test_password_file_and_command_open_the_repository(hozon: Hozon, tmp_path: Path) -> None:
    runner = without_password(hozon)
    assert "0 snapshot(s)" in runner("snapshots", "--password-file", str(password_file(tmp_path))).stdout
    assert "0 snapshot(s)" in runner("snapshots", "--password-command", printer(tmp_path, PASSWORD + "\n")).stdout
    env = {"HOZON_PASSWORD_COMMAND": printer(tmp_path, PASSWORD)}
    assert "0 snapshot(s)" in runner("snapshots", env=env).stdout


def test_init_takes_the_new_repository_password_from_a_command(tmp_path: Path) -> None:
    from tests.conftest import Hozon as Runner

    runner = Runner(tmp_path / "repo", password="another one")
    runner.env.pop("HOZON_PASSWORD")
    runner("init", "--password-command", printer(tmp_path, "another one"))
    assert "0 snapshot(s)" in runner("snapshots", env={"HOZON_PASSWORD": "another one"}).stdout


def test_a_flag_beats_the_environment_and_both_sources_at_once_are_refused(hozon: Hozon, tmp_path: Path) -> None:
    right = password_file(tmp_path)
    assert "0 snapshot(s)" in hozon("snapshots", "--password-file", str(right),
                                    env={"HOZON_PASSWORD": "wrong"}).stdout
    result = hozon("snapshots", "--password-file", str(right), "--password-command", printer(tmp_path, PASSWORD),
                   check=False)
    fails_with_one_sentence(result, 2, "both given")


def test_a_failing_or_silent_password_command_is_one_sentence(hozon: Hozon, tmp_path: Path) -> None:
    runner = without_password(hozon)
    failing = runner("snapshots", "--password-command", printer(tmp_path, PASSWORD, status=3), check=False)
    fails_with_one_sentence(failing, 2, "failed (exit status 3)")
    silent = runner("snapshots", "--password-command", printer(tmp_path, ""), check=False)
    fails_with_one_sentence(silent, 2, "printed no password")
    missing = runner("snapshots", "--password-command", str(tmp_path / "no-such-program"), check=False)
    fails_with_one_sentence(missing, 2, "cannot be run")
    binary = runner("snapshots", "--password-command", "printf '\\377\\376'", check=False)
    fails_with_one_sentence(binary, 2, "not UTF-8")


def test_key_passwd_reads_the_new_password_from_a_file(hozon: Hozon, tmp_path: Path) -> None:
    new = password_file(tmp_path, "the next password\n", name="new")
    hozon("key", "passwd", "--new-password-file", str(new))
    assert "0 snapshot(s)" in hozon("snapshots", env={"HOZON_PASSWORD": "the next password"}).stdout
    fails_with_one_sentence(hozon("snapshots", check=False), 12, "wrong password")
    empty = password_file(tmp_path, "\n", name="empty")
    result = hozon("key", "passwd", "--new-password-file", str(empty), env={"HOZON_PASSWORD": "the next password"},
                   check=False)
    fails_with_one_sentence(result, 2, "empty password")


def test_the_help_names_every_password_source() -> None:
    import subprocess

    def helps(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "hozon", *args, "--help"], capture_output=True, text=True,
                              check=True).stdout

    backup = helps("backup")
    assert "--password-file FILE" in backup and "--password-command COMMAND" in backup
    assert "HOZON_PASSWORD_COMMAND" in backup
    passwd = helps("key", "passwd")
    assert "--new-password-file FILE" in passwd and "HOZON_NEW_PASSWORD" in passwd
