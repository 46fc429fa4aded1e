"""Taking back the packs a killed backup stored but never indexed, so the next backup reuses them.

A backup writes packs, then (every few packs, and at its end) an index file naming them. Killed in
between, it leaves packs that no index names: they hold no snapshot's data, but their chunks were
paid for. The next backup reads their headers and indexes them, so what was uploaded before the
kill is not uploaded again ("the next backup simply continues").

This is done only while nobody else holds the repository. During another backup its uploaded but
not yet indexed packs look the same, and during a prune so do the packs it is about to delete
(prune drops a pack from the index before deleting it). A prune that starts later sees our lock
and keeps what we index: packs it condemns after that wait for our backup to end.
"""

from __future__ import annotations

import os

from hozon.errors import CorruptData
from hozon.repo.index import PackRecord
from hozon.repo.locks import list_locks
from hozon.repo.repository import Repository
from hozon.repo.snapshots import this_host
from hozon.repo.writer import pack_record


def adopt_orphan_packs(repo: Repository) -> int:
    """Index the packs in ``data/`` that no index names; returns how many were adopted.

    The repository must be open with its index loaded, under this process's lock. Does nothing
    while any other live lock is held (see the module docstring).
    """
    me = (this_host(), os.getpid())
    if any(not lock.stale and (lock.hostname, lock.pid) != me for lock in list_locks(repo)):
        return 0
    known = set(repo.index.packs)
    records: list[PackRecord] = []
    for name in sorted(set(repo.list_packs()) - known):
        try:
            _data, entries = repo.read_pack(name)
        except CorruptData:
            continue  # not a readable pack: left for check to report and prune to remove
        records.append(pack_record(name, entries))
    if not records:
        return 0
    repo.write_index(records)  # first on disk, then used: a snapshot never names an unindexed blob
    for record in records:
        for row in record.entries:
            repo.index.add(bytes(row["id"]), record.name, int(row["offset"]), int(row["length"]), int(row["type"]))
    return len(records)
