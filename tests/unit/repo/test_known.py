"""The client's records of repositories: trust on first use, then refuse a downgrade or a new id."""

from __future__ import annotations

from pathlib import Path

import pytest

from hozon.errors import UntrustedRepository
from hozon.repo import known


def test_the_first_open_is_remembered_and_later_ones_compared(client_config: Path) -> None:
    known.vouch("/srv/repo", "a" * 32, encrypted=True, password_given=True)
    assert known.recall("/srv/repo") == known.KnownRepository("/srv/repo", "a" * 32, True)
    assert known.record_path("/srv/repo").parent == client_config / "known"
    known.vouch("/srv/repo", "a" * 32, encrypted=True, password_given=True)
    with pytest.raises(UntrustedRepository, match="was encrypted"):
        known.vouch("/srv/repo", "b" * 32, encrypted=False, password_given=False)
    with pytest.raises(UntrustedRepository, match="not the one this client knows"):
        known.vouch("/srv/repo", "b" * 32, encrypted=True, password_given=True)


def test_locations_are_compared_as_absolute_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    known.remember("repo", "a" * 32, True)
    assert known.recall(str(tmp_path / "repo")) == known.KnownRepository(str(tmp_path / "repo"), "a" * 32, True)


def test_an_unknown_unencrypted_repository_is_refused_when_a_password_was_given() -> None:
    with pytest.raises(UntrustedRepository, match="a password was given"):
        known.vouch("/srv/plain", "c" * 32, encrypted=False, password_given=True)
    assert known.recall("/srv/plain") is None
    known.vouch("/srv/plain", "c" * 32, encrypted=False, password_given=False)
    known.vouch("/srv/plain", "c" * 32, encrypted=False, password_given=True)


def test_root_keeps_its_records_in_its_own_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOZON_CONFIG_DIR")
    monkeypatch.setenv("HOME", "/home/alice")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/alice/.config")
    monkeypatch.setattr(known.os, "geteuid", lambda: 0)
    assert not str(known.config_dir()).startswith("/home/alice")
    monkeypatch.setattr(known.os, "geteuid", lambda: 1000)
    assert known.config_dir() == Path("/home/alice/.config/hozon")
