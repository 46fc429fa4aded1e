"""The shape of every JSON document Hozon reads back, checked once where it is decoded.

A file that authenticates can still hold the wrong shape: another Hozon version or a bug may have
written it. Each document type has a schema here. Checking one returns its known fields with the
JSON types the code relies on; unknown fields are dropped (or, for the open-ended ``summary`` and
``extra`` of a snapshot, kept as they are), so a newer Hozon may add fields without breaking an
older one. A wrong field raises ``Invalid`` saying which, and the caller reports the file as damaged.
"""

from __future__ import annotations

import base64
import binascii
import json
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Check = Callable[[Any], Any]  # value → the value, or raise Invalid

_HEX = frozenset(string.hexdigits)


class Invalid(ValueError):
    """A decoded document does not have the shape its type needs; the message names the field."""

    def __init__(self, problem: str, where: str = "") -> None:
        super().__init__(f"{where or 'the document'} {problem}")
        self.problem = problem
        self.where = where

    def inside(self, outer: str) -> Invalid:
        """The same problem, one level further out (``outer`` is a field name or ``[i]``)."""
        inner = self.where if not self.where or self.where.startswith("[") else f".{self.where}"
        return Invalid(self.problem, outer + inner)


def parse_json(data: bytes | str) -> Any:
    """JSON text → value; anything that is not JSON (or nests absurdly deep) is Invalid."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Invalid(f"is not JSON ({exc})") from exc


def _wrong(expected: str, value: Any) -> Invalid:
    shown = "null" if value is None else type(value).__name__
    return Invalid(f"is {shown}, not {expected}")


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value: Any) -> int:
        if type(value) is not int:  # bool is an int subclass: not accepted
            raise _wrong("an integer", value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise Invalid(f"is {value}, out of range")
        return value

    return check


def number(value: Any) -> float:
    if type(value) not in (int, float):
        raise _wrong("a number", value)
    return value  # type: ignore[no-any-return]  # an int stays an int in listings


def text(value: Any) -> str:
    if type(value) is not str:
        raise _wrong("a string", value)
    return value


def flag(value: Any) -> bool:
    if type(value) is not bool:
        raise _wrong("true or false", value)
    return value


def hex_id(nbytes: int) -> Check:
    def check(value: Any) -> str:
        if type(value) is not str or len(value) != 2 * nbytes or not _HEX.issuperset(value):
            raise Invalid(f"is not a {2 * nbytes}-digit hexadecimal id")
        return value

    return check


def base64_bytes(nbytes: int | None = None) -> Check:
    def check(value: Any) -> str:
        encoded = text(value)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise Invalid("is not base64") from exc
        if nbytes is not None and len(raw) != nbytes:
            raise Invalid(f"holds {len(raw)} bytes, not {nbytes}")
        return encoded

    return check


def timestamp(value: Any) -> str:
    """ISO 8601 with a time zone: snapshots are sorted by it, and naive and aware times do not compare."""
    shown = text(value)
    try:
        parsed = datetime.fromisoformat(shown)
    except ValueError as exc:
        raise Invalid("is not an ISO 8601 time") from exc
    if parsed.tzinfo is None:
        raise Invalid("has no time zone")
    return shown


def one_of(*allowed: str) -> Check:
    def check(value: Any) -> str:
        if value not in allowed:
            raise Invalid(f"is {value!r}, not one of {', '.join(allowed)}")
        return text(value)

    return check


def optional(inner: Check) -> Check:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def list_of(item: Check) -> Check:
    def check(value: Any) -> list[Any]:
        if type(value) is not list:
            raise _wrong("a list", value)
        out: list[Any] = []
        try:
            for v in value:
                out.append(item(v))
        except Invalid as exc:
            raise exc.inside(f"[{len(out)}]") from None
        return out

    return check


def map_of(item: Check) -> Check:
    def check(value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise _wrong("an object", value)
        out: dict[str, Any] = {}
        for key, v in value.items():
            try:
                out[key] = item(v)
            except Invalid as exc:
                raise exc.inside(key) from None
        return out

    return check


@dataclass(frozen=True)
class Record:
    """A JSON object with known fields; ``keep_unknown`` keeps the others unchecked."""

    fields: Mapping[str, Check]
    required: tuple[str, ...] = ()
    keep_unknown: bool = False

    def __call__(self, value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise _wrong("an object", value)
        for key in self.required:
            if key not in value:
                raise Invalid(f"lacks {key}")
        out: dict[str, Any] = {}
        for key, v in value.items():
            check = self.fields.get(key)
            if check is not None:
                try:
                    out[key] = check(v)
                except Invalid as exc:
                    raise exc.inside(key) from None
            elif self.keep_unknown:
                out[key] = v
        return out


def record(required: Mapping[str, Check], optional_fields: Mapping[str, Check] | None = None,
           keep_unknown: bool = False) -> Record:
    return Record({**required, **(optional_fields or {})}, tuple(required), keep_unknown)


BLOB_ID = hex_id(32)

CONFIG = record({"version": integer(1), "id": hex_id(16), "encrypted": flag})

KEY_NONE = record({"kdf": one_of("none"), "master": base64_bytes()})
KEY_ARGON2ID = record({
    "kdf": one_of("argon2id"), "salt": base64_bytes(), "wrapped": base64_bytes(),
    # Bounded: key files are not authenticated, and a huge cost would stall every command.
    "memory_kib": integer(8, 1 << 20), "iterations": integer(1, 64), "lanes": integer(1, 64),
})
MASTER_KEY = record({
    "encryption_key": base64_bytes(32), "id_key": base64_bytes(32), "chunker_seed": integer(0, (1 << 32) - 1),
    "encrypted": flag,
})


def key_file(value: Any) -> dict[str, Any]:
    """A key file: the master key wrapped by a password (argon2id) or, unencrypted, in the clear."""
    kdf = value.get("kdf") if type(value) is dict else None
    if kdf == "none":
        return KEY_NONE(value)
    if kdf == "argon2id":
        return KEY_ARGON2ID(value)
    if type(value) is not dict:
        raise _wrong("an object", value)
    raise Invalid(f"is {kdf!r}, not a key derivation this Hozon knows", "kdf")


LOCK = record({
    "kind": text, "hostname": text, "pid": integer(0), "command": text, "started": number, "refreshed": number,
})


def _extent(value: Any) -> list[int]:
    pair: list[int] = list_of(integer())(value)
    if len(pair) != 2:
        raise Invalid("is not an [offset, length] pair")
    return pair


# Only JSON types are checked here (and ids, which prune and check turn into bytes): values that are
# hostile but well-typed (a negative uid, a name with '/') cost their own entry at restore time.
_INT = integer()
NODE = record(
    {"name": text, "type": text},
    {
        **dict.fromkeys(("mode", "uid", "gid", "mtime_ns", "ctime_ns", "inode", "device", "links", "size",
                         "rdev"), _INT),
        "user": text, "group": text, "content": list_of(BLOB_ID), "extents": optional(list_of(_extent)),
        "subtree": optional(BLOB_ID), "target": optional(text), "xattrs": map_of(text),
    },
)
TREE = record({"nodes": list_of(NODE)})

_MAPPED = {"maps": list_of(BLOB_ID)}
DISK = record({"name": text, "size": integer(0), "chunk_size": integer(1), **_MAPPED}, keep_unknown=True)
STATE = record({**_MAPPED, "lengths": base64_bytes()}, {"size": integer(0), "chunks": integer(0)},
               keep_unknown=True)
EXTRA = record({}, {
    "vm": text, "disks": list_of(DISK), "state": STATE,
    **{k: optional(text) for k in ("source", "qemu_version", "consistency", "vm_config", "domain_xml",
                                   "running_xml", "machine", "qemu_binary")},
}, keep_unknown=True)

SNAPSHOT = record(
    {"time": timestamp, "hostname": text, "paths": list_of(text), "kind": text},
    {
        "version": integer(1), "tree": optional(BLOB_ID), "tags": list_of(text), "parent": optional(text),
        "username": text, "program_version": text, "summary": map_of(number), "extra": EXTRA,
    },
)


def snapshot(value: Any) -> dict[str, Any]:
    """A snapshot file: a file snapshot names its root tree; an image snapshot describes disks in extra."""
    doc = SNAPSHOT(value)
    if doc["kind"] == "files" and doc.get("tree") is None:
        raise Invalid("is null in a files snapshot", "tree")
    return doc
