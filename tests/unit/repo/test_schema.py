"""The document schemas: unknown fields dropped, a wrong field named with its path."""

from __future__ import annotations

import base64

import pytest

from hozon.repo import schema


def test_unknown_fields_are_dropped_and_known_ones_kept() -> None:
    doc = schema.LOCK({"kind": "shared", "hostname": "h", "pid": 3, "command": "backup", "started": 1.5,
                       "refreshed": 2, "lease": {"until": 9}})
    assert doc == {"kind": "shared", "hostname": "h", "pid": 3, "command": "backup", "started": 1.5, "refreshed": 2}


def test_open_ended_parts_keep_unknown_fields() -> None:
    extra = schema.EXTRA({"vm": "web1", "future": [1], "disks": [{"name": "vda", "size": 0, "chunk_size": 1,
                                                                   "maps": [], "node": "x"}]})
    assert extra["future"] == [1] and extra["disks"][0]["node"] == "x"


@pytest.mark.parametrize(("doc", "message"), [
    ({"nodes": [{"name": "a", "type": "file", "size": "1"}]}, "nodes[0].size is str, not an integer"),
    ({"nodes": [{"name": "a", "type": "file", "size": True}]}, "nodes[0].size is bool, not an integer"),
    ({"nodes": [{"name": "a", "type": "file", "content": ["ab", "zz"]}]}, "nodes[0].content[0] is not a 64-digit"),
    ({"nodes": [{"name": "a", "type": "file", "extents": [[1, 2, 3]]}]}, "nodes[0].extents[0] is not an [offset"),
    ({"nodes": [{"type": "file"}]}, "nodes[0] lacks name"),
    ({"nodes": None}, "nodes is null, not a list"),
    ([], "the document is list, not an object"),
])
def test_a_wrong_field_is_named_by_its_path(doc: object, message: str) -> None:
    with pytest.raises(schema.Invalid, match=message.replace("[", r"\[").replace("]", r"\]")):
        schema.TREE(doc)


def test_snapshot_times_need_a_time_zone_and_files_snapshots_a_tree() -> None:
    base = {"time": "2030-01-01T00:00:00+00:00", "hostname": "h", "paths": ["/"], "kind": "files", "tree": "a" * 64}
    assert schema.snapshot(base)["tree"] == "a" * 64
    with pytest.raises(schema.Invalid, match="time has no time zone"):
        schema.snapshot({**base, "time": "2030-01-01T00:00:00"})
    with pytest.raises(schema.Invalid, match="tree is null"):
        schema.snapshot({**base, "tree": None})
    assert schema.snapshot({**base, "kind": "vm", "tree": None})["kind"] == "vm"


def test_key_files_are_checked_by_their_kind() -> None:
    master = base64.b64encode(b"{}").decode()
    assert schema.key_file({"kdf": "none", "master": master}) == {"kdf": "none", "master": master}
    with pytest.raises(schema.Invalid, match="kdf is 'scrypt'"):
        schema.key_file({"kdf": "scrypt"})
    with pytest.raises(schema.Invalid, match="memory_kib is 4294967296, out of range"):
        schema.key_file({"kdf": "argon2id", "salt": master, "wrapped": master, "memory_kib": 1 << 32,
                         "iterations": 3, "lanes": 4})
    with pytest.raises(schema.Invalid, match="encryption_key holds 2 bytes, not 32"):
        schema.MASTER_KEY({"encryption_key": master, "id_key": master, "chunker_seed": 1, "encrypted": True})


@pytest.mark.parametrize("data", [b"not json", b"\xff\xfe", b"[" * 100_000])
def test_what_is_not_json_is_invalid(data: bytes) -> None:
    with pytest.raises(schema.Invalid, match="is not JSON"):
        schema.parse_json(data)
