"""What this client remembers of each repository it used, so a swapped or downgraded one is refused.

Someone who can write the repository's directory but lacks the password can move its files aside and
put an unencrypted repository in their place; a backup run with the password (from cron) would then
store the data in the clear. So the client keeps one small record per repository location, written
when it creates a repository or first opens one there (trust on first use), and compared on every
open: a repository that was encrypted and is not any more, or whose id changed, is refused.

    <config dir>/known/<blake3 of the location>   {"location": …, "id": …, "encrypted": …}

The config dir is ``$HOZON_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/hozon``, else ``~/.config/hozon``;
for root always root's own home (``sudo -E`` must not put root's records in a user's home).
"""

from __future__ import annotations

import json
import os
import pwd
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import blake3

from hozon.errors import HozonError, UntrustedRepository
from hozon.repo import schema

_RECORD = schema.record({"location": schema.text, "id": schema.text, "encrypted": schema.flag})


@dataclass(frozen=True)
class KnownRepository:
    location: str
    id: str
    encrypted: bool


def config_dir() -> Path:
    explicit = os.environ.get("HOZON_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path(pwd.getpwuid(0).pw_dir) / ".config" / "hozon"
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return Path(xdg) / "hozon" if xdg else Path.home() / ".config" / "hozon"


def record_path(location: str) -> Path:
    return config_dir() / "known" / blake3.blake3(_canonical(location).encode()).hexdigest()


def _canonical(location: str) -> str:
    # Not resolved through symlinks: a symlink swapped to point elsewhere must not look like a new place.
    return os.path.abspath(location)


def recall(location: str) -> KnownRepository | None:
    path = record_path(location)
    try:
        return KnownRepository(**_RECORD(schema.parse_json(path.read_bytes())))
    except FileNotFoundError:
        return None
    except (OSError, schema.Invalid) as exc:
        raise HozonError(f"cannot read this client's record of the repository, {path}: {exc}",
                         hint="if it is damaged, remove it; the next open records the repository again") from exc


def remember(location: str, repo_id: str, encrypted: bool) -> None:
    """Write (or replace) the record atomically, readable by this user only."""
    path = record_path(location)
    doc = asdict(KnownRepository(_canonical(location), repo_id, encrypted))
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise HozonError(f"cannot keep this client's record of the repository in {path.parent}: {exc.strerror}",
                         hint="set HOZON_CONFIG_DIR to a directory this user can write") from exc


def vouch(location: str, repo_id: str, encrypted: bool, password_given: bool) -> None:
    """Refuse a repository that is not what this client knew at ``location``; remember a new one.

    ``password_given``: a password was offered (HOZON_PASSWORD or HOZON_PASSWORD_FILE). Offered
    to an unencrypted repository this client has never seen, it means the caller expects
    encryption, so the repository is refused rather than trusted.
    """
    known = recall(location)
    forget = f"if it was re-created on purpose, make this client forget the old one: rm {record_path(location)}"
    if known is None:
        if password_given and not encrypted:
            raise UntrustedRepository(
                f"the repository at {location} is not encrypted, but a password was given; refusing to use it",
                hint="if it was made with --insecure-no-encryption, run once without HOZON_PASSWORD(_FILE) "
                     "to remember it as unencrypted",
            )
        remember(location, repo_id, encrypted)
        return
    if known.encrypted and not encrypted:
        raise UntrustedRepository(
            f"the repository at {location} was encrypted when this client last used it and is not any more; "
            "refusing to use it (someone may have replaced it to read your data)", hint=forget)
    if known.id != repo_id:
        raise UntrustedRepository(
            f"the repository at {location} is not the one this client knows there (its id was {known.id[:8]}, "
            f"now {repo_id[:8]}); refusing to use it", hint=forget)
