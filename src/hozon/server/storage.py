"""The server's datastore: one Hozon repository per namespace, and the rules agents write by.

A namespace comes to exist on first use: a random repository password (``DIR/keys/NS.password``,
0600), an encrypted repository at ``DIR/datastore/NS`` (made in a temporary directory and renamed
into place, so a crash never leaves half a repository), then its catalog row.

Agents may only add files, and only where a backup adds them: ``data/``, ``index/``,
``snapshots/`` and ``locks/``; the only files they may delete are locks. Every content-addressed
file (``data/``, ``index/``, ``snapshots/``, ``keys/``) must hash to its name, so nothing stored
under such a name can differ from what the name promises. The admin may add and delete anything,
still write-once.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import blake3
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from hozon.errors import HozonError, ServerError
from hozon.private_file import write_private
from hozon.repo.backends.local import LocalBackend
from hozon.repo.repository import Repository
from hozon.server.catalog.models import Namespace
from hozon.server.context import ServerContext
from hozon.server.paths import ServerDir, check_namespace

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_HASH = r"[0-9a-f]{64}"
# Every key a repository may hold, by prefix; the hashed ones are named by the BLAKE3 of their bytes.
_KEY_RE = re.compile(rf"config|(?:keys|index|snapshots)/{_HASH}|data/[0-9a-f]{{2}}/{_HASH}|locks/{_NAME}")
_LIST_PREFIXES = re.compile(r"|keys|index|snapshots|locks|data(?:/[0-9a-f]{2})?")
CONTENT_ADDRESSED = ("keys/", "index/", "snapshots/", "data/")
AGENT_WRITABLE = ("data/", "index/", "snapshots/", "locks/")
AGENT_DELETABLE = ("locks/",)

_create_lock = threading.Lock()


def check_key(key: str) -> str:
    """``key`` if it names a file a repository may hold (no ``..``, no absolute path, known prefix)."""
    if not _KEY_RE.fullmatch(key):
        raise ServerError(f"{key!r} is not a repository file name", 400)
    return key


def check_list_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if not _LIST_PREFIXES.fullmatch(prefix):
        raise ServerError(f"{prefix!r} is not a repository directory", 400)
    return prefix


def may_write(key: str, admin: bool) -> None:
    if not admin and not key.startswith(AGENT_WRITABLE):
        raise ServerError(f"an agent may not write {key}; only the server manages keys and config", 403)


def may_delete(key: str, admin: bool) -> None:
    if not admin and not key.startswith(AGENT_DELETABLE):
        raise ServerError(f"an agent may not delete {key}; only the server deletes data", 403)


# -- namespaces ------------------------------------------------------------------------------------
def ensure_namespace(ctx: ServerContext, name: str) -> int:
    """The namespace's catalog id, creating its password, repository and row on first use."""
    check_namespace(name)
    with _create_lock:
        password = _ensure_password(ctx.server_dir, name)
        _ensure_repository(ctx.server_dir, name, password)
        for _attempt in range(2):
            with ctx.catalog.session() as s:
                found = s.scalars(select(Namespace.id).where(Namespace.name == name)).one_or_none()
                if found is not None:
                    return found
            try:
                with ctx.catalog.session() as s:
                    row = Namespace(name=name)
                    s.add(row)
                    s.flush()
                    return row.id
            except IntegrityError:
                continue  # another server sharing the catalog created it meanwhile
    raise HozonError(f"cannot create namespace {name} in the catalog")


def namespace_password(server_dir: ServerDir, name: str) -> str:
    return server_dir.password_file(name).read_text().strip()


def namespace_backend(server_dir: ServerDir, name: str) -> LocalBackend:
    """The namespace's repository; 404 when the namespace was never used."""
    root = server_dir.repository(name)
    if not (root / "config").exists():
        raise ServerError(f"namespace {name} has no repository yet", 404)
    return LocalBackend(root)


def open_repository(server_dir: ServerDir, name: str) -> Repository:
    """The namespace's repository opened with the password the server keeps for it (prune, verify,
    retention and restores on the server all open it this way)."""
    backend = namespace_backend(server_dir, name)
    try:
        password = namespace_password(server_dir, name)
    except FileNotFoundError:
        raise ServerError(f"namespace {name} has no password file {server_dir.password_file(name)}", 404) from None
    return Repository.open(backend, password)


def _ensure_password(server_dir: ServerDir, name: str) -> str:
    path = server_dir.password_file(name)
    if not path.exists():
        server_dir.keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = server_dir.keys / f".{name}.{uuid.uuid4().hex}.new"
        write_private(tmp, base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=") + "\n")
        try:
            os.link(tmp, path)  # never replaces a password another process wrote first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return namespace_password(server_dir, name)


def _ensure_repository(server_dir: ServerDir, name: str, password: str) -> None:
    final = server_dir.repository(name)
    if final.exists():
        return
    server_dir.datastore.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = server_dir.datastore / f".{name}.{uuid.uuid4().hex}.new"
    try:
        Repository.init(LocalBackend(staging), password)
        try:
            staging.rename(final)
        except OSError:
            if not final.exists():  # anything but another process winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- uploads ---------------------------------------------------------------------------------------
@dataclass
class Upload:
    """One PUT streamed to a private temporary file; :meth:`finish` fsyncs and names it (write-once)."""

    backend: LocalBackend
    key: str
    fd: int
    tmp: Path
    size: int = 0

    def __post_init__(self) -> None:
        self._hash = blake3.blake3() if self.key.startswith(CONTENT_ADDRESSED) else None

    @classmethod
    def start(cls, backend: LocalBackend, key: str) -> Upload:
        fd, tmp = backend.temp_file()
        return cls(backend, key, fd, tmp)

    def write(self, chunk: bytes) -> None:
        if self._hash is not None:
            self._hash.update(chunk)
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.abort()
            raise self.backend.write_error(self.tmp, exc) from exc
        self.size += len(chunk)

    def finish(self, expected_size: int | None) -> bool:
        """True when the key was created, False when an identical file was there already (a retry)."""
        try:
            if expected_size is not None and expected_size != self.size:
                raise ServerError(f"{self.key}: received {self.size} of {expected_size} bytes", 400)
            if self._hash is not None and not self.key.endswith(self._hash.hexdigest()):
                raise ServerError(f"the content sent for {self.key} does not match its name", 400)
            os.fsync(self.fd)
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        self.fd = -1
        try:
            if self.backend.link(self.tmp, self.key):
                return True
            # A retry of a hashed key sent the same bytes (checked above); other keys are compared.
            if self._hash is None and not _same_content(self.tmp, self.backend.root / self.key):
                raise ServerError(f"{self.key} exists already with different content", 409)
            return False
        finally:
            self.tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def _same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
