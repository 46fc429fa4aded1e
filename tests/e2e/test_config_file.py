"""The config file (hozon.toml): the repository, the password source and command defaults, under the
environment and the flags; ``hozon config show`` says what is in effect and where it came from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import PASSWORD
from tests.e2e.test_damaged_repository import fails_with_one_sentence
from tests.e2e.test_security import without_password

if TYPE_CHECKING:
    from conftest import Hozon


def write_config(client_config: Path, text: str) -> Path:
    path = client_config / "hozon.toml"
    path.write_text(text)
    return path


def bare(hozon: Hozon) -> Hozon:
    """A runner with neither a repository nor a password in its environment."""
    runner = without_password(hozon)
    runner.env.pop("HOZON_REPO")
    return runner


def test_the_config_files_repository_and_password_file_are_used(
        hozon: Hozon, client_config: Path, tmp_path: Path, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    src = make_tree({"a.txt": "a"})
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    write_config(client_config, f'repo = "{hozon.repo}"\npassword_file = "{password}"\n')
    runner = bare(hozon)
    runner("backup", str(src))
    assert "1 snapshot(s)" in runner("snapshots").stdout


def test_the_environment_and_the_flag_override_the_config_file(hozon: Hozon, client_config: Path,
                                                               tmp_path: Path) -> None:
    write_config(client_config, f'repo = "{tmp_path / "elsewhere"}"\n')
    assert "0 snapshot(s)" in hozon("snapshots").stdout  # HOZON_REPO wins
    runner = bare(hozon)
    fails_with_one_sentence(runner("snapshots", check=False), 10, str(tmp_path / "elsewhere"))
    assert "0 snapshot(s)" in runner("snapshots", "--repo", str(hozon.repo),
                                     env={"HOZON_PASSWORD": PASSWORD}).stdout


def test_command_defaults_come_from_their_table(hozon: Hozon, client_config: Path,
                                                make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    src = make_tree({"keep.txt": "k", "skip.tmp": "s"})
    write_config(client_config, '[backup]\nexclude = ["*.tmp"]\ntag = ["nightly"]\n[snapshots]\njson = true\n'
                                "[forget]\nkeep-last = 1\n")
    hozon("backup", str(src))
    hozon("backup", str(src))
    listed = json.loads(hozon("snapshots").stdout)  # json = true
    assert len(listed) == 2 and listed[0]["tags"] == ["nightly"]
    names = hozon("ls", "latest", str(src)).stdout
    assert "keep.txt" in names and "skip.tmp" not in names
    hozon("forget")  # keep-last = 1
    assert len(json.loads(hozon("snapshots").stdout)) == 1


def test_config_show_says_where_each_setting_came_from_and_never_the_password(
        hozon: Hozon, client_config: Path) -> None:
    path = write_config(client_config, f'repo = "/srv/from-file"\npassword_command = "echo {PASSWORD}"\n'
                                       '[vm.backup]\nmode = "full"\n')
    shown = bare(hozon)("config", "show").stdout
    assert f"repo: /srv/from-file  ({path})" in shown
    assert "password_command" in shown and "(config file)" in shown
    assert f'vm.backup.mode: "full"  ({path})' in shown
    shown = hozon("config", "show").stdout
    assert f"repo: {hozon.repo}  (environment HOZON_REPO)" in shown
    assert "password: HOZON_PASSWORD (environment)" in shown  # the variable beats the file's command
    assert PASSWORD not in shown


def test_a_malformed_or_unknown_setting_is_one_sentence_naming_the_file(hozon: Hozon, client_config: Path,
                                                                        tmp_path: Path) -> None:
    path = write_config(client_config, 'repo = "/srv"\n[backup]\nexclude = *.tmp\ntag = []\n')
    result = hozon("snapshots", check=False)
    fails_with_one_sentence(result, 2, str(path))
    assert "line 3" in result.stderr
    write_config(client_config, "[backup]\nexclood = []\n")
    fails_with_one_sentence(hozon("snapshots", check=False), 2, "backup.exclood")
    other = tmp_path / "other.toml"
    fails_with_one_sentence(hozon("snapshots", env={"HOZON_CONFIG": str(other)}, check=False), 2, str(other))
    other.write_text("[snapshots]\njson = true\n")  # HOZON_CONFIG: that file instead of the usual ones
    assert json.loads(hozon("snapshots", env={"HOZON_CONFIG": str(other)}).stdout) == []
