#!/usr/bin/env python3
"""Files benchmark: Hozon vs restic vs borg on a generated tree (~2 GiB in 50,000 files).

Usage (from the repository root, after ``pip install -e .``)::

    python bench/files.py                              # full run: 2 GiB, 50,000 files, all tools
    python bench/files.py --scale 0.01                 # quick smoke run: ~20 MiB, 500 files
    python bench/files.py --tools restic,borg          # choose the tools (default: hozon,restic,borg)
    python bench/files.py --generate-only              # only build (or check) the cached data set
    python bench/files.py --work /mnt/fast/bench       # put data set, repositories and restores elsewhere

What it does:

1. Generates a reproducible data set from a seeded PRNG (``--seed``), cached under
   ``<work>/files/datasets/seed<S>-scale<X>/`` with a marker file so that reruns do not regenerate it:
   text files (words from a generated vocabulary), compressible binaries (structured records),
   random (incompressible) files, a few exact duplicates, empty files and directories, and four large
   files (random or semi-compressible, 100-300 MiB at scale 1) in a nested directory tree.
2. Runs each tool with encryption (fixed password from the environment), interleaved step by step in
   the same run: ``init``, ``initial`` backup, ``unchanged`` re-run, ``modified`` re-run after
   changing 5% of the files in place (deterministic choice: overwritten regions or appended data),
   ``restore`` of the latest snapshot into an empty directory, verified file by file (size + SHA-256)
   against the source. The modified files are put back to their generated state at the next run.
3. Measures per step: wall time, throughput (source bytes / s), repository size (allocated bytes, as
   ``du``), peak RSS (``ru_maxrss`` from ``wait4`` on the tool process, or the sampled PSS sum over
   its process tree if larger, for tools that fork workers) and CPU time. Prints a table and the
   Hozon-vs-restic targets and writes ``bench/results/files-<UTC timestamp>.json``.
   Tool output goes to ``<work>/files/run/logs/<tool>.log``.

The page cache is dropped before every measured step when permitted (root): ``sync; echo 3 >
/proc/sys/vm/drop_caches``. ``--no-drop-caches`` skips it. Tools: ``python -m hozon`` (current
interpreter, ``src/`` on PYTHONPATH), ``restic`` (default ``auto`` compression) and ``borg``
(``repokey-blake2``, ``--compression zstd,3``); a tool that is missing is reported and skipped.
"""

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000

# --- data set shape (at --scale 1) -------------------------------------------------------------------
GENERATOR_VERSION = 1  # bump when generated content changes, to invalidate cached data sets
DEFAULT_SEED = 20_240_601
FULL_FILES = 50_000
FULL_BYTES = 2 * GiB
MIN_FILES = 12
LARGE_FILES: tuple[tuple[str, int], ...] = (
    ("semi", 300 * MiB),
    ("random", 200 * MiB),
    ("semi", 150 * MiB),
    ("random", 100 * MiB),
)
SMALL_KINDS = ("text", "records", "random")
SMALL_KIND_SHARES = (0.45, 0.30, 0.25)  # by file count
SMALL_MEDIAN = 8 * KiB  # log-normal sizes, rescaled to fill the byte budget
SMALL_SIGMA = 1.5
EMPTY_SHARE = 0.005
DUPLICATE_SHARE = 0.02
EMPTY_DIRS = 3
FILES_PER_DIR = 40
MAX_DEPTH = 6
EXTENSIONS = {
    "text": (".txt", ".md", ".log", ".csv", ".html"),
    "records": (".db", ".dat", ".bin", ".idx"),
    "random": (".jpg", ".zip", ".gz", ".mp4", ".zst"),
}
SEMI_SEGMENT = 1 * MiB  # semi-compressible large files are a sequence of 1 MiB segments
SEMI_KINDS = ("random", "records", "text", "zeros", "repeat")
SEMI_SHARES = (0.35, 0.30, 0.20, 0.05, 0.10)
CHUNK = 1 * MiB  # generation buffer
MODIFY_SHARE = 0.05

# --- benchmark ---------------------------------------------------------------------------------------
PASSWORD = "hozon-bench-password"
DATA_DIR_NAME = "data"
ALL_TOOLS = ("hozon", "restic", "borg")
BACKUP_STEPS = ("initial", "unchanged", "modified")
TABLE_STEPS = (*BACKUP_STEPS, "restore")
RSS_TARGET_MIB = 300.0


def log(message: str) -> None:
    """Progress message on stderr (stdout carries the result table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# =====================================================================================================
# Content generation
# =====================================================================================================

LETTER_WEIGHTS = np.array(
    [8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4,
     6.7, 7.5, 1.9, 0.095, 6.0, 6.3, 9.1, 2.8, 0.98, 2.4, 0.15, 2.0, 0.074]
)  # fmt: skip
RECORD_DTYPE = np.dtype(
    [
        ("seq", "<u8"),
        ("ts", "<u8"),
        ("kind", "<u2"),
        ("status", "<u2"),
        ("count", "<u4"),
        ("value", "<f8"),
        ("host", "S16"),
        ("tag", "S8"),
        ("reserved", "<u8"),
    ]
)  # 64 bytes


def chunk_sizes(total: int, chunk: int = CHUNK) -> Iterator[int]:
    """Split ``total`` bytes into pieces of at most ``chunk`` bytes."""
    done = 0
    while done < total:
        n = min(chunk, total - done)
        yield n
        done += n


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` incompressible bytes (``Generator.integers`` on uint64 is ~5x faster than ``bytes``)."""
    words = rng.integers(0, 2**64, size=(n + 7) // 8, dtype=np.uint64, endpoint=False)
    return words.view(np.uint8)[:n]


class Vocabulary:
    """Generated words with Zipf-like frequencies, laid out for vectorised text generation.

    Each token (a word plus a trailing space) is a row of a fixed-width matrix with a mask of its
    used bytes; sampling is a lookup in a table holding each token in proportion to its frequency.
    """

    WIDTH = 16  # longest word (14) + space fits
    TABLE_SIZE = 1 << 20

    def __init__(self, seed: int, size: int = 20_000) -> None:
        rng = np.random.default_rng([seed, 10])
        lengths = np.clip(rng.poisson(4.0, size) + 1, 1, self.WIDTH - 2).astype(np.int64)
        probabilities = LETTER_WEIGHTS / LETTER_WEIGHTS.sum()
        letters = rng.choice(26, size=int(lengths.sum()), p=probabilities).astype(np.uint8) + ord("a")
        rows = np.repeat(np.arange(size), lengths)
        cols = np.arange(letters.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.tokens = np.full((size, self.WIDTH), ord(" "), dtype=np.uint8)
        self.tokens[rows, cols] = letters
        self.lengths = lengths
        mask = np.arange(self.WIDTH) <= lengths[:, None]  # the word and one space
        # Rows as pairs of uint64: np.take on them is much faster than fancy-indexing 16 uint8 columns.
        self.token_rows = self.tokens.view(np.uint64)
        self.mask_rows = mask.view(np.uint64)
        weights = 1.0 / (np.arange(1, size + 1) + 2.7) ** 1.07
        weights /= weights.sum()
        counts = np.maximum(1, np.round(weights * self.TABLE_SIZE)).astype(np.int64)
        self.table = np.repeat(np.arange(size, dtype=np.int32), counts)
        self.mean_token = float((counts * (lengths + 1)).sum() / counts.sum())

    def word(self, index: int) -> str:
        """The ``index``-th word (frequent words have small indices)."""
        return bytes(self.tokens[index, : self.lengths[index]]).decode()

    def text(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Exactly ``n`` bytes of text: words separated by spaces, lines of ~80 characters."""
        parts: list[np.ndarray] = [np.empty(0, np.uint8)]
        produced = 0
        while produced < n:
            idx = self.table[rng.integers(0, self.table.size, int((n - produced) / self.mean_token) + 16)]
            rows = np.take(self.token_rows, idx, axis=0).view(np.uint8).ravel()
            keep = np.take(self.mask_rows, idx, axis=0).view(bool).ravel()
            parts.append(rows[keep])
            produced += parts[-1].size
        out = np.concatenate(parts)[:n]
        breaks = rng.integers(0, max(n, 1), n // 12)
        out[breaks[out[breaks] == ord(" ")]] = ord("\n")
        return out


class ContentFactory:
    """Deterministic file contents of each kind, derived from the data set seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.vocab = Vocabulary(seed)
        self.hosts = np.array([f"{self.vocab.word(i)}-{i}.lan".encode()[:16] for i in range(12)], "S16")
        self.tags = np.array([b"INFO", b"WARN", b"DEBUG", b"AUDIT", b"ERROR"], "S8")

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def records(self, rng: np.random.Generator, size: int) -> Iterator[np.ndarray]:
        """Repetitive 64-byte records (counters, timestamps, small enums, host names)."""
        seq = int(rng.integers(0, 1 << 40))
        ts = 1_600_000_000_000 + int(rng.integers(0, 1 << 30))
        for n in chunk_sizes(size):
            count = -(-n // RECORD_DTYPE.itemsize)
            rec = np.zeros(count, RECORD_DTYPE)
            rec["seq"] = np.arange(seq, seq + count, dtype=np.uint64)
            rec["ts"] = ts + np.cumsum(rng.integers(1, 2000, count, dtype=np.uint64))
            rec["kind"] = rng.integers(0, 6, count)
            rec["status"] = (rng.random(count) < 0.1) * rng.integers(1, 4, count)
            rec["count"] = rng.poisson(20, count)
            rec["value"] = np.round(rng.normal(100.0, 15.0, count), 2)
            rec["host"] = self.hosts[rng.integers(0, self.hosts.size, count)]
            rec["tag"] = self.tags[rng.integers(0, self.tags.size, count)]
            seq += count
            ts = int(rec["ts"][-1])
            yield rec.view(np.uint8)[:n]

    def block(self, kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
        """One in-memory block of ``n`` bytes of the given kind."""
        if kind == "text":
            return self.vocab.text(rng, n)
        if kind == "records":
            return np.concatenate([np.empty(0, np.uint8), *self.records(rng, n)])
        if kind == "zeros":
            return np.zeros(n, np.uint8)
        return random_bytes(rng, n)

    def stream(self, spec: "FileSpec") -> Iterator[np.ndarray]:
        """The content of ``spec`` as a sequence of buffers."""
        rng = self.rng(1, spec.content_seed)
        if spec.kind == "semi":
            yield from self.semi(rng, spec)
        elif spec.kind == "records":
            yield from self.records(rng, spec.size)
        else:
            for n in chunk_sizes(spec.size):
                yield self.block(spec.kind, rng, n)

    def semi(self, rng: np.random.Generator, spec: "FileSpec") -> Iterator[np.ndarray]:
        """Semi-compressible large file: 1 MiB segments of mixed kinds, some repeating earlier ones."""
        segments = list(chunk_sizes(spec.size, SEMI_SEGMENT))
        kinds = rng.choice(len(SEMI_KINDS), size=len(segments), p=SEMI_SHARES)
        originals: list[tuple[int, str]] = []
        for index, (n, kind_index) in enumerate(zip(segments, kinds, strict=True)):
            source, kind = index, SEMI_KINDS[kind_index]
            if kind == "repeat" and originals:
                source, kind = originals[int(rng.integers(0, len(originals)))]
            elif kind == "repeat":
                kind = "random"
            else:
                originals.append((index, kind))
            yield self.block(kind, self.rng(4, spec.content_seed, source), SEMI_SEGMENT)[:n]


# =====================================================================================================
# Data set plan, generation, caching and modification
# =====================================================================================================


@dataclass(frozen=True)
class FileSpec:
    """One generated file; files sharing ``content_seed`` (duplicates) have identical content."""

    path: str  # relative to the data root, "/"-separated
    kind: str  # text | records | random | semi
    size: int
    content_seed: int
    large: bool = False


@dataclass(frozen=True)
class Plan:
    seed: int
    scale: float
    dirs: tuple[str, ...]
    files: tuple[FileSpec, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, dict[str, int]] = {}
        for spec in self.files:
            entry = kinds.setdefault(spec.kind, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += spec.size
        duplicates = len(self.files) - len({f.content_seed for f in self.files})
        return {
            "seed": self.seed,
            "scale": self.scale,
            "files": len(self.files),
            "dirs": len(self.dirs),
            "bytes": self.total_bytes,
            "by_kind": kinds,
            "duplicate_files": duplicates,
            "empty_files": sum(1 for f in self.files if f.size == 0),
            "large_files": [{"path": f.path, "kind": f.kind, "bytes": f.size} for f in self.files if f.large],
        }


def make_dirs(rng: np.random.Generator, vocab: Vocabulary, count: int) -> list[str]:
    """A random nested tree of ``count`` directories (plus a few empty ones); "" is the root."""
    dirs, depth = [""], [0]
    for i in range(1, count + 1):
        parent = int(rng.integers(0, i))
        if depth[parent] >= MAX_DEPTH:
            parent = 0
        name = f"{vocab.word(int(rng.integers(0, 2000)))}-{i}"
        dirs.append(f"{dirs[parent]}/{name}" if dirs[parent] else name)
        depth.append(depth[parent] + 1)
    return dirs


def small_file_layout(rng: np.random.Generator, count: int, budget: int) -> tuple[np.ndarray, ...]:
    """Kinds, sizes and content sources of the small files; sizes sum to at most ``budget``."""
    kinds = rng.choice(len(SMALL_KINDS), size=count, p=SMALL_KIND_SHARES)
    raw = rng.lognormal(np.log(SMALL_MEDIAN), SMALL_SIGMA, size=count)
    raw[rng.random(count) < EMPTY_SHARE] = 0.0
    sources = np.arange(count)
    for i in np.flatnonzero(rng.random(count) < DUPLICATE_SHARE):
        if i > 0:
            sources[i] = sources[int(rng.integers(0, i))]
    kinds, raw = kinds[sources], raw[sources]
    sizes = np.floor(raw * (budget / raw.sum())).astype(np.int64) if raw.sum() > 0 else np.zeros(count, np.int64)
    return kinds, sizes, sources


def make_plan(seed: int, scale: float, vocab: Vocabulary) -> Plan:
    """The full, deterministic description of the data set for ``seed`` and ``scale``."""
    rng = np.random.default_rng([seed, 0])
    n_files = max(MIN_FILES, round(FULL_FILES * scale))
    budget = max(n_files * KiB, round(FULL_BYTES * scale))
    dirs = make_dirs(rng, vocab, max(1, n_files // FILES_PER_DIR))
    large_sizes = [max(1, round(size * scale)) for _, size in LARGE_FILES]
    n_small = n_files - len(LARGE_FILES)
    kinds, sizes, sources = small_file_layout(rng, n_small, budget - sum(large_sizes))
    large_sizes[0] += budget - sum(large_sizes) - int(sizes.sum())  # total is exactly the budget
    file_dirs = rng.integers(0, len(dirs), size=n_files)
    files: list[FileSpec] = []
    for k, (kind, _) in enumerate(LARGE_FILES):
        name = f"disk-{k}.img" if kind == "semi" else f"media-{k}.mkv"
        path = f"{dirs[file_dirs[k]]}/{name}".lstrip("/")
        files.append(FileSpec(path, kind, large_sizes[k], n_small + k, large=True))
    for i in range(n_small):
        kind = SMALL_KINDS[kinds[i]]
        ext = EXTENSIONS[kind][int(rng.integers(0, len(EXTENSIONS[kind])))]
        name = f"{vocab.word(int(rng.integers(0, 5000)))}-{i:05d}{ext}"
        path = f"{dirs[file_dirs[len(LARGE_FILES) + i]]}/{name}".lstrip("/")
        files.append(FileSpec(path, kind, int(sizes[i]), int(sources[i])))
    empty = [f"{dirs[int(rng.integers(0, len(dirs)))]}/empty-{j}".lstrip("/") for j in range(EMPTY_DIRS)]
    return Plan(seed, scale, tuple(d for d in dirs + empty if d), tuple(files))


def write_file(root: Path, spec: FileSpec, factory: ContentFactory) -> None:
    with open(root / spec.path, "wb") as out:
        for buffer in factory.stream(spec):
            out.write(buffer.data)


def modification_targets(plan: Plan) -> list[int]:
    """Deterministic 5% of the files to modify; always includes one large file."""
    rng = np.random.default_rng([plan.seed, 2])
    count = max(1, round(MODIFY_SHARE * len(plan.files)))
    chosen = rng.choice(len(plan.files), size=count, replace=False)
    if not any(plan.files[i].large for i in chosen):
        chosen[0] = 0
    return sorted(int(i) for i in chosen)


def modify_file(root: Path, spec: FileSpec, index: int, factory: ContentFactory) -> tuple[str, int]:
    """Modify one file in place: append data (40%) or overwrite region(s). Returns (operation, bytes)."""
    rng = factory.rng(3, index)
    kind = "records" if spec.kind == "semi" else spec.kind
    with open(root / spec.path, "r+b") as out:
        if spec.size == 0 or rng.random() < 0.4:
            data = factory.block(kind, rng, int(rng.integers(1, 16 * KiB)))
            out.seek(0, os.SEEK_END)
            out.write(data.data)
            return "append", data.size
        written = 0
        for _ in range(4 if spec.large else 1):
            length = min(spec.size, int(rng.integers(1, (64 if spec.large else 16) * KiB)))
            offset = int(rng.integers(0, spec.size - length + 1))
            out.seek(offset)
            out.write(factory.block(kind, rng, length).data)
            written += length
        return "overwrite", written


@dataclass
class Dataset:
    """A generated data set on disk: ``root`` (named ``data``) inside ``home``, with its marker."""

    home: Path
    plan: Plan
    factory: ContentFactory
    generated_s: float | None = None  # None when reused from the cache
    modification: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.home / DATA_DIR_NAME

    @property
    def marker(self) -> Path:
        return self.home / "dataset.json"

    def identity(self) -> dict[str, Any]:
        return {
            "generator_version": GENERATOR_VERSION,
            "seed": self.plan.seed,
            "scale": self.plan.scale,
            "files": len(self.plan.files),
            "bytes": self.plan.total_bytes,
        }

    def read_marker(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None
        return state

    def write_marker(self, modified: bool) -> None:
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.identity(), "modified": modified}, indent=2) + "\n")
        tmp.replace(self.marker)

    def generate(self) -> None:
        log(f"generating data set: {len(self.plan.files):,} files, {self.plan.total_bytes / MiB:,.1f} MiB")
        self.marker.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)
        start = last = time.perf_counter()
        for d in self.plan.dirs:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        done = 0
        for i, spec in enumerate(self.plan.files):
            write_file(self.root, spec, self.factory)
            done += spec.size
            if time.perf_counter() - last > 5:
                last = time.perf_counter()
                log(f"  {i + 1:,} files, {done / MiB:,.0f} MiB, {done / MB / (last - start):.0f} MB/s")
        os.sync()
        self.generated_s = time.perf_counter() - start
        self.write_marker(modified=False)
        log(f"generated in {self.generated_s:.1f} s ({done / MB / self.generated_s:.0f} MB/s)")

    def revert(self) -> None:
        """Rewrite the files changed by :meth:`modify` with their generated content."""
        targets = modification_targets(self.plan)
        log(f"reverting {len(targets):,} files modified by a previous run")
        for index in targets:
            write_file(self.root, self.plan.files[index], self.factory)
        self.write_marker(modified=False)

    def modify(self) -> dict[str, Any]:
        """Modify 5% of the files in place; returns a summary."""
        self.write_marker(modified=True)
        summary = {"files": 0, "append": 0, "overwrite": 0, "bytes_written": 0}
        for index in modification_targets(self.plan):
            op, written = modify_file(self.root, self.plan.files[index], index, self.factory)
            summary["files"] += 1
            summary[op] += 1
            summary["bytes_written"] += written
        os.sync()
        self.modification = summary
        return summary

    def on_disk_matches_plan(self) -> bool:
        files, _ = scan_tree(self.root)
        expected = {spec.path: spec.size for spec in self.plan.files}
        return files == expected


def ensure_dataset(work: Path, seed: int, scale: float) -> Dataset:
    """Return the data set for (seed, scale), generating it unless a valid cached copy exists."""
    factory = ContentFactory(seed)
    plan = make_plan(seed, scale, factory.vocab)
    dataset = Dataset(work / "files" / "datasets" / f"seed{seed}-scale{scale:g}", plan, factory)
    dataset.home.mkdir(parents=True, exist_ok=True)
    state = dataset.read_marker()
    if state is not None and {k: v for k, v in state.items() if k != "modified"} == dataset.identity():
        if state.get("modified"):
            dataset.revert()
        if dataset.on_disk_matches_plan():
            log(f"using cached data set {dataset.root}")
            return dataset
        log("cached data set does not match its marker; regenerating")
    dataset.generate()
    return dataset


# =====================================================================================================
# File tree helpers: scanning, hashing, disk usage, restore verification
# =====================================================================================================


def scan_tree(root: Path) -> tuple[dict[str, int], set[str]]:
    """Regular files (relative path -> size) and directories under ``root``; other types are files
    with size -1 so that they never compare equal."""
    files: dict[str, int] = {}
    dirs: set[str] = set()
    for current, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(current, root)
        prefix = "" if rel == "." else rel + "/"
        dirs.update(prefix + d for d in dirnames)
        for name in filenames:
            st = os.lstat(os.path.join(current, name))
            files[prefix + name] = st.st_size if stat.S_ISREG(st.st_mode) else -1
    return files, dirs


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_files(root: Path, relpaths: list[str]) -> dict[str, str]:
    """SHA-256 of many files, in parallel threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        digests = pool.map(lambda rel: sha256_file(root / rel), relpaths, chunksize=64)
        return dict(zip(relpaths, digests, strict=True))


@dataclass
class Manifest:
    """Sizes and SHA-256 digests of every file of the source tree."""

    sizes: dict[str, int]
    digests: dict[str, str]
    dirs: set[str]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def build_manifest(root: Path) -> Manifest:
    sizes, dirs = scan_tree(root)
    return Manifest(sizes, hash_files(root, sorted(sizes)), dirs)


def find_restored_root(target: Path, source: Path) -> Path | None:
    """Where a tool put the backed-up ``data`` directory inside the restore target: ``target/data``,
    ``target/<absolute source path>``, or the target itself if it holds the source's top-level entries."""
    for candidate in (target / source.name, target / source.relative_to(source.anchor)):
        if candidate.is_dir():
            return candidate
    entries = {p.name for p in target.iterdir()}
    return target if entries and entries <= {p.name for p in source.iterdir()} else None


def verify_restore(manifest: Manifest, target: Path, source: Path) -> dict[str, Any]:
    """Compare the restored tree with the source manifest: names, sizes and full SHA-256."""
    start = time.perf_counter()
    root = find_restored_root(target, source)
    if root is None:
        return {"verified": False, "error": f"restored data not found under {target}", "seconds": 0.0}
    sizes, dirs = scan_tree(root)
    missing = sorted(set(manifest.sizes) - set(sizes))
    extra = sorted(set(sizes) - set(manifest.sizes))
    same_size = [rel for rel, size in manifest.sizes.items() if sizes.get(rel) == size]
    wrong_size = sorted(rel for rel, size in manifest.sizes.items() if rel in sizes and sizes[rel] != size)
    digests = hash_files(root, same_size)
    wrong_content = sorted(rel for rel in same_size if digests[rel] != manifest.digests[rel])
    missing_dirs = sorted(manifest.dirs - dirs)
    problems = missing + extra + wrong_size + wrong_content + missing_dirs
    return {
        "verified": not problems,
        "restored_root": str(root),
        "files_checked": len(same_size),
        "bytes_checked": sum(manifest.sizes[rel] for rel in same_size),
        "missing_files": len(missing),
        "extra_files": len(extra),
        "size_mismatches": len(wrong_size),
        "content_mismatches": len(wrong_content),
        "missing_dirs": len(missing_dirs),
        "examples": problems[:10],
        "seconds": round(time.perf_counter() - start, 3),
    }


def disk_usage(path: Path) -> tuple[int, int]:
    """(allocated, apparent) bytes of a tree, like ``du`` and ``du --apparent-size``."""
    allocated = apparent = 0
    seen: set[tuple[int, int]] = set()
    if not path.exists():
        return 0, 0
    for current, _, filenames in os.walk(path):
        for p in (current, *(os.path.join(current, name) for name in filenames)):
            st = os.lstat(p)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent


# =====================================================================================================
# Process measurement
# =====================================================================================================

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_memory(pid: int) -> int:
    """Proportional set size (bytes) of one process: pages shared with its fork parent or siblings
    count fractionally, so sums over a process tree are not inflated. Falls back to RSS."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            proc_stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(proc_stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, ()))
    return found


class TreeMemorySampler:
    """Polls the summed PSS of a process tree, to catch tools that fork workers
    (``ru_maxrss`` is the maximum of a single process, not the sum)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(process_memory(p) for p in descendants(self.pid)))
            self._stop.wait(self.interval)


@dataclass
class ProcResult:
    exit_code: int
    wall_s: float
    user_s: float
    sys_s: float
    ru_maxrss_mib: float
    tree_pss_mib: float


def run_measured(argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path) -> ProcResult:
    """Run ``argv`` with output appended to ``log_path``; time it and reap it with ``wait4``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"\n===== {datetime.now(UTC).isoformat()} (cwd {cwd})\n$ {shlex.join(argv)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        with TreeMemorySampler(proc.pid) as sampler:
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
        out.write(f"===== exit {proc.returncode} after {wall:.2f} s\n".encode())
    return ProcResult(
        exit_code=proc.returncode,
        wall_s=wall,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        ru_maxrss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        tree_pss_mib=sampler.peak / MiB,
    )


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def command_output(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return done.returncode, (done.stdout + done.stderr).strip()


# =====================================================================================================
# Tools
# =====================================================================================================


class Tool:
    """How to drive one backup tool. Repositories, caches and logs live in the run directory."""

    name: ClassVar[str] = ""

    def __init__(self, run_dir: Path) -> None:
        self.repo = run_dir / "repos" / self.name
        self.home = run_dir / "home" / self.name  # tool caches / config, kept out of ~
        self.log_path = run_dir / "logs" / f"{self.name}.log"

    def missing_reason(self) -> str | None:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def tool_env(self) -> dict[str, str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.tool_env()}

    def init_argv(self) -> list[str]:
        raise NotImplementedError

    def backup_argv(self, snapshot: str, paths: list[str]) -> list[str]:
        raise NotImplementedError

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        """Command and working directory restoring the latest snapshot (named ``snapshot``)."""
        raise NotImplementedError


class BinaryTool(Tool):
    binary: ClassVar[str] = ""
    package: ClassVar[str] = ""
    version_args: ClassVar[tuple[str, ...]] = ("--version",)

    def missing_reason(self) -> str | None:
        if shutil.which(self.binary):
            return None
        return f"`{self.binary}` not found on PATH (Debian: apt-get install {self.package})"

    def version(self) -> str:
        _, output = command_output([self.binary, *self.version_args])
        return output.splitlines()[0] if output else "unknown"


class Restic(BinaryTool):
    name = "restic"
    binary = "restic"
    package = "restic"
    version_args = ("version",)

    def tool_env(self) -> dict[str, str]:
        return {
            "RESTIC_PASSWORD": PASSWORD,
            "RESTIC_REPOSITORY": str(self.repo),
            "RESTIC_CACHE_DIR": str(self.home / "cache"),
        }

    def init_argv(self) -> list[str]:
        return ["restic", "init"]  # repository format 2: compression "auto" by default

    def backup_argv(self, snapshot: str, paths: list[str]) -> list[str]:
        return ["restic", "backup", *paths]

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return ["restic", "restore", "latest", "--target", str(target)], target


class Borg(BinaryTool):
    name = "borg"
    binary = "borg"
    package = "borgbackup"

    def tool_env(self) -> dict[str, str]:
        return {
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(self.home),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_DISPLAY_PASSPHRASE": "no",
        }

    def init_argv(self) -> list[str]:
        return ["borg", "init", "--encryption=repokey-blake2", str(self.repo)]

    def backup_argv(self, snapshot: str, paths: list[str]) -> list[str]:
        return ["borg", "create", "--stats", "--compression", "zstd,3", f"{self.repo}::{snapshot}", *paths]

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return ["borg", "extract", f"{self.repo}::{snapshot}"], target  # extracts into the cwd


class Hozon(Tool):
    name = "hozon"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "hozon"]

    def tool_env(self) -> dict[str, str]:
        pythonpath = os.pathsep.join(p for p in (str(PROJECT_DIR / "src"), os.environ.get("PYTHONPATH")) if p)
        return {
            "HOZON_PASSWORD": PASSWORD,
            "HOZON_REPO": str(self.repo),
            "PYTHONPATH": pythonpath,
            "XDG_CACHE_HOME": str(self.home / "cache"),
        }

    def missing_reason(self) -> str | None:
        code, output = command_output([*self.command, "--help"], env=self.env())
        if code == 0:
            return None
        last = output.splitlines()[-1] if output else ""
        return f"hozon CLI not usable (`python -m hozon --help` exited {code}): {last}"

    def version(self) -> str:
        version = "hozon (version unknown)"
        for args in (["version"], ["--version"]):
            code, output = command_output([*self.command, *args], env=self.env())
            if code == 0 and output:
                version = output.splitlines()[0]
                break
        code, commit = command_output(["git", "-C", str(PROJECT_DIR), "describe", "--always", "--dirty"])
        return f"{version} (git {commit})" if code == 0 else version

    def init_argv(self) -> list[str]:
        return [*self.command, "init", "--repo", str(self.repo)]

    def backup_argv(self, snapshot: str, paths: list[str]) -> list[str]:
        return [*self.command, "backup", "--repo", str(self.repo), *paths]

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return [*self.command, "restore", "--repo", str(self.repo), "latest", "--target", str(target)], target


TOOL_CLASSES: dict[str, type[Tool]] = {"hozon": Hozon, "restic": Restic, "borg": Borg}


# =====================================================================================================
# Benchmark steps
# =====================================================================================================


@dataclass
class StepResult:
    step: str
    ok: bool
    exit_code: int
    wall_s: float
    source_bytes: int
    throughput_mb_s: float
    repo_bytes: int  # allocated (du)
    repo_apparent_bytes: int
    cache_bytes: int  # tool's local cache / config directory (not part of repo_bytes)
    peak_rss_mib: float  # max(ru_maxrss, sampled process-tree PSS)
    ru_maxrss_mib: float
    tree_pss_mib: float
    user_s: float
    sys_s: float
    caches_dropped: bool
    verification: dict[str, Any] | None = None


@dataclass
class ToolRun:
    tool: Tool
    steps: dict[str, StepResult] = field(default_factory=dict)
    error: str | None = None
    last_snapshot: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def execute(run: ToolRun, step: str, argv: list[str], cwd: Path, source_bytes: int, drop: bool) -> StepResult:
    """Run one measured step of one tool and record it; a failure stops that tool."""
    os.sync()  # the previous step's writeback must not overlap this one, dropping caches or not
    dropped = drop_caches() if drop else False
    log(f"[{run.tool.name}] {step} ...")
    proc = run_measured(argv, cwd=cwd, env=run.tool.env(), log_path=run.tool.log_path)
    allocated, apparent = disk_usage(run.tool.repo)
    result = StepResult(
        step=step,
        ok=proc.exit_code == 0,
        exit_code=proc.exit_code,
        wall_s=round(proc.wall_s, 3),
        source_bytes=source_bytes,
        throughput_mb_s=round(source_bytes / MB / proc.wall_s, 2) if proc.wall_s > 0 else 0.0,
        repo_bytes=allocated,
        repo_apparent_bytes=apparent,
        cache_bytes=disk_usage(run.tool.home)[0],
        peak_rss_mib=round(max(proc.ru_maxrss_mib, proc.tree_pss_mib), 1),
        ru_maxrss_mib=round(proc.ru_maxrss_mib, 1),
        tree_pss_mib=round(proc.tree_pss_mib, 1),
        user_s=round(proc.user_s, 3),
        sys_s=round(proc.sys_s, 3),
        caches_dropped=dropped,
    )
    run.steps[step] = result
    if result.ok:
        log(f"[{run.tool.name}] {step}: {proc.wall_s:.2f} s, repo {allocated / MiB:,.1f} MiB")
    else:
        run.error = f"step {step!r} exited with {proc.exit_code}; log: {run.tool.log_path}"
        log(f"[{run.tool.name}] FAILED: {run.error}\n{log_tail(run.tool.log_path)}")
    return result


def restore_and_verify(run: ToolRun, dataset: Dataset, manifest: Manifest, target: Path, drop: bool) -> None:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    argv, cwd = run.tool.restore_argv(run.last_snapshot, target)
    result = execute(run, "restore", argv, cwd, manifest.total_bytes, drop)
    if not result.ok:
        return
    result.verification = verify_restore(manifest, target, dataset.root)
    state = "verified" if result.verification["verified"] else f"NOT verified: {result.verification}"
    log(f"[{run.tool.name}] restore {state}")


def run_benchmark(runs: list[ToolRun], dataset: Dataset, run_dir: Path, drop: bool, keep: bool) -> None:
    """All steps, interleaved across tools so that every step sees the same machine state."""
    cwd, paths = dataset.home, [DATA_DIR_NAME]
    for run in runs:
        run.tool.repo.parent.mkdir(parents=True, exist_ok=True)
        run.tool.home.mkdir(parents=True, exist_ok=True)
        execute(run, "init", run.tool.init_argv(), cwd, 0, drop=False)
    for step in BACKUP_STEPS:
        if step == "modified":
            log(f"modifying files: {dataset.modify()}")
        source_bytes = dataset_bytes(dataset.root) if step == "modified" else dataset.plan.total_bytes
        for run in (r for r in runs if r.ok):
            execute(run, step, run.tool.backup_argv(step, paths), cwd, source_bytes, drop)
            run.last_snapshot = step
    log("hashing the source tree for restore verification")
    manifest = build_manifest(dataset.root)
    for run in (r for r in runs if r.ok):
        target = run_dir / "restore" / run.tool.name
        restore_and_verify(run, dataset, manifest, target, drop)
        if not keep:
            shutil.rmtree(target, ignore_errors=True)
    if not keep:
        for run in runs:
            shutil.rmtree(run.tool.repo, ignore_errors=True)
            shutil.rmtree(run.tool.home, ignore_errors=True)


def dataset_bytes(root: Path) -> int:
    return sum(scan_tree(root)[0].values())


# =====================================================================================================
# Report
# =====================================================================================================


@dataclass
class Target:
    name: str
    value: float | None
    op: str  # ">=", "<=" or "<"
    threshold: float
    met: bool | None  # None: not measurable (tool missing or failed)
    note: str = ""


def step_value(runs: dict[str, ToolRun], tool: str, step: str, attr: str) -> float | None:
    run = runs.get(tool)
    result = run.steps.get(step) if run else None
    return float(getattr(result, attr)) if result and result.ok else None


def ratio(runs: dict[str, ToolRun], tool: str, base: str, step: str, attr: str) -> float | None:
    value, reference = step_value(runs, tool, step, attr), step_value(runs, base, step, attr)
    return value / reference if value is not None and reference else None


def make_target(name: str, value: float | None, op: str, threshold: float, note: str = "") -> Target:
    compare: dict[str, Callable[[float, float], bool]] = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        "<": lambda a, b: a < b,
    }
    met = None if value is None else compare[op](value, threshold)
    return Target(name, None if value is None else round(value, 3), op, threshold, met, note)


def evaluate_targets(runs: dict[str, ToolRun]) -> list[Target]:
    restore = runs["hozon"].steps.get("restore") if "hozon" in runs else None
    verified = bool(restore and restore.verification and restore.verification.get("verified"))
    restore_ratio = ratio(runs, "hozon", "restic", "restore", "wall_s")
    rss = [s.peak_rss_mib for s in runs["hozon"].steps.values()] if "hozon" in runs else []
    targets = [
        make_target(
            "initial backup throughput, hozon / restic",
            ratio(runs, "hozon", "restic", "initial", "throughput_mb_s"),
            ">=",
            1.5,
        ),
        make_target(
            "unchanged re-run time, hozon / restic", ratio(runs, "hozon", "restic", "unchanged", "wall_s"), "<=", 1.0
        ),
        make_target(
            "repository size after modified re-run, hozon / restic",
            ratio(runs, "hozon", "restic", "modified", "repo_bytes"),
            "<=",
            1.0,
        ),
        make_target("restore time, hozon / restic", restore_ratio, "<=", 1.0),
        make_target("hozon peak RSS, MiB (max over steps)", max(rss) if rss else None, "<", RSS_TARGET_MIB),
    ]
    if restore_ratio is not None and not verified:
        targets[3].met, targets[3].note = False, "restore not verified"
    return targets


def format_table(rows: list[list[str]], right_from: int = 2) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i < right_from else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(runs: dict[str, ToolRun]) -> str:
    rows = [["tool", "step", "seconds", "MB/s", "repo MiB", "peak RSS MiB", "CPU s", "note"]]
    for name, run in runs.items():
        for step in TABLE_STEPS:
            result = run.steps.get(step)
            if result is None:
                rows.append([name, step, "-", "-", "-", "-", "-", "skipped" if run.ok else "not run"])
                continue
            note = "" if result.ok else f"FAILED (exit {result.exit_code})"
            if result.verification is not None:
                note = "verified" if result.verification.get("verified") else "NOT VERIFIED"
            rows.append(
                [
                    name,
                    step,
                    f"{result.wall_s:.2f}",
                    f"{result.throughput_mb_s:.1f}" if result.ok else "-",
                    f"{result.repo_bytes / MiB:.1f}",
                    f"{result.peak_rss_mib:.1f}",
                    f"{result.user_s + result.sys_s:.1f}",
                    note,
                ]
            )
    return format_table(rows)


def relative_table(runs: dict[str, ToolRun]) -> str | None:
    if "restic" not in runs:
        return None
    rows = [["tool vs restic", "", "initial MB/s x", "unchanged time x", "repo size x", "restore time x"]]
    for name in runs:
        values = [
            ratio(runs, name, "restic", "initial", "throughput_mb_s"),
            ratio(runs, name, "restic", "unchanged", "wall_s"),
            ratio(runs, name, "restic", "modified", "repo_bytes"),
            ratio(runs, name, "restic", "restore", "wall_s"),
        ]
        rows.append([name, "", *("-" if v is None else f"{v:.2f}" for v in values)])
    return format_table(rows)


def targets_text(targets: list[Target]) -> str:
    lines = []
    for t in targets:
        state = {True: "MET", False: "NOT MET", None: "n/a"}[t.met]
        value = "-" if t.value is None else f"{t.value:.3f}"
        note = f"  ({t.note})" if t.note else ""
        lines.append(f"  {t.name:<55} {value:>8}  target {t.op} {t.threshold:g}  {state}{note}")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def filesystem_type(path: Path) -> str:
    """File system type of the mount containing ``path`` (from /proc/mounts)."""
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount_point, kind, *_ = line.split()
            if str(path).startswith(mount_point) and len(mount_point) > len(best):
                best, fstype = mount_point, kind
    except (OSError, ValueError):
        pass
    return fstype


def machine_info(work: Path) -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_bytes": memory_total_bytes(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "work_dir": str(work),
        "work_filesystem": filesystem_type(work),
    }


def write_results(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


# =====================================================================================================
# Main
# =====================================================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work dir (default: bench/work)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="where the JSON goes")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink/grow bytes and file count (e.g. 0.01)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="data set PRNG seed")
    parser.add_argument("--tools", default=",".join(ALL_TOOLS), help="comma-separated: hozon,restic,borg")
    parser.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache between steps")
    parser.add_argument("--keep", action="store_true", help="keep repositories and restored trees afterwards")
    parser.add_argument("--generate-only", action="store_true", help="only generate / check the data set")
    args = parser.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(args.tools) - set(ALL_TOOLS))
    if unknown or not args.tools:
        parser.error(f"--tools: unknown {unknown}; choose from {', '.join(ALL_TOOLS)}")
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    args.work = args.work.resolve()
    return args


def select_tools(names: list[str], run_dir: Path) -> tuple[list[Tool], dict[str, dict[str, Any]]]:
    """Instantiate the requested tools; missing ones are reported and skipped."""
    tools: list[Tool] = []
    info: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        tool = TOOL_CLASSES[name](run_dir)
        reason = tool.missing_reason()
        if reason:
            log(f"SKIPPING {name}: {reason}")
            info[name] = {"available": False, "skip_reason": reason}
            continue
        info[name] = {"available": True, "version": tool.version()}
        log(f"{name}: {info[name]['version']}")
        tools.append(tool)
    return tools, info


def check_free_space(work: Path, dataset_bytes: int, n_tools: int) -> None:
    needed = dataset_bytes * (n_tools + 1)  # repositories (at most ~1x each) + one restore at a time
    free = shutil.disk_usage(work).free
    if free < needed:
        log(f"WARNING: {free / GiB:.1f} GiB free in {work}, the run may need about {needed / GiB:.1f} GiB")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = ensure_dataset(args.work, args.seed, args.scale)
    summary = dataset.plan.summary()
    log(f"data set: {summary['files']:,} files in {summary['dirs']:,} dirs, {summary['bytes'] / MiB:,.1f} MiB")
    if args.generate_only:
        print(json.dumps(summary, indent=2))
        return 0

    run_dir = args.work / "files" / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    tools, tool_info = select_tools(args.tools, run_dir)
    if not tools:
        log("no usable tool; nothing to do")
        return 1
    check_free_space(args.work, dataset.plan.total_bytes, len(tools))
    drop = not args.no_drop_caches
    if drop and not drop_caches():
        log("cannot drop the page cache (needs root); continuing without (use --no-drop-caches to silence)")
        drop = False

    started = datetime.now(UTC)
    runs = [ToolRun(tool) for tool in tools]
    run_benchmark(runs, dataset, run_dir, drop, args.keep)
    by_name = {run.tool.name: run for run in runs}
    targets = evaluate_targets(by_name)

    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out_path = args.results / f"files-{stamp}.json"
    write_results(
        out_path,
        {
            "benchmark": "files",
            "started_utc": started.isoformat(),
            "finished_utc": datetime.now(UTC).isoformat(),
            "options": {
                "argv": sys.argv[1:],
                "scale": args.scale,
                "seed": args.seed,
                "tools": args.tools,
                "drop_caches": drop,
            },
            "machine": machine_info(args.work),
            "tools": tool_info,
            "dataset": {
                **summary,
                "root": str(dataset.root),
                "generated_s": dataset.generated_s,
                "cached": dataset.generated_s is None,
                "modification": dataset.modification,
            },
            "results": {
                name: {
                    "error": run.error,
                    "log": str(run.tool.log_path),
                    "steps": {step: asdict(r) for step, r in run.steps.items()},
                }
                for name, run in by_name.items()
            },
            "targets": [asdict(t) for t in targets],
        },
    )

    print()
    print(
        f"Files benchmark: {summary['files']:,} files, {summary['bytes'] / MiB:,.1f} MiB (scale {args.scale:g}), "
        f"page cache {'dropped' if drop else 'NOT dropped'} between steps"
    )
    print(results_table(by_name))
    relative = relative_table(by_name)
    if relative:
        print()
        print(relative)
    print()
    print("Targets (hozon vs restic):")
    print(targets_text(targets))
    for name, info in tool_info.items():
        if not info["available"]:
            print(f"  note: {name} skipped: {info['skip_reason']}")
    print(f"\nresults: {out_path}")
    return 0 if all(run.ok for run in runs) else 2


if __name__ == "__main__":
    sys.exit(main())
