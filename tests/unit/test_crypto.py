from __future__ import annotations

import json

import pytest

from hozon.crypto import AuthenticationFailed, MasterKey, unwrap_key, wrap_master_key
from hozon.errors import UsageError, WrongPassword


@pytest.mark.parametrize("encrypted", [True, False])
def test_sealed_blob_opens_and_any_flipped_bit_is_detected(encrypted: bool) -> None:
    cipher = MasterKey.generate(encrypted).cipher()
    sealed = cipher.seal(b"payload" * 100, b"aad")
    assert cipher.open(sealed, b"aad") == b"payload" * 100
    for pos in (0, len(sealed) // 2, len(sealed) - 1):
        damaged = bytearray(sealed)
        damaged[pos] ^= 1
        with pytest.raises(AuthenticationFailed):
            cipher.open(bytes(damaged), b"aad")
    with pytest.raises(AuthenticationFailed):
        cipher.open(sealed, b"other aad")
    with pytest.raises(AuthenticationFailed):
        cipher.open(sealed[:-5], b"aad")


def test_encrypted_blob_does_not_contain_the_plaintext() -> None:
    cipher = MasterKey.generate(True).cipher()
    assert b"secret-marker" not in cipher.seal(b"secret-marker" * 10, b"")


def test_key_file_opens_with_its_password_only() -> None:
    master = MasterKey.generate(True)
    doc = wrap_master_key(master, "right")
    assert MasterKey.from_json(json.loads(unwrap_key(doc, "right"))) == master
    for wrong in ("wrong", "", None):
        with pytest.raises(WrongPassword):
            unwrap_key(doc, wrong)


@pytest.mark.parametrize("password", ["", None])
def test_an_encrypted_key_is_never_wrapped_without_a_password(password: str | None) -> None:
    with pytest.raises(UsageError, match="empty password"):
        wrap_master_key(MasterKey.generate(True), password)


def test_chunk_ids_depend_on_the_repository_key() -> None:
    a, b = MasterKey.generate(), MasterKey.generate()
    assert a.chunk_id(b"x") == a.chunk_id(b"x") != b.chunk_id(b"x")
