"""Keys, chunk ids and blob sealing: the repository's cryptography in one place.

A repository has one random master key. Its parts: an AES-256-GCM key that seals every blob, a
BLAKE3 key that turns plaintext into chunk ids (keyed, so ids reveal nothing about content to
someone without the key), and a seed that makes FastCDC's cut points repository-specific.
Key files hold the master key wrapped by a key derived from the password with Argon2id, so
changing the password rewrites one small file and no data.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from hozon.errors import UsageError, WrongPassword

ID_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

# Argon2id at 64 MiB, t=3, p=4 takes ~0.1-0.2 s here: slow for guessing, quick for a user.
KDF_MEMORY_KIB = 64 * 1024
KDF_ITERATIONS = 3
KDF_LANES = 4


class AuthenticationFailed(Exception):
    """A sealed blob failed its integrity check; callers turn this into CorruptData with a path."""


@dataclass(frozen=True)
class MasterKey:
    encryption_key: bytes
    id_key: bytes
    chunker_seed: int
    encrypted: bool

    @classmethod
    def generate(cls, encrypted: bool = True) -> MasterKey:
        return cls(os.urandom(32), os.urandom(32), int.from_bytes(os.urandom(4), "big"), encrypted)

    def to_json(self) -> dict[str, Any]:
        return {
            "encryption_key": _b64(self.encryption_key),
            "id_key": _b64(self.id_key),
            "chunker_seed": self.chunker_seed,
            "encrypted": self.encrypted,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MasterKey:
        """From the master-key JSON inside a key file, once ``repo.schema.MASTER_KEY`` checked it."""
        return cls(
            _unb64(doc["encryption_key"]), _unb64(doc["id_key"]), int(doc["chunker_seed"]), bool(doc["encrypted"])
        )

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """The content address of a plaintext: keyed BLAKE3, 32 bytes."""
        return blake3.blake3(data, key=self.id_key).digest()

    def cipher(self) -> BlobCipher:
        return AeadCipher(self.encryption_key) if self.encrypted else MacOnlyCipher(self.id_key)


class BlobCipher:
    """Seals and opens blobs; ``aad`` binds a blob to its id and type so blobs cannot be swapped."""

    overhead: int

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def open(self, sealed: bytes | memoryview, aad: bytes) -> bytes:
        raise NotImplementedError


class AeadCipher(BlobCipher):
    """AES-256-GCM with a random 96-bit nonce per blob: nonce || ciphertext || tag."""

    overhead = NONCE_SIZE + TAG_SIZE

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes | memoryview, aad: bytes) -> bytes:
        view = memoryview(sealed)
        if len(view) < self.overhead:
            raise AuthenticationFailed("blob shorter than its nonce and tag")
        try:
            return self._aead.decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], aad)
        except InvalidTag as exc:
            raise AuthenticationFailed("authentication tag mismatch") from exc


class MacOnlyCipher(BlobCipher):
    """For ``--insecure-no-encryption``: plaintext readable on disk, still protected against bit rot."""

    overhead = TAG_SIZE

    def __init__(self, mac_key: bytes) -> None:
        self._key = mac_key

    def _mac(self, data: bytes | memoryview, aad: bytes) -> bytes:
        h = blake3.blake3(aad, key=self._key)
        h.update(data)
        return h.digest(length=TAG_SIZE)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return plaintext + self._mac(plaintext, aad)

    def open(self, sealed: bytes | memoryview, aad: bytes) -> bytes:
        view = memoryview(sealed)
        if len(view) < TAG_SIZE or self._mac(view[:-TAG_SIZE], aad) != bytes(view[-TAG_SIZE:]):
            raise AuthenticationFailed("checksum mismatch")
        return bytes(view[:-TAG_SIZE])


def content_name(stored: bytes | memoryview) -> str:
    """The name of a write-once repository file: unkeyed BLAKE3-256 (hex) of its stored bytes.

    Anyone can verify a file against its name without the key; BLAKE3 is 2-4x faster than SHA-256 here.
    """
    return blake3.blake3(stored, max_threads=blake3.blake3.AUTO).hexdigest()


def wrap_master_key(master: MasterKey, password: str | None) -> dict[str, Any]:
    """The content of a key file: the master key sealed under an Argon2id-derived key.

    An empty password is refused: it would make a key file anyone can open, an encrypted
    repository in name only.
    """
    body = json.dumps(master.to_json()).encode()
    if not master.encrypted:
        return {"kdf": "none", "master": _b64(body)}
    if not password:
        raise UsageError("an empty password is not allowed: it would leave the repository's key unprotected")
    salt = os.urandom(16)
    params = {"memory_kib": KDF_MEMORY_KIB, "iterations": KDF_ITERATIONS, "lanes": KDF_LANES}
    kek = _derive(password, salt, params)
    return {"kdf": "argon2id", "salt": _b64(salt), **params, "wrapped": _b64(AeadCipher(kek).seal(body, b"key"))}


def unwrap_key(doc: dict[str, Any], password: str | None) -> bytes:
    """The master key's JSON from a key file ``repo.schema.key_file`` checked.

    Raises WrongPassword when the password does not open it, ValueError for KDF parameters Argon2
    refuses.
    """
    if doc["kdf"] == "none":
        return _unb64(doc["master"])
    params = {k: int(doc[k]) for k in ("memory_kib", "iterations", "lanes")}
    kek = _derive(password or "", _unb64(doc["salt"]), params)
    try:
        return AeadCipher(kek).open(_unb64(doc["wrapped"]), b"key")
    except AuthenticationFailed as exc:
        raise WrongPassword() from exc


def _derive(password: str, salt: bytes, params: dict[str, int]) -> bytes:
    kdf = Argon2id(
        salt=salt, length=32, iterations=params["iterations"], lanes=params["lanes"],
        memory_cost=params["memory_kib"],
    )
    return kdf.derive(password.encode())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)
