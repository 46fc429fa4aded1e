"""Index memory and prune-planning time at repository scale, on a synthetic index.

    python bench/index_memory.py --chunks 10000000

Writes a real (encrypted) repository whose index files list N random chunk ids (64 blobs per pack,
as ~1 MiB chunks in 64 MiB of packs would give; the packs themselves are not written), then, in a
fresh process, loads that index as backup, check and prune do and measures: resident memory of the
index, the process's peak RSS, load time, single-id lookups per second, and the core of prune's plan
— marking the chunks that snapshots use (70% here) and summing used bytes per pack.
Writes bench/results/index-<time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from hozon.repo.backends.local import LocalBackend
from hozon.repo.index import ENTRY_DTYPE, PackRecord
from hozon.repo.repository import Repository

BLOBS_PER_PACK = 64
BLOBS_PER_INDEX_FILE = 100_000
PASSWORD = "bench"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(work: Path, n: int) -> None:
    """A repository whose index names n chunks (made once, then reused)."""
    marker = work / f"built-{n}"
    if marker.exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    for child in work.iterdir():
        if child.is_file():
            child.unlink()
    repo_dir = work / "repo"
    if repo_dir.exists():
        subprocess.run(["rm", "-rf", str(repo_dir)], check=True)
    repo = Repository.init(LocalBackend(repo_dir), PASSWORD)
    rng = np.random.default_rng(42)
    for start in range(0, n, BLOBS_PER_INDEX_FILE):
        count = min(BLOBS_PER_INDEX_FILE, n - start)
        entries = np.zeros(count, ENTRY_DTYPE)
        entries["id"] = np.frombuffer(rng.bytes(32 * count), "V32")
        entries["offset"] = (np.arange(count) % BLOBS_PER_PACK) * (1 << 20)
        entries["length"] = entries["raw_length"] = 1 << 20
        repo.write_index([PackRecord(rng.bytes(32).hex(), entries[i : i + BLOBS_PER_PACK])
                          for i in range(0, count, BLOBS_PER_PACK)])
    marker.touch()


def measure(repo_dir: Path) -> dict[str, float]:
    """Runs in a fresh process: what loading and planning cost there."""
    repo = Repository.open(LocalBackend(repo_dir), PASSWORD)
    base = rss_bytes()
    t0 = time.perf_counter()
    repo.load_index()
    load_s = time.perf_counter() - t0
    index = repo.index
    n = len(index)
    after = rss_bytes()

    rng = np.random.default_rng(7)
    rows = rng.integers(0, n, 100_000)
    sample = [int(index.hi[i]).to_bytes(8, "big") + int(index.lo[i]).to_bytes(8, "big") + bytes(16) for i in rows]
    t0 = time.perf_counter()
    assert all(index.has_live(b) for b in sample)
    lookups = len(sample) / (time.perf_counter() - t0)

    # Prune's plan: look up the chunks snapshots use (in batches, as a tree walk gives them), mark
    # them, then used bytes per pack.
    chosen = np.flatnonzero(rng.random(n) < 0.7)
    t0 = time.perf_counter()
    used = np.zeros(n, bool)
    for start in range(0, len(chosen), 1_000_000):
        batch = chosen[start : start + 1_000_000]
        ids = np.zeros((len(batch), 32), np.uint8)
        ids[:, :8] = index.hi[batch].astype(">u8").view(np.uint8).reshape(-1, 8)
        ids[:, 8:16] = index.lo[batch].astype(">u8").view(np.uint8).reshape(-1, 8)
        found = index.positions(ids)
        used[found[found >= 0]] = True
    used_bytes = np.bincount(index.pack, weights=index.length * used, minlength=len(index.packs))
    total_bytes = np.bincount(index.pack, weights=index.length, minlength=len(index.packs))
    partly = int(((used_bytes > 0) & (used_bytes < total_bytes)).sum())
    plan_s = time.perf_counter() - t0
    return {
        "chunks": n, "packs": len(index.packs), "packs_partly_used": partly,
        "index_bytes_per_chunk": index.memory_bytes() / n,
        "index_rss_mib": (after - base) / 2**20,
        "index_rss_mib_per_million": (after - base) / 2**20 / (n / 1e6),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_s": load_s, "lookups_per_s": lookups, "prune_plan_s": plan_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10_000_000)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "index")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    t0 = time.perf_counter()
    build(args.work, args.chunks)
    print(f"synthetic repository ready in {time.perf_counter() - t0:.1f} s")
    out = subprocess.run([sys.executable, __file__, "--measure", str(args.work / "repo")],
                         check=True, capture_output=True, text=True).stdout
    m = json.loads(out)
    result = {"time": datetime.now(UTC).isoformat(),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, **m}
    path = Path(__file__).parent / "results" / f"index-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    rows = [
        ("chunks in the index", f"{m['chunks']:,}"),
        ("index bytes per chunk (columns)", f"{m['index_bytes_per_chunk']:.1f}"),
        ("index RSS (MiB)", f"{m['index_rss_mib']:.0f}"),
        ("index RSS per million chunks (MiB)", f"{m['index_rss_mib_per_million']:.1f}"),
        ("process peak RSS while loading (MiB)", f"{m['peak_rss_mib']:.0f}"),
        ("load, decrypt and sort (s)", f"{m['load_s']:.1f}"),
        ("single lookups per second", f"{m['lookups_per_s']:,.0f}"),
        ("prune plan: mark 70% + per pack (s)", f"{m['prune_plan_s']:.1f}"),
    ]
    for name, value in rows:
        print(f"{name:<40}{value:>14}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
