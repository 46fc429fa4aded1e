"""A Hozon repository: keys, config, index, blobs and snapshots over one storage backend.

Layout (docs/format.md has the bytes):

    config              sealed JSON: format version, repository id, chunker settings
    keys/<id>           the master key wrapped by a password (one file per password)
    data/<xx>/<blake3>   pack files
    index/<blake3>       index files
    snapshots/<blake3>   snapshot files
    locks/<random>      who is using the repository
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from hozon import compress
from hozon.crypto import AuthenticationFailed, MasterKey, content_name, unwrap_key, wrap_master_key
from hozon.errors import (
    CorruptData,
    HozonError,
    ObjectNotFound,
    RepositoryExists,
    RepositoryNotFound,
    SnapshotNotFound,
    WrongPassword,
)
from hozon.repo import known, schema
from hozon.repo.backends.base import Backend
from hozon.repo.index import ChunkIndex, IndexFile, PackRecord, decode_index, encode_index
from hozon.repo.pack import BLOB_TYPES, PackEntry, blob_aad, pack_key, read_header
from hozon.repo.snapshots import FORMAT_VERSION, Snapshot
from hozon.repo.tree import Node, decode_tree

CONFIG = "config"


class Repository:
    def __init__(self, backend: Backend, master: MasterKey, config: dict[str, Any], key_name: str) -> None:
        self.backend = backend
        self.master = master
        self.config = config
        self.key_name = key_name
        self.cipher = master.cipher()
        self.index = ChunkIndex()
        self.index_files: list[str] = []

    # -- creating and opening -------------------------------------------------------------------
    @classmethod
    def init(cls, backend: Backend, password: str | None, encrypted: bool = True) -> Repository:
        """Create a repository; the config, written last, is what makes it one.

        An init that failed before its config was written (a full disk) left only key files: they
        protect nothing, so a second init removes them and starts again.
        """
        if backend.exists(CONFIG):
            raise RepositoryExists(backend.location)
        leftovers = sorted(e.key for e in backend.list("keys"))
        if leftovers and any(any(True for _ in backend.list(p)) for p in ("data", "index", "snapshots")):
            raise RepositoryExists(backend.location)  # a repository that lost its config: not ours to clear
        master = MasterKey.generate(encrypted)
        key_name = _store_key(backend, master, password)
        for key in leftovers:
            backend.delete(key)
        repo_id = os.urandom(16).hex()
        config = {"version": FORMAT_VERSION, "id": repo_id, "encrypted": encrypted}
        repo = cls(backend, master, config, key_name)
        backend.put(CONFIG, repo.seal(json.dumps(config).encode(), b"config"))
        known.remember(backend.location, repo_id, encrypted)
        return repo

    @classmethod
    def open(cls, backend: Backend, password: str | None) -> Repository:
        """Open with the first key that the password opens and that authenticates the config.

        Key files are not authenticated (anyone who can write the repository can add one), so a key
        that opens but does not seal this config (copied from another repository) is passed over.
        The repository must then be what this client knew at this location (``repo.known``).
        """
        try:
            sealed_config = backend.get(CONFIG)
        except ObjectNotFound as exc:
            raise RepositoryNotFound(backend.location) from exc
        wrong: WrongPassword | None = None
        damaged: CorruptData | None = None  # a key file that is no key: named only if no key fits
        config_problem: CorruptData | None = None
        for key in sorted(e.key for e in backend.list("keys")):
            try:
                master = _unlock_key(backend, key, password)
            except ObjectNotFound:
                continue  # removed by a password change while we listed
            except WrongPassword as exc:
                wrong = exc
                continue
            except CorruptData as exc:
                damaged = exc
                continue
            repo = cls(backend, master, {}, key.rsplit("/", 1)[-1])
            try:
                repo.config = _check_config(repo.unseal(CONFIG, sealed_config, b"config"), master)
            except CorruptData as exc:
                config_problem = exc  # a key of another repository, or a damaged config
                continue
            known.vouch(backend.location, repo.config["id"], master.encrypted, password_given=password is not None)
            return repo
        raise config_problem or wrong or damaged or CorruptData("keys/", "the repository has no key file")

    @staticmethod
    def needs_password(backend: Backend) -> bool:
        """False only when every readable key file is unencrypted (--insecure-no-encryption).

        A key file anyone added cannot turn the password off: one encrypted key is enough to ask.
        """
        kinds: set[str] = set()
        for key, _size in backend.list("keys"):
            try:
                kinds.add(schema.key_file(schema.parse_json(backend.get(key)))["kdf"])
            except (schema.Invalid, ObjectNotFound):
                continue
        return kinds != {"none"}

    def change_password(self, new_password: str) -> str:
        """Add a key file for the new password, then remove the old one; data is not touched.

        An empty password is refused (by ``wrap_master_key``) before anything is written.
        """
        new_key = _store_key(self.backend, self.master, new_password)
        self.backend.delete(f"keys/{self.key_name}")
        self.key_name = new_key
        return new_key

    # -- sealed files ---------------------------------------------------------------------------
    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return self.cipher.seal(compress.compress(plaintext), aad)

    def unseal(self, key: str, data: bytes, aad: bytes) -> bytes:
        try:
            return compress.decompress(self.cipher.open(data, aad))
        except AuthenticationFailed as exc:
            raise CorruptData(key, f"it does not authenticate ({exc}; truncated or altered)") from exc
        except Exception as exc:  # zstd errors have no common base class
            raise CorruptData(key, f"it does not decompress ({exc})") from exc

    def load_file(self, key: str, aad: bytes) -> bytes:
        try:
            data = self.backend.get(key)
        except ObjectNotFound as exc:
            raise CorruptData(key, "the file is missing") from exc
        return self.unseal(key, data, aad)

    def save_content_addressed(self, prefix: str, plaintext: bytes, aad: bytes) -> str:
        """Write a sealed file named by the hash of its stored bytes; returns the name."""
        data = self.seal(plaintext, aad)
        name = content_name(data)
        self.backend.put(f"{prefix}/{name}", data)
        return name

    # -- index ----------------------------------------------------------------------------------
    def load_index(self) -> None:
        for attempt in range(3):
            self.index_files = sorted(e.key.rsplit("/", 1)[-1] for e in self.backend.list("index"))
            try:
                self.index.load(self.decode_index_file(name) for name in self.index_files)
                return
            except CorruptData as exc:
                # A prune replaced the index while we read it (new files are written before old
                # ones go): list again. A file missing twice more is damage.
                if attempt == 2 or not exc.path.startswith("index/") or self.backend.exists(exc.path):
                    raise

    def decode_index_file(self, name: str) -> IndexFile:
        key = f"index/{name}"
        return decode_index(key, self.load_file(key, b"index"))

    def read_index_file(self, name: str) -> list[PackRecord]:
        return self.decode_index_file(name).records()

    def write_index(self, packs: list[PackRecord]) -> str:
        name = self.save_content_addressed("index", encode_index(packs), b"index")
        self.index_files.append(name)
        return name

    def list_packs(self) -> Iterator[str]:
        for key, _size in self.backend.list("data"):
            yield key.rsplit("/", 1)[-1]

    def read_pack(self, name: str) -> tuple[bytes, list[PackEntry]]:
        """A whole pack and its parsed header (packs are ~16 MiB, so one read is cheapest)."""
        key = pack_key(name)
        try:
            data = self.backend.get(key)
        except ObjectNotFound as exc:
            raise CorruptData(key, "the pack is missing") from exc
        return data, read_header(self.cipher, key, data, len(data))

    # -- blobs ----------------------------------------------------------------------------------
    def load_blob(self, blob_id: bytes) -> bytes:
        loc = self.index.lookup(blob_id)
        if loc is None:
            raise CorruptData(f"index/ (blob {blob_id.hex()[:16]})", "a referenced blob is in no index")
        key = pack_key(loc.pack)
        try:
            sealed = self.backend.get(key, loc.offset, loc.length)
        except ObjectNotFound as exc:
            raise CorruptData(key, "the pack is missing") from exc
        return self.open_blob(key, sealed, loc.blob_type, blob_id)

    def open_blob(self, key: str, sealed: bytes | memoryview, blob_type: int, blob_id: bytes) -> bytes:
        """Decrypt, decompress and verify one blob read from pack ``key``."""
        what = f"{BLOB_TYPES.get(blob_type, '?')} blob {blob_id.hex()[:16]}"
        if len(sealed) == 0:
            raise CorruptData(key, f"{what} lies past the end of the file (truncated)")
        try:
            plain = compress.decompress(self.cipher.open(sealed, blob_aad(blob_type, blob_id)))
        except AuthenticationFailed as exc:
            raise CorruptData(key, f"{what} does not authenticate ({exc})") from exc
        except Exception as exc:
            raise CorruptData(key, f"{what} does not decompress ({exc})") from exc
        if self.master.chunk_id(plain) != blob_id:
            raise CorruptData(key, f"{what} does not match its id")
        return plain

    def load_tree(self, tree_id: str) -> list[Node]:
        try:
            blob_id = bytes.fromhex(tree_id)
        except ValueError as exc:
            raise CorruptData(f"tree {tree_id[:16]!r}", "a tree id is not hexadecimal") from exc
        data = self.load_blob(blob_id)
        try:
            return decode_tree(data)
        except schema.Invalid as exc:
            loc = self.index.lookup(blob_id)
            where = pack_key(loc.pack) if loc else "index/"
            raise CorruptData(where, f"tree blob {tree_id[:16]} is not a valid tree ({exc})") from exc

    # -- snapshots ------------------------------------------------------------------------------
    def save_snapshot(self, snapshot: Snapshot) -> str:
        snapshot.id = self.save_content_addressed(
            "snapshots", json.dumps(snapshot.to_json()).encode(), b"snapshot"
        )
        return snapshot.id

    def load_snapshot(self, snapshot_id: str) -> Snapshot:
        key = f"snapshots/{snapshot_id}"
        try:
            return Snapshot.decode(self.load_file(key, b"snapshot"), snapshot_id)
        except schema.Invalid as exc:
            raise CorruptData(key, f"it is not a valid snapshot ({exc})") from exc

    def snapshot_ids(self) -> list[str]:
        return sorted(e.key.rsplit("/", 1)[-1] for e in self.backend.list("snapshots"))

    def list_snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest first; a damaged snapshot file raises (prune must not guess)."""
        snaps = [self.load_snapshot(i) for i in self.snapshot_ids()]
        return sorted(snaps, key=lambda s: s.datetime)

    def readable_snapshots(self) -> tuple[list[Snapshot], list[CorruptData]]:
        """The snapshots that can be read, oldest first, and what is wrong with the others."""
        snaps: list[Snapshot] = []
        damaged: list[CorruptData] = []
        for snapshot_id in self.snapshot_ids():
            try:
                snaps.append(self.load_snapshot(snapshot_id))
            except CorruptData as exc:
                damaged.append(exc)
        return sorted(snaps, key=lambda s: s.datetime), damaged

    def resolve_snapshot(self, ref: str) -> Snapshot:
        """A snapshot from a full id, a unique id prefix, or ``latest`` (optionally ``latest:PATH``)."""
        if ref == "latest" or ref.startswith("latest:"):
            snaps, damaged = self.readable_snapshots()
            if damaged:  # its time is unknown: it might be the latest one
                raise damaged[0]
            if ref.startswith("latest:"):
                path = ref.split(":", 1)[1]
                snaps = [s for s in snaps if path in s.paths or s.extra.get("vm") == path]
            if not snaps:
                raise SnapshotNotFound(ref)
            return snaps[-1]
        matches = [i for i in self.snapshot_ids() if i.startswith(ref)]
        if len(matches) != 1 or not ref:
            if len(matches) > 1:
                raise HozonError(f"snapshot id {ref!r} is ambiguous; give more characters")
            raise SnapshotNotFound(ref)
        return self.load_snapshot(matches[0])

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.backend.delete(f"snapshots/{snapshot_id}")


def _unlock_key(backend: Backend, key: str, password: str | None) -> MasterKey:
    """The master key in key file ``key``; WrongPassword, or CorruptData for a file that is no key."""
    try:
        doc = schema.key_file(schema.parse_json(backend.get(key)))
        master = MasterKey.from_json(schema.MASTER_KEY(schema.parse_json(unwrap_key(doc, password))))
    except (schema.Invalid, ValueError) as exc:  # ValueError: KDF parameters Argon2 refuses
        raise CorruptData(key, f"it is not a key file ({exc})") from exc
    if master.encrypted != (doc["kdf"] != "none"):
        raise CorruptData(key, "its key's encryption does not match how the key file is protected")
    return master


def _check_config(plaintext: bytes, master: MasterKey) -> dict[str, Any]:
    try:
        config = schema.CONFIG(schema.parse_json(plaintext))
    except schema.Invalid as exc:
        raise CorruptData(CONFIG, f"it is not a valid config ({exc})") from exc
    if config["version"] > FORMAT_VERSION:
        raise HozonError(f"repository format {config['version']} is newer than this Hozon reads",
                         hint="use a newer Hozon")
    if config["encrypted"] != master.encrypted:
        raise CorruptData(CONFIG, "it does not agree with the repository's key on whether data is encrypted")
    return config


def _store_key(backend: Backend, master: MasterKey, password: str | None) -> str:
    body = json.dumps(wrap_master_key(master, password)).encode()
    name = content_name(body)
    backend.put(f"keys/{name}", body)
    return name
