from __future__ import annotations

import os

import numpy as np

from hozon.repo.index import ENTRY_DTYPE, ChunkIndex, IndexFile, PackRecord, decode_index, encode_index


def _record(name: str, ids: list[bytes], condemned_at: int = 0) -> PackRecord:
    entries = np.zeros(len(ids), ENTRY_DTYPE)
    for i, blob_id in enumerate(ids):
        entries[i] = (0, blob_id, i * 100, 100, 90)
    return PackRecord(name, entries, condemned_at)


def test_index_file_round_trip() -> None:
    ids = [os.urandom(32) for _ in range(5)]
    records = [_record("ab" * 32, ids[:3]), _record("cd" * 32, ids[3:], condemned_at=123)]
    decoded = decode_index("index/x", encode_index(records)).records()
    assert [r.name for r in decoded] == ["ab" * 32, "cd" * 32]
    assert decoded[1].condemned_at == 123
    assert bytes(decoded[0].entries[2]["id"]) == ids[2]


def test_lookup_finds_every_blob_and_nothing_else() -> None:
    ids = [os.urandom(32) for _ in range(2000)]
    index = ChunkIndex()
    index.load([IndexFile.from_records([_record("aa" * 32, ids[:1000])]),
                IndexFile.from_records([_record("bb" * 32, ids[1000:])])])
    for i, blob_id in enumerate(ids):
        loc = index.lookup(blob_id)
        assert loc is not None and loc.pack == ("aa" * 32 if i < 1000 else "bb" * 32)
        assert loc.offset == (i % 1000) * 100
    assert index.lookup(os.urandom(32)) is None
    found = index.positions(np.frombuffer(b"".join([*ids[:10], os.urandom(32)]), np.uint8).reshape(-1, 32))
    assert (found[:10] >= 0).all() and found[10] == -1


def test_condemned_blobs_serve_reads_but_not_deduplication() -> None:
    live, dead = os.urandom(32), os.urandom(32)
    index = ChunkIndex()
    index.load([IndexFile.from_records([_record("aa" * 32, [live]), _record("bb" * 32, [dead], condemned_at=5)])])
    assert index.has_live(live) and not index.has_live(dead)
    assert index.lookup(dead) is not None


def test_a_live_listing_wins_over_a_condemned_one() -> None:
    blob = os.urandom(32)
    index = ChunkIndex()
    index.load([IndexFile.from_records([_record("aa" * 32, [blob], condemned_at=5)]),
                IndexFile.from_records([_record("aa" * 32, [blob])])])
    assert index.has_live(blob) and not index.condemned


def test_a_blob_in_a_condemned_and_a_live_pack_is_read_from_the_live_one() -> None:
    blob = os.urandom(32)
    index = ChunkIndex()
    index.load([IndexFile.from_records([_record("aa" * 32, [blob], condemned_at=5)]),
                IndexFile.from_records([_record("bb" * 32, [blob])])])
    assert len(index) == 1
    loc = index.lookup(blob)
    assert loc is not None and loc.pack == "bb" * 32 and index.has_live(blob)


def test_live_mask_answers_as_has_live_does_for_many_ids_at_once() -> None:
    live, dead, pending, unknown = (os.urandom(32) for _ in range(4))
    index = ChunkIndex()
    index.load([IndexFile.from_records([_record("aa" * 32, [live]), _record("bb" * 32, [dead], condemned_at=5)])])
    index.add(pending, "cc" * 32, 0, 100, 0)  # stored by the running backup, not yet in an index file
    ids = [live, dead, pending, unknown, live]
    mask = index.live_mask(np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32))
    assert mask.tolist() == [index.has_live(i) for i in ids] == [True, False, True, False, True]
