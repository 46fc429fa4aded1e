"""Repository housekeeping: init, key, list, unlock, cat."""

from __future__ import annotations

import json

import typer

from hozon.cli.common import (
    JsonOption,
    RepoOption,
    RetryLockOption,
    console,
    open_repo,
    parse_duration,
    print_json,
)
from hozon.cli.password import read_password, read_password_file
from hozon.errors import RepositoryFull, UsageError
from hozon.repo import schema
from hozon.repo.backends import open_backend
from hozon.repo.locks import EXCLUSIVE, Lock, list_locks, remove_stale_locks
from hozon.repo.pack import BLOB_TYPES
from hozon.repo.repository import Repository

key_app = typer.Typer(help="Manage the repository's password.", no_args_is_help=True)
list_app = typer.Typer(help="List repository objects (locks, snapshots, index, packs, keys).", no_args_is_help=True)


def init(
    repo: str | None = RepoOption,
    insecure_no_encryption: bool = typer.Option(
        False, "--insecure-no-encryption", help="Store data unencrypted (still checksummed). Not recommended."
    ),
) -> None:
    """Create a new repository (encrypted unless told otherwise)."""
    from hozon.cli.common import repo_location

    backend = open_backend(repo_location(repo))
    password = None if insecure_no_encryption else read_password(confirm=True, prompt="new repository password: ")
    try:
        repository = Repository.init(backend, password, encrypted=not insecure_no_encryption)
    except RepositoryFull as exc:
        exc.hint = "free space, then run hozon init again: it finishes what this one began"
        raise
    mode = "unencrypted (--insecure-no-encryption)" if insecure_no_encryption else "encrypted (AES-256-GCM)"
    console.print(f"created {mode} repository {repository.config['id'][:8]} at {backend.location}")
    if not insecure_no_encryption:
        console.print("keep the password safe: without it the data cannot be read by anyone")


@key_app.command("passwd")
def key_passwd(
    repo: str | None = RepoOption,
    retry_lock: str = RetryLockOption,
    new_password_file: str = typer.Option("", "--new-password-file", metavar="FILE",
                                          help="Read the new password from FILE (else HOZON_NEW_PASSWORD, else "
                                               "a prompt on the terminal)."),
) -> None:
    """Change the password (rewrites one key file; no data is touched).

    The new password comes from --new-password-file, the environment variable HOZON_NEW_PASSWORD,
    or a prompt (asked twice); an empty one is refused.
    """
    repository = open_repo(repo, load_index=False)
    if not repository.master.encrypted:
        raise UsageError("this repository is not encrypted; it has no password to change")
    new = _new_password(new_password_file)  # before the lock: a backup may start while we wait at the prompt
    with Lock(repository, EXCLUSIVE, "key passwd", parse_duration(retry_lock)):
        repository.change_password(new)
    console.print("password changed")


def _new_password(path: str) -> str:
    import getpass
    import os
    import sys

    if path:
        new = read_password_file(path)
    elif "HOZON_NEW_PASSWORD" in os.environ:
        new = os.environ["HOZON_NEW_PASSWORD"]
    elif not sys.stdin.isatty():
        raise UsageError("no new password given",
                         hint="give --new-password-file FILE, set HOZON_NEW_PASSWORD or run on a terminal")
    else:
        new = getpass.getpass("new password: ")
        if getpass.getpass("enter it again: ") != new:
            raise UsageError("the new passwords differ")
    if not new:
        raise UsageError("an empty password is not allowed")
    return new


@list_app.command("locks")
def list_locks_cmd(repo: str | None = RepoOption, json_out: bool = JsonOption) -> None:
    """Show who holds the repository, and which locks are stale."""
    repository = open_repo(repo, load_index=False)
    locks = list_locks(repository)
    if json_out:
        print_json([{"id": lk.name, "kind": lk.kind, "hostname": lk.hostname, "pid": lk.pid,
                     "command": lk.command, "started": lk.started, "stale": lk.stale} for lk in locks])
        return
    if not locks:
        console.print("no locks")
    for lk in locks:
        console.print(f"{lk.name[:8]}  {lk.describe()}{'  [stale]' if lk.stale else ''}", markup=False)


@list_app.command("snapshots")
def list_snapshot_ids(repo: str | None = RepoOption) -> None:
    """Print every snapshot id."""
    for name in open_repo(repo, load_index=False).snapshot_ids():
        console.print(name)


@list_app.command("index")
def list_index(repo: str | None = RepoOption) -> None:
    """Print every index file name."""
    for key, _size in open_repo(repo, load_index=False).backend.list("index"):
        console.print(key.rsplit("/", 1)[-1])


@list_app.command("packs")
def list_packs(repo: str | None = RepoOption) -> None:
    """Print every pack file name."""
    for name in open_repo(repo, load_index=False).list_packs():
        console.print(name)


@list_app.command("keys")
def list_keys(repo: str | None = RepoOption) -> None:
    """Print the key files (one per password)."""
    repository = open_repo(repo, load_index=False)
    for key, _size in repository.backend.list("keys"):
        name = key.rsplit("/", 1)[-1]
        console.print(f"{name}{'  (in use)' if name == repository.key_name else ''}")


def unlock(
    repo: str | None = RepoOption,
    remove_all: bool = typer.Option(False, "--remove-all", help="Remove live locks too (dangerous)."),
) -> None:
    """Remove stale locks (left by processes that died)."""
    repository = open_repo(repo, load_index=False)
    removed = remove_stale_locks(repository, everything=remove_all)
    for lk in removed:
        console.print(f"removed {lk.describe()}")
    console.print(f"{len(removed)} lock(s) removed")


def cat(
    kind: str = typer.Argument(..., metavar="KIND", help="config | snapshot | tree | blob | index | pack | key"),
    object_id: str = typer.Argument("", metavar="ID", help="Id of the object (a snapshot may be 'latest')."),
    repo: str | None = RepoOption,
) -> None:
    """Print a repository object, decrypted (for debugging)."""
    kinds = ("config", "snapshot", "tree", "blob", "index", "pack", "key")
    if kind not in kinds:
        raise UsageError(f"unknown object kind {kind!r}", hint=f"one of: {' '.join(kinds)}")
    if kind in {"tree", "blob", "index", "pack"}:
        _check_hex_id(kind, object_id)
    repository = open_repo(repo, load_index=kind in {"tree", "blob"})
    if kind == "config":
        print_json(repository.config)
    elif kind == "snapshot":
        print_json(repository.resolve_snapshot(object_id).listing())
    elif kind == "tree":
        try:  # as stored, unknown fields included: this is for debugging
            print_json(schema.parse_json(repository.load_blob(bytes.fromhex(object_id))))
        except schema.Invalid as exc:
            raise UsageError(f"blob {object_id[:16]} is not a tree ({exc})") from exc
    elif kind == "blob":
        import sys

        sys.stdout.buffer.write(repository.load_blob(bytes.fromhex(object_id)))
    elif kind == "index":
        records = repository.read_index_file(object_id)
        print_json([{"pack": r.name, "condemned_at": r.condemned_at, "blobs": len(r.entries)} for r in records])
    elif kind == "pack":
        _data, entries = repository.read_pack(object_id)
        print_json([{"type": BLOB_TYPES.get(e.blob_type), "id": e.blob_id.hex(), "offset": e.offset,
                     "length": e.length, "raw_length": e.raw_length} for e in entries])
    else:
        print_json(json.loads(repository.backend.get(f"keys/{repository.key_name}")))


def _check_hex_id(kind: str, object_id: str) -> None:
    """Blobs, index files and packs are named by 32-byte ids: 64 hex digits (never a path)."""
    try:
        schema.BLOB_ID(object_id)
    except schema.Invalid as exc:
        raise UsageError(f"{object_id!r} is not a {kind} id", hint=f"a {kind} id is 64 hexadecimal digits") from exc
