#!/usr/bin/env python3
"""VM image benchmark: Hozon vs ``qemu-img convert`` vs virtnbdbackup on an 8 GiB virtual disk.

Usage (from the repository root, after ``pip install -e .``; as root to drop the page cache)::

    python bench/vm.py                         # full run: 8 GiB disk holding ~4 GiB of data
    python bench/vm.py --scale 0.05            # smoke run: ~410 MiB disk, ~15 s
    python bench/vm.py --no-virtnbdbackup      # leave out the libvirt peer
    python bench/vm.py --generate-only         # only build (or check) the cached disk images

What it does:

1. Builds a reproducible disk image from a seeded PRNG (``--seed``), cached under
   ``<work>/vm/images/seed<S>-scale<X>/disk.qcow2`` with a marker file: an 8 GiB (x ``--scale``)
   raw file is written in big numpy buffers as extents of 64 KiB - 64 MiB, of which ~42% are left
   as holes and ~6% written as zeros, the rest random (incompressible), text-like
   (semi-compressible), structured records (compressible) or copies of earlier extents; then
   ``qemu-img convert -O qcow2`` makes the qcow2 and the raw file is removed. A second image at a
   quarter of the size is built the same way, to see whether Hozon's memory grows with disk size.
2. Copies the image into the run directory and measures, in one run, side by side:
   ``qemu-img convert -O raw`` of the copy (the raw-copy baseline, before QEMU opens it);
   ``hozon vm backup`` (full) into a fresh encrypted repository from a paused QEMU (TCG, two QMP
   sockets, the disk on virtio-blk); virtnbdbackup full backup of a libvirt domain with its own
   copy of the image; then 1% of the disk is changed in both VMs (``--change-write-kib`` sized
   writes at seeded offsets, through HMP ``qemu-io`` on the virtio device, as a guest would) and
   both take an incremental; QEMU is stopped and Hozon restores the latest snapshot as qcow2 and
   as raw, each compared with the VM's image by ``qemu-img compare``; last, a full Hozon backup of
   the quarter-size image into another fresh repository.
3. Measures per step: wall time, throughput (virtual disk bytes / s and allocated bytes / s),
   bytes the tool read, repository (or output directory) size as ``du``, peak RSS (``ru_maxrss``
   from ``wait4``; also the sampled PSS sum of the process tree) and CPU time. Prints a table and
   the targets (MET / NOT MET), and writes ``bench/results/vm-<UTC timestamp>.json``. Tool output
   goes to ``<work>/vm/run/logs/<tool>.log``.

virtnbdbackup needs a running libvirtd: as root the script starts ``virtlogd -d`` and
``libvirtd -d`` if none answers (after giving ``/dev/kvm`` group kvm and mode 660, see the design
overview, §6) and leaves them running. If virtnbdbackup or libvirt cannot be used, the reason is
printed and that peer is skipped. The page cache is dropped before every measured step when
permitted (root); ``--no-drop-caches`` skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_DIR / "src"))
sys.path.insert(0, str(BENCH_DIR))

from files import (  # noqa: E402
    Target,
    TreeMemorySampler,
    disk_usage,
    drop_caches,
    format_table,
    log,
    log_tail,
    machine_info,
    make_target,
    targets_text,
    write_results,
)
from hozon.sources.qemu.qmp import QmpClient  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000

# --- disk image shape (at --scale 1) -----------------------------------------------------------------
GENERATOR_VERSION = 1  # bump when generated content changes, to invalidate cached images
DEFAULT_SEED = 20_240_715
FULL_DISK = 8 * GiB
MIN_DISK = 16 * MiB
GRID = 64 * KiB  # extent boundaries (qcow2's default cluster size)
EXTENT_MIN = 64 * KiB
EXTENT_MAX = 64 * MiB  # at most disk / 128, so small disks still get many extents
KIND_SHARES: dict[str, float] = {  # by bytes
    "hole": 0.42,
    "zeros": 0.06,
    "random": 0.18,
    "text": 0.12,
    "records": 0.12,
    "repeat": 0.08,
}
DATA_KINDS = ("random", "text", "records")
PIECE = 16 * MiB  # generation buffer

# --- benchmark ---------------------------------------------------------------------------------------
PASSWORD = "hozon-bench-password"
VM_NAME = "bench"
DOMAIN = "hozon-bench-vm"  # libvirt domain for virtnbdbackup
CHANGE_SHARE = 0.01
HOZON_CHUNK = 1 * MiB  # Hozon's fixed image chunk (to count the chunks a change touches)
RSS_TARGET_MIB = 300.0
RSS_GROWTH_MAX = 1.10  # full-size / quarter-size peak RSS
QEMU = "qemu-system-x86_64"
LIBVIRT_URI = "qemu:///system"


# =====================================================================================================
# Disk image generation and caching
# =====================================================================================================


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: str  # hole | zeros | random | text | records | repeat
    source: int = -1  # repeat: index of the extent whose content is copied


def disk_size_for(scale: float) -> int:
    return max(MIN_DISK, round(FULL_DISK * scale / MiB) * MiB)


def make_layout(seed: int, size: int) -> list[Extent]:
    """Extents covering the disk; kinds are cut from a shuffled order so byte shares are close to
    :data:`KIND_SHARES` at any scale."""
    rng = np.random.default_rng([seed, 0])
    top = max(EXTENT_MIN, min(EXTENT_MAX, size // 128))
    lengths: list[int] = []
    total = 0
    while total < size:
        raw = math.exp(rng.uniform(math.log(EXTENT_MIN), math.log(top)))
        n = min(size - total, max(EXTENT_MIN, int(raw) // GRID * GRID))
        lengths.append(n)
        total += n
    order = rng.permutation(len(lengths))
    bounds = np.cumsum(list(KIND_SHARES.values())) * size
    kinds = [""] * len(lengths)
    position = 0
    for i in order:
        middle = position + lengths[i] / 2
        kinds[i] = list(KIND_SHARES)[min(int(np.searchsorted(bounds, middle)), len(KIND_SHARES) - 1)]
        position += lengths[i]
    extents: list[Extent] = []
    offset = 0
    data_so_far: list[int] = []  # indices in ``extents`` of the data extents so far
    for n, kind in zip(lengths, kinds, strict=True):
        if kind == "repeat" and data_so_far:
            fits = [i for i in data_so_far if extents[i].length >= n]
            if fits:
                source = fits[int(rng.integers(0, len(fits)))]
            else:
                source = max(data_so_far, key=lambda i: extents[i].length)
            copied = min(n, extents[source].length)  # the rest of a longer repeat stays a hole
            extents.append(Extent(offset, copied, "repeat", source))
            if copied < n:
                extents.append(Extent(offset + copied, n - copied, "hole"))
        else:
            kind = "random" if kind == "repeat" else kind
            if kind in DATA_KINDS:
                data_so_far.append(len(extents))
            extents.append(Extent(offset, n, kind))
        offset += n
    return extents


def random_words(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=-(-n // 8), dtype=np.uint64, endpoint=False)


def piece_content(kind: str, rng: np.random.Generator, n: int, first_record: int) -> np.ndarray:
    """``n`` bytes of ``kind`` (``first_record`` numbers the records of a records extent)."""
    if kind == "zeros":
        return np.zeros(n, np.uint8)
    words = random_words(rng, n)
    if kind == "text":  # 32 symbols: compresses to ~5/8
        words = (words & np.uint64(0x1F1F1F1F1F1F1F1F)) | np.uint64(0x4040404040404040)
    elif kind == "records":  # 64-byte records: counters, timestamps, small fields, constants, zeros
        count = -(-n // 64)
        fields = np.resize(words, count * 8).reshape(count, 8)  # record i draws on words 8i..8i+7 only
        rec = np.zeros((count, 8), np.uint64)
        seq = np.arange(first_record, first_record + count, dtype=np.uint64)
        rec[:, 0] = seq
        rec[:, 1] = np.uint64(1_600_000_000_000) + seq * np.uint64(997) + (fields[:, 0] & np.uint64(0x3FF))
        rec[:, 2] = fields[:, 1] & np.uint64(0x0000000F000F00FF)
        rec[:, 3] = np.uint64(0x2E6E616C2D747365)
        rec[:, 4] = fields[:, 2] & np.uint64(0xFFFF)
        words = rec.ravel()
    return words.view(np.uint8)[:n]


def extent_pieces(seed: int, index: int, length: int, kind: str) -> Iterator[np.ndarray]:
    """The first ``length`` bytes of extent ``index``'s content (of ``kind``), in buffers of at most
    :data:`PIECE`; a repeat of extent ``index`` asks for the same and gets the same bytes."""
    rng = np.random.default_rng([seed, 1, index])
    done = 0
    while done < length:
        n = min(PIECE, length - done)
        yield piece_content(kind, rng, n, done // 64)
        done += n


def run_tool(argv: list[str], timeout: float = 3600) -> str:
    """Run a helper command; its stdout, or RuntimeError with its output."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {(done.stdout + done.stderr).strip()}")
    return done.stdout


def allocated_bytes(image: Path) -> int:
    """Bytes holding data in an image (``qemu-img map``: data and not known to read as zeros)."""
    extents = json.loads(run_tool(["qemu-img", "map", "--output=json", str(image)]))
    return sum(int(e["length"]) for e in extents if e.get("data") and not e.get("zero"))


@dataclass
class DiskImage:
    """A cached generated image: ``path`` (qcow2) in ``home``, described by ``home/image.json``."""

    home: Path
    seed: int
    scale: float
    size: int
    summary: dict[str, Any] = field(default_factory=dict)
    generated_s: float | None = None  # None: reused from the cache

    @property
    def path(self) -> Path:
        return self.home / "disk.qcow2"

    @property
    def marker(self) -> Path:
        return self.home / "image.json"

    @property
    def allocated(self) -> int:
        return int(self.summary.get("allocated_bytes", 0))

    def identity(self) -> dict[str, Any]:
        return {"generator_version": GENERATOR_VERSION, "seed": self.seed, "scale": self.scale, "size": self.size}

    def load_cached(self) -> bool:
        try:
            state = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        if state.get("identity") != self.identity() or not self.path.is_file():
            return False
        try:
            info = json.loads(run_tool(["qemu-img", "info", "--output=json", str(self.path)]))
        except (RuntimeError, ValueError):
            return False
        if int(info.get("virtual-size", -1)) != self.size:
            return False
        self.summary = state["summary"]
        return True

    def generate(self) -> None:
        log(f"generating disk image: {self.size / GiB:.2f} GiB virtual (scale {self.scale:g}, seed {self.seed})")
        self.marker.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        raw = self.home / "disk.raw"
        start = last = time.perf_counter()
        layout = make_layout(self.seed, self.size)
        by_kind: dict[str, dict[str, int]] = {}
        written = 0
        fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.size)
            for index, extent in enumerate(layout):
                entry = by_kind.setdefault(extent.kind, {"extents": 0, "bytes": 0})
                entry["extents"] += 1
                entry["bytes"] += extent.length
                if extent.kind == "hole":
                    continue
                key = extent.source if extent.kind == "repeat" else index
                kind = layout[key].kind
                pieces = extent_pieces(self.seed, key, extent.length, kind)
                position = extent.offset
                for buffer in pieces:
                    os.pwrite(fd, buffer.data, position)
                    position += buffer.size
                written += extent.length
                if time.perf_counter() - last > 5:
                    last = time.perf_counter()
                    log(f"  {written / MiB:,.0f} MiB written, {written / MB / (last - start):.0f} MB/s")
        finally:
            os.close(fd)
        log(f"  {written / MiB:,.0f} MiB written; qemu-img convert -O qcow2")
        tmp = self.path.with_suffix(".tmp.qcow2")
        run_tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
        raw.unlink()
        tmp.replace(self.path)
        self.summary = {
            "virtual_bytes": self.size,
            "written_bytes": written,
            "allocated_bytes": allocated_bytes(self.path),
            "extents": len(layout),
            "by_kind": by_kind,
            "file_bytes": self.path.stat().st_blocks * 512,
        }
        self.generated_s = round(time.perf_counter() - start, 1)
        self.marker.write_text(json.dumps({"identity": self.identity(), "summary": self.summary}, indent=2) + "\n")
        log(f"generated in {self.generated_s:.1f} s: {self.allocated / MiB:,.0f} MiB allocated")


def ensure_image(work: Path, seed: int, scale: float) -> DiskImage:
    size = disk_size_for(scale)
    image = DiskImage(work / "vm" / "images" / f"seed{seed}-scale{scale:g}", seed, scale, size)
    image.home.mkdir(parents=True, exist_ok=True)
    if image.load_cached():
        log(f"using cached disk image {image.path} ({image.allocated / MiB:,.0f} MiB allocated)")
    else:
        image.generate()
    return image


# =====================================================================================================
# Measured processes
# =====================================================================================================


@dataclass
class Measured:
    exit_code: int
    wall_s: float
    user_s: float
    sys_s: float
    ru_maxrss_mib: float
    tree_pss_mib: float
    stdout: str


def run_measured(argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path | None = None) -> Measured:
    """Run ``argv``, timed and reaped with ``wait4``; stdout is returned, stderr and stdout go to the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out, tempfile.TemporaryFile() as captured:
        out.write(f"\n===== {datetime.now(UTC).isoformat()}\n$ {' '.join(argv)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=captured, stderr=out)
        with TreeMemorySampler(proc.pid) as sampler:
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
        captured.seek(0)
        stdout = captured.read().decode(errors="replace")
        out.write(stdout.encode())
        out.write(f"===== exit {proc.returncode} after {wall:.2f} s\n".encode())
    return Measured(
        proc.returncode, wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024, sampler.peak / MiB, stdout
    )


@dataclass
class StepResult:
    step: str
    tool: str
    ok: bool
    exit_code: int
    wall_s: float
    virtual_bytes: int  # the disk's virtual size
    allocated_bytes: int  # bytes holding data in the source image
    virtual_mb_s: float
    allocated_mb_s: float
    bytes_read: int | None  # what the tool says it read (None: not reported)
    output_bytes: int  # repository / output directory / written image, allocated (du)
    output_apparent_bytes: int
    peak_rss_mib: float  # ru_maxrss from wait4 (largest single process, children it reaped included)
    tree_pss_mib: float  # sampled PSS sum over the process tree
    user_s: float
    sys_s: float
    caches_dropped: bool
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Runs and records measured steps."""

    def __init__(self, run_dir: Path, drop: bool) -> None:
        self.run_dir = run_dir
        self.drop = drop
        self.steps: dict[str, StepResult] = {}
        self.errors: list[str] = []

    def log_path(self, tool: str) -> Path:
        return self.run_dir / "logs" / f"{tool}.log"

    def measure(
        self,
        key: str,
        tool: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        image: DiskImage,
        output: Path,
        bytes_read: Callable[[Measured], int | None] | None = None,
        cwd: Path | None = None,
    ) -> tuple[StepResult, Measured]:
        os.sync()  # the previous step's writeback must not overlap this one
        dropped = drop_caches() if self.drop else False
        log(f"[{tool}] {key} ...")
        proc = run_measured(argv, env=env or dict(os.environ), log_path=self.log_path(tool), cwd=cwd)
        allocated, apparent = disk_usage(output)
        wall = max(proc.wall_s, 1e-9)
        ok = proc.exit_code == 0
        result = StepResult(
            step=key,
            tool=tool,
            ok=ok,
            exit_code=proc.exit_code,
            wall_s=round(proc.wall_s, 3),
            virtual_bytes=image.size,
            allocated_bytes=image.allocated,
            virtual_mb_s=round(image.size / MB / wall, 1),
            allocated_mb_s=round(image.allocated / MB / wall, 1),
            bytes_read=bytes_read(proc) if ok and bytes_read else None,
            output_bytes=allocated,
            output_apparent_bytes=apparent,
            peak_rss_mib=round(proc.ru_maxrss_mib, 1),
            tree_pss_mib=round(proc.tree_pss_mib, 1),
            user_s=round(proc.user_s, 3),
            sys_s=round(proc.sys_s, 3),
            caches_dropped=dropped,
        )
        if not ok:
            result.note = f"FAILED (exit {proc.exit_code})"
            tail = log_tail(self.log_path(tool))
            self.errors.append(f"{tool} {key} exited {proc.exit_code}:\n{tail}")
            log(f"[{tool}] {key} FAILED (exit {proc.exit_code}); log {self.log_path(tool)}:\n{tail}")
        else:
            log(
                f"[{tool}] {key}: {proc.wall_s:.2f} s, output {allocated / MiB:,.1f} MiB, "
                f"RSS {proc.ru_maxrss_mib:.0f} MiB"
            )
        self.steps[key] = result
        return result, proc


# =====================================================================================================
# QEMU and the 1% change
# =====================================================================================================


@dataclass
class Vm:
    proc: subprocess.Popen[bytes]
    qmp_path: Path  # the benchmark's monitor
    hozon_qmp_path: Path  # left free for Hozon
    log_path: Path

    def monitor(self) -> QmpClient:
        return QmpClient.connect(self.qmp_path, timeout=10.0)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (QEMU flushes its images and exits), SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_vm(image: Path, sockdir: Path, name: str, log_path: Path) -> Vm:
    """A paused QEMU (no guest code) with ``image`` as virtio-blk ``vda`` and two QMP sockets."""
    qmp_path, hozon_qmp_path = sockdir / f"{name}-bench.qmp", sockdir / f"{name}-hozon.qmp"
    args = [
        QEMU,
        "-accel",
        "tcg",
        "-machine",
        "q35",
        "-m",
        "128",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        "-qmp",
        f"unix:{hozon_qmp_path},server=on,wait=off",
        "-blockdev",
        f"driver=qcow2,node-name=vda-format,file.driver=file,file.filename={image}",
        "-device",
        "virtio-blk-pci,drive=vda-format,id=vda",
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"\n===== {datetime.now(UTC).isoformat()}\n$ {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    vm = Vm(proc, qmp_path, hozon_qmp_path, log_path)
    deadline = time.monotonic() + 30
    while not (qmp_path.exists() and hozon_qmp_path.exists()):
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with {proc.returncode} at start:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            vm.stop()
            raise RuntimeError(f"QEMU made no QMP socket within 30 s:\n{log_tail(log_path)}")
        time.sleep(0.01)
    return vm


def change_plan(seed: int, size: int, write_size: int) -> list[tuple[int, int, int]]:
    """(offset, length, pattern) of writes covering 1% of the disk, at seeded aligned offsets."""
    slots = size // write_size
    count = min(slots, max(1, round(CHANGE_SHARE * size / write_size)))
    rng = np.random.default_rng([seed, 5])
    chosen = np.sort(rng.choice(slots, size=count, replace=False))
    return [(int(slot) * write_size, write_size, 1 + i % 254) for i, slot in enumerate(chosen)]


def chunks_touched(plan: list[tuple[int, int, int]], chunk: int = HOZON_CHUNK) -> int:
    touched: set[int] = set()
    for offset, length, _ in plan:
        touched.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    return len(touched)


def apply_changes(hmp: Callable[[str], str], device: str, plan: list[tuple[int, int, int]]) -> float:
    """Write the plan through HMP ``qemu-io`` on the virtio device (as a guest would); seconds taken."""
    start = time.perf_counter()
    for offset, length, pattern in plan:
        output = hmp(f'qemu-io -d {device} "write -P {pattern} {offset} {length}"').strip()
        if output and ("error" in output.lower() or "fail" in output.lower()):
            raise RuntimeError(f"qemu-io write at {offset} failed: {output}")
    return time.perf_counter() - start


def qemu_img_compare(restored: Path, restored_format: str, source: Path) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run(
        ["qemu-img", "compare", "-f", restored_format, "-F", "qcow2", str(restored), str(source)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    return {
        "verified": done.returncode == 0,
        "exit_code": done.returncode,
        "output": (done.stdout + done.stderr).strip()[-500:],
        "seconds": round(time.perf_counter() - start, 2),
    }


# =====================================================================================================
# Hozon
# =====================================================================================================


def hozon_env(repo: Path, home: Path) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(HOZON_SRC), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "HOZON_PASSWORD": PASSWORD,
        "HOZON_REPO": str(repo),
        "PYTHONPATH": pythonpath,
        "XDG_CACHE_HOME": str(home / "cache"),
    }


HOZON = [sys.executable, "-m", "hozon"]
HOZON_SRC = PROJECT_DIR / "src"  # the Hozon that is measured (--hozon-src)


def hozon_version() -> str:
    env = hozon_env(Path("/nonexistent"), Path(tempfile.gettempdir()))
    for args in (["version"], ["--version"]):
        done = subprocess.run([*HOZON, *args], capture_output=True, text=True, env=env, timeout=60, check=False)
        if done.returncode == 0 and done.stdout.strip():
            version = done.stdout.strip().splitlines()[0]
            break
    else:
        version = "hozon (version unknown)"
    git = subprocess.run(
        ["git", "-C", str(HOZON_SRC), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    return f"{version} (git {git.stdout.strip()})" if git.returncode == 0 else version


def source_changes() -> list[str]:
    """Uncommitted changes in the measured ``src/`` (``git status --porcelain``; none outside git)."""
    done = subprocess.run(
        ["git", "-C", str(HOZON_SRC), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.splitlines() if done.returncode == 0 else []


def backup_json(proc: Measured) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc
    except ValueError:
        return {}


def hozon_bytes_read(proc: Measured) -> int | None:
    summary = backup_json(proc).get("snapshot", {}).get("summary", {})
    value = summary.get("bytes_read")
    return int(value) if value is not None else None


def hozon_backup_details(proc: Measured) -> dict[str, Any]:
    doc = backup_json(proc)
    snap = doc.get("snapshot", {})
    disks = snap.get("extra", {}).get("disks", [])
    return {
        "snapshot": snap.get("short_id"),
        "summary": snap.get("summary"),
        "disks": [{k: d.get(k) for k in ("name", "size", "mode", "reason", "bytes_read", "zero_bytes")} for d in disks],
        "notes": doc.get("notes"),
    }


def hozon_init(bench: Bench, repo: Path, home: Path) -> None:
    shutil.rmtree(repo, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    proc = run_measured(
        [*HOZON, "init", "--repo", str(repo)], env=hozon_env(repo, home), log_path=bench.log_path("hozon")
    )
    if proc.exit_code != 0:
        raise RuntimeError(f"hozon init exited {proc.exit_code}:\n{log_tail(bench.log_path('hozon'))}")


def hozon_backup(
    bench: Bench, key: str, vm: Vm, repo: Path, home: Path, image: DiskImage, expect_mode: str
) -> StepResult:
    scratch = home / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    argv = [
        *HOZON,
        "vm",
        "backup",
        "--qmp",
        str(vm.hozon_qmp_path),
        "--name",
        VM_NAME,
        "--scratch",
        str(scratch),
        "--repo",
        str(repo),
        "--json",
    ]
    result, proc = bench.measure(
        key, "hozon", argv, env=hozon_env(repo, home), image=image, output=repo, bytes_read=hozon_bytes_read
    )
    if result.ok:
        result.details = hozon_backup_details(proc)
        modes = sorted({str(d.get("mode")) for d in result.details["disks"]})
        result.note = "/".join(modes)
        if modes != [expect_mode]:
            reasons = "; ".join(str(d.get("reason")) for d in result.details["disks"])
            result.note += f" (expected {expect_mode}: {reasons})"
            bench.errors.append(f"hozon {key}: the backup was {modes}, not {expect_mode}: {reasons}")
    return result


def hozon_restore(
    bench: Bench, key: str, fmt: str, repo: Path, home: Path, image: DiskImage, source: Path, target: Path
) -> StepResult:
    shutil.rmtree(target, ignore_errors=True)
    argv = [*HOZON, "vm", "restore", f"latest:{VM_NAME}", "--to", str(target), "--format", fmt, "--repo", str(repo)]
    result, _ = bench.measure(key, "hozon", argv, env=hozon_env(repo, home), image=image, output=target)
    if result.ok:
        restored = target / f"vda.{fmt}"
        if not restored.exists():
            found = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
            result.details["verification"] = {"verified": False, "error": f"no vda.{fmt} in {target}: {found}"}
        else:
            result.details["verification"] = qemu_img_compare(restored, fmt, source)
        verification = result.details["verification"]
        result.note = "verified" if verification["verified"] else "NOT VERIFIED"
        if not verification["verified"]:
            bench.errors.append(f"hozon {key}: restored image differs from the source: {verification}")
        log(f"[hozon] {key}: {result.note} ({verification})")
    return result


# =====================================================================================================
# virtnbdbackup (libvirt)
# =====================================================================================================


def virsh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def libvirt_answers() -> bool:
    try:
        return virsh("version", timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def prepare_libvirt() -> tuple[str | None, list[str]]:
    """(reason virtnbdbackup cannot run, or None; what was done to make it run)."""
    actions: list[str] = []
    missing = [b for b in ("virtnbdbackup", "virsh", "libvirtd", "virtlogd") if not shutil.which(b)]
    if missing:
        return (
            f"{', '.join(missing)} not found on PATH (Debian: apt-get install virtnbdbackup libvirt-daemon-system)"
        ), actions
    if libvirt_answers():
        return None, actions
    if os.geteuid() != 0:
        return f"libvirtd does not answer at {LIBVIRT_URI} and starting it needs root", actions
    kvm = Path("/dev/kvm")
    if kvm.exists() and (kvm.stat().st_mode & 0o060) != 0o060:
        # libvirt re-probes QEMU for 45-57 s at every start and define while /dev/kvm is root-only
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            subprocess.run(["chgrp", "kvm", str(kvm)], check=True, capture_output=True)
            os.chmod(kvm, 0o660)
            actions.append("/dev/kvm: group kvm, mode 660")
    for daemon, sock in (("virtlogd", "/run/libvirt/virtlogd-sock"), ("libvirtd", "/run/libvirt/libvirt-sock")):
        if not Path(sock).exists():
            done = subprocess.run([daemon, "-d"], capture_output=True, text=True, timeout=60, check=False)
            actions.append(f"started {daemon} -d (exit {done.returncode})")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if libvirt_answers():
            return None, actions
        time.sleep(1)
    return f"libvirtd does not answer at {LIBVIRT_URI} (tried: {'; '.join(actions) or 'nothing'})", actions


def domain_xml(image: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def remove_domain() -> None:
    if virsh("domstate", DOMAIN).returncode != 0:
        return
    virsh("destroy", DOMAIN)
    virsh("undefine", DOMAIN, "--checkpoints-metadata")


def start_domain(image: Path, workdir: Path) -> None:
    remove_domain()
    xml = workdir / "domain.xml"
    xml.write_text(domain_xml(image))
    for args in (("define", str(xml)), ("start", "--paused", DOMAIN)):
        done = virsh(*args)
        if done.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {(done.stdout + done.stderr).strip()}")


def domain_hmp(command: str) -> str:
    done = virsh("qemu-monitor-command", DOMAIN, "--hmp", command)
    if done.returncode != 0:
        raise RuntimeError(f"virsh qemu-monitor-command --hmp {command!r}: {(done.stdout + done.stderr).strip()}")
    return done.stdout


def virtnbdbackup_version() -> str:
    done = subprocess.run(["virtnbdbackup", "--version"], capture_output=True, text=True, timeout=60, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[-1] if done.returncode == 0 else "unknown"


def virtnbdbackup_bytes_read(log_path: Path, level: str) -> Callable[[Measured], int | None]:
    """Bytes virtnbdbackup says it saves, from the last ``bytes of data extents to backup`` line."""
    pattern = re.compile(r"(\d+) bytes of data extents to backup")

    def parse(_: Measured) -> int | None:
        text = log_path.read_text(errors="replace")
        last_run = text.rsplit(f"-l {level}", 1)[-1]
        found = pattern.findall(last_run)
        return sum(int(n) for n in found) if found else None

    return parse


def virtnbdbackup_step(bench: Bench, key: str, level: str, out_dir: Path, image: DiskImage) -> StepResult:
    argv = ["virtnbdbackup", "-U", LIBVIRT_URI, "-d", DOMAIN, "-l", level, "-o", str(out_dir), "--noprogress"]
    result, _ = bench.measure(
        key,
        "virtnbdbackup",
        argv,
        image=image,
        output=out_dir,
        bytes_read=virtnbdbackup_bytes_read(bench.log_path("virtnbdbackup"), level),
    )
    return result


# =====================================================================================================
# The run
# =====================================================================================================


@dataclass
class Peer:
    """virtnbdbackup's state: usable, or why not."""

    reason: str | None = None
    actions: list[str] = field(default_factory=list)
    version: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def copy_image(source: Path, target: Path) -> float:
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shutil.copyfile(source, target)
    seconds = time.perf_counter() - start
    log(f"copied {source.name} to {target} in {seconds:.1f} s")
    return seconds


def fsync_seconds(path: Path) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return round(time.perf_counter() - start, 3)


class Run:
    """Every step of one benchmark run, in order; QEMU and the libvirt domain are always stopped."""

    def __init__(
        self, args: argparse.Namespace, image: DiskImage, quarter: DiskImage | None, bench: Bench, peer: Peer
    ) -> None:
        self.args = args
        self.image = image
        self.quarter = quarter
        self.bench = bench
        self.peer = peer
        self.dir = bench.run_dir
        self.skipped: dict[str, str] = {}
        self.change: dict[str, Any] = {}
        self.copies: dict[str, float] = {}
        self.vms: list[Vm] = []
        self.domain = False
        self.sockdir = Path(tempfile.mkdtemp(prefix="hozon-bench-vm-"))  # unix socket paths are short

    def skip(self, key: str, reason: str) -> None:
        self.skipped[key] = reason
        log(f"skipping {key}: {reason}")

    def peer_failed(self, what: str, exc: BaseException) -> None:
        self.peer.reason = f"{what}: {exc}"
        log(f"virtnbdbackup: {self.peer.reason}")

    def start_vm(self, image: Path, name: str) -> Vm:
        vm = start_vm(image, self.sockdir, name, self.bench.log_path(f"qemu-{name}"))
        self.vms.append(vm)
        return vm

    def execute(self) -> None:
        try:
            self._steps()
        finally:
            for vm in self.vms:
                vm.stop()
            if self.domain:
                with contextlib.suppress(Exception):
                    remove_domain()
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def _steps(self) -> None:
        bench, image, steps = self.bench, self.image, self.bench.steps
        source = self.dir / "hozon" / "vda.qcow2"
        self.copies["hozon"] = copy_image(image.path, source)

        # 1. the raw-copy baseline, on the image file before QEMU opens it
        raw_dir = self.dir / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        raw_out = raw_dir / "vda.raw"
        result, _ = bench.measure(
            "qemu-img convert",
            "qemu-img",
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(source), str(raw_out)],
            image=image,
            output=raw_dir,
        )
        if result.ok:
            result.bytes_read = image.allocated
            result.details["fsync_after_s"] = fsync_seconds(raw_out)  # not in wall_s (qemu-img does not sync)
            result.note = f"+{result.details['fsync_after_s']:.1f} s fsync"
        shutil.rmtree(raw_dir, ignore_errors=True)

        # the libvirt domain for virtnbdbackup, on its own copy of the image
        vnbd_dir = self.dir / "virtnbdbackup"
        vnbd_out = vnbd_dir / "backup"
        if self.peer.ok:
            try:
                self.copies["virtnbdbackup"] = copy_image(image.path, vnbd_dir / "vda.qcow2")
                self.domain = True
                start_domain(vnbd_dir / "vda.qcow2", vnbd_dir)
                vnbd_out.mkdir(parents=True)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                self.peer_failed("starting the libvirt domain failed", exc)

        # 2. Hozon full, then virtnbdbackup full
        repo, home = self.dir / "repos" / "hozon", self.dir / "home" / "hozon"
        hozon_init(bench, repo, home)
        vm = self.start_vm(source, "main")
        hozon_backup(bench, "hozon full", vm, repo, home, image, "full")
        if self.peer.ok:
            vnbd_full = virtnbdbackup_step(bench, "virtnbdbackup full", "full", vnbd_out, image)
            if not vnbd_full.ok:
                self.peer.reason = f"virtnbdbackup full backup exited {vnbd_full.exit_code}"
        else:
            self.skip("virtnbdbackup full", str(self.peer.reason))

        # 3. change 1% of the disk in both VMs, the same writes
        plan = change_plan(self.args.seed, image.size, self.args.change_write_kib * KiB)
        with vm.monitor() as monitor:
            seconds = apply_changes(monitor.hmp, "vda/virtio-backend", plan)
        self.change = {
            "writes": len(plan),
            "write_bytes": plan[0][1],
            "bytes": sum(n for _, n, _ in plan),
            "share_of_disk": round(sum(n for _, n, _ in plan) / image.size, 4),
            "hozon_chunks_touched": chunks_touched(plan),
            "seconds_qemu": round(seconds, 2),
        }
        log(
            f"changed {self.change['bytes'] / MiB:,.1f} MiB in {len(plan)} writes "
            f"({self.change['hozon_chunks_touched']} chunks of 1 MiB touched)"
        )
        if self.peer.ok:
            try:
                self.change["seconds_libvirt"] = round(
                    apply_changes(domain_hmp, "virtio-disk0/virtio-backend", plan), 2
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                self.peer_failed("writing the change through libvirt failed", exc)

        # 4. incrementals
        if steps["hozon full"].ok:
            hozon_backup(bench, "hozon incremental", vm, repo, home, image, "incremental")
        else:
            self.skip("hozon incremental", "the full backup failed")
        if self.peer.ok:
            virtnbdbackup_step(bench, "virtnbdbackup incremental", "inc", vnbd_out, image)
        else:
            self.skip("virtnbdbackup incremental", str(self.peer.reason))
        vm.stop()
        if self.domain:
            remove_domain()
            self.domain = False
        shutil.rmtree(vnbd_dir, ignore_errors=True)

        # 5. restores of the latest snapshot, compared with the VM's image (QEMU has stopped)
        for fmt in ("qcow2", "raw"):
            key = f"hozon restore {fmt}"
            incremental = steps.get("hozon incremental")
            if incremental is None or not incremental.ok:
                self.skip(key, "the incremental backup (the latest snapshot) failed")
                continue
            target = self.dir / "restore" / fmt
            hozon_restore(bench, key, fmt, repo, home, image, source, target)
            shutil.rmtree(target, ignore_errors=True)

        # 6. a full backup of a quarter-size disk: does peak RSS grow with the disk?
        if self.quarter is not None:
            self._quarter(self.quarter)

    def _quarter(self, quarter: DiskImage) -> None:
        source = self.dir / "quarter" / "vda.qcow2"
        self.copies["quarter"] = copy_image(quarter.path, source)
        repo, home = self.dir / "repos" / "hozon-quarter", self.dir / "home" / "hozon-quarter"
        hozon_init(self.bench, repo, home)
        vm = self.start_vm(source, "quarter")
        hozon_backup(self.bench, "hozon full, quarter disk", vm, repo, home, quarter, "full")
        vm.stop()


# =====================================================================================================
# Report
# =====================================================================================================


def evaluate_targets(steps: dict[str, StepResult]) -> list[Target]:
    def ok(key: str) -> StepResult | None:
        step = steps.get(key)
        return step if step is not None and step.ok else None

    def ratio(a: StepResult | None, b: StepResult | None, attr: str = "wall_s") -> float | None:
        return getattr(a, attr) / getattr(b, attr) if a and b and getattr(b, attr) else None

    convert, full, incremental = ok("qemu-img convert"), ok("hozon full"), ok("hozon incremental")
    quarter = ok("hozon full, quarter disk")
    targets = [
        make_target(
            "hozon full throughput / qemu-img convert -O raw",
            ratio(convert, full),
            ">=",
            0.8,
            "same disk, so = convert time / hozon time",
        ),
        make_target("hozon incremental (1% changed) time / full time", ratio(incremental, full), "<", 0.05),
    ]
    for fmt in ("qcow2", "raw"):
        restore = ok(f"hozon restore {fmt}")
        target = make_target(f"hozon restore ({fmt}) time / full backup time", ratio(restore, full), "<=", 1.0)
        if restore is not None and not restore.details.get("verification", {}).get("verified"):
            target.met, target.note = False, "restore not verified"
        targets.append(target)
    if incremental is not None and "incremental" not in incremental.note.split("/"):
        targets[1].note = f"not incremental: {incremental.note}"
    rss = [s.peak_rss_mib for s in steps.values() if s.tool == "hozon" and s.ok]
    targets.append(
        make_target("hozon peak RSS, MiB (max over its steps)", max(rss) if rss else None, "<", RSS_TARGET_MIB)
    )
    targets.append(
        make_target(
            "hozon peak RSS, full-size / quarter-size disk backup",
            ratio(full, quarter, "peak_rss_mib"),
            "<=",
            RSS_GROWTH_MAX,
            "memory must not grow with disk size",
        )
    )
    return targets


def results_table(steps: dict[str, StepResult], skipped: dict[str, str]) -> str:
    rows = [
        ["step", "tool", "seconds", "virt MB/s", "alloc MB/s", "read MiB", "output MiB", "RSS MiB", "CPU s", "note"]
    ]
    for key, s in steps.items():
        ok = s.ok
        rows.append(
            [
                key,
                s.tool,
                f"{s.wall_s:.2f}",
                f"{s.virtual_mb_s:,.0f}" if ok else "-",
                f"{s.allocated_mb_s:,.0f}" if ok else "-",
                "-" if s.bytes_read is None else f"{s.bytes_read / MiB:,.0f}",
                f"{s.output_bytes / MiB:,.0f}",
                f"{s.peak_rss_mib:.0f}",
                f"{s.user_s + s.sys_s:.1f}",
                s.note,
            ]
        )
    for key, reason in skipped.items():
        if key not in steps:
            rows.append([key, key.split()[0], "-", "-", "-", "-", "-", "-", "-", f"skipped: {reason}"])
    return format_table(rows, right_from=2)


def relative_table(steps: dict[str, StepResult]) -> str | None:
    pairs = [
        ("full time", "hozon full", "virtnbdbackup full", "wall_s"),
        ("incremental time", "hozon incremental", "virtnbdbackup incremental", "wall_s"),
        ("stored after incremental", "hozon incremental", "virtnbdbackup incremental", "output_bytes"),
        ("peak RSS, full", "hozon full", "virtnbdbackup full", "peak_rss_mib"),
    ]
    rows = [["hozon / virtnbdbackup", "hozon", "virtnbdbackup", "ratio"]]
    for label, a_key, b_key, attr in pairs:
        a, b = steps.get(a_key), steps.get(b_key)
        if not (a and b and a.ok and b.ok):
            continue
        va, vb = float(getattr(a, attr)), float(getattr(b, attr))
        unit = (lambda v: f"{v / MiB:,.0f} MiB") if attr == "output_bytes" else (lambda v: f"{v:,.2f}")
        rows.append([label, unit(va), unit(vb), f"{va / vb:.2f}" if vb else "-"])
    return format_table(rows, right_from=1) if len(rows) > 1 else None


# =====================================================================================================
# Main
# =====================================================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work dir (default: bench/work)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="where the JSON goes")
    parser.add_argument("--scale", type=float, default=1.0, help="disk size x (1: 8 GiB; 0.05 for a smoke run)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="disk content PRNG seed")
    parser.add_argument(
        "--change-write-kib",
        type=int,
        default=256,
        help="size of each write of the 1%% change, KiB (default 256, aligned to its size)",
    )
    parser.add_argument("--no-virtnbdbackup", action="store_true", help="leave out the virtnbdbackup peer")
    parser.add_argument("--no-quarter", action="store_true", help="skip the quarter-size disk (RSS growth) run")
    parser.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache between steps")
    parser.add_argument("--keep", action="store_true", help="keep image copies, repositories and outputs")
    parser.add_argument(
        "--hozon-src",
        type=Path,
        default=PROJECT_DIR / "src",
        help="src/ of the Hozon to measure (default: this checkout's), e.g. a `git archive HEAD src` export",
    )
    parser.add_argument("--generate-only", action="store_true", help="only generate / check the disk images")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    if args.change_write_kib <= 0 or args.change_write_kib % 4:
        parser.error("--change-write-kib must be a positive multiple of 4")
    args.work = args.work.resolve()
    args.hozon_src = args.hozon_src.resolve()
    if not (args.hozon_src / "hozon" / "__init__.py").is_file():
        parser.error(f"--hozon-src: no hozon package in {args.hozon_src}")
    return args


def check_free_space(work: Path, images: list[DiskImage]) -> None:
    main = images[0].summary.get("file_bytes", images[0].allocated)
    needed = 6 * main + sum(i.summary.get("file_bytes", i.allocated) for i in images[1:])
    free = shutil.disk_usage(work).free
    if free < needed:
        log(f"WARNING: {free / GiB:.1f} GiB free in {work}, the run may need about {needed / GiB:.1f} GiB")


def main(argv: list[str] | None = None) -> int:
    global HOZON_SRC
    args = parse_args(argv)
    HOZON_SRC = args.hozon_src
    args.work.mkdir(parents=True, exist_ok=True)
    image = ensure_image(args.work, args.seed, args.scale)
    quarter = None if args.no_quarter else ensure_image(args.work, args.seed, args.scale / 4)
    images = [i for i in (image, quarter) if i is not None]
    if args.generate_only:
        print(json.dumps({str(i.path): i.summary for i in images}, indent=2))
        return 0

    run_dir = args.work / "vm" / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    check_free_space(args.work, images)
    drop = not args.no_drop_caches
    if drop and not drop_caches():
        log("cannot drop the page cache (needs root); continuing without (use --no-drop-caches to silence)")
        drop = False

    tools: dict[str, dict[str, Any]] = {
        "hozon": {"version": hozon_version(), "src": str(HOZON_SRC), "src_changes": source_changes()}
    }
    if tools["hozon"]["src_changes"]:
        log(f"NOTE: src/ has uncommitted changes, they are what is measured: {tools['hozon']['src_changes']}")
    done = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=False)
    tools["qemu-img"] = {"version": done.stdout.strip().splitlines()[0] if done.stdout else "unknown"}
    peer = Peer(reason="--no-virtnbdbackup") if args.no_virtnbdbackup else Peer(*prepare_libvirt())
    for action in peer.actions:
        log(f"libvirt: {action}")
    if peer.ok:
        peer.version = virtnbdbackup_version()
        log(f"virtnbdbackup {peer.version}")
    else:
        log(f"SKIPPING virtnbdbackup: {peer.reason}")

    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        log(f"WARNING: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs: other work skews the timings")
    started = datetime.now(UTC)
    bench = Bench(run_dir, drop)
    run = Run(args, image, quarter, bench, peer)
    crash: str | None = None
    try:
        run.execute()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        crash = f"{type(exc).__name__}: {exc}"
        bench.errors.append(f"benchmark stopped: {crash}")
        log(f"benchmark stopped: {crash}")
    tools["virtnbdbackup"] = {
        "available": peer.version is not None,
        "version": peer.version,
        "skip_reason": peer.reason,
        "libvirt_actions": peer.actions,
    }
    load_after = os.getloadavg()
    targets = evaluate_targets(bench.steps)
    changes_after = source_changes()
    if changes_after != tools["hozon"]["src_changes"]:
        tools["hozon"]["src_changes_after"] = changes_after
        bench.errors.append(f"src/ changed while the benchmark ran: {changes_after}")

    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out_path = args.results / f"vm-{stamp}.json"
    write_results(
        out_path,
        {
            "benchmark": "vm",
            "started_utc": started.isoformat(),
            "finished_utc": datetime.now(UTC).isoformat(),
            "options": {
                "argv": sys.argv[1:],
                "scale": args.scale,
                "seed": args.seed,
                "drop_caches": drop,
                "change_write_kib": args.change_write_kib,
                "virtnbdbackup": not args.no_virtnbdbackup,
                "quarter": not args.no_quarter,
            },
            "machine": {
                **machine_info(args.work),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in load_after],
            },
            "tools": tools,
            "images": {
                "main": {"path": str(image.path), "generated_s": image.generated_s, **image.summary},
                "quarter": None
                if quarter is None
                else {"path": str(quarter.path), "generated_s": quarter.generated_s, **quarter.summary},
            },
            "copy_seconds": {k: round(v, 2) for k, v in run.copies.items()},
            "change": run.change,
            "steps": {key: asdict(s) for key, s in bench.steps.items()},
            "skipped": run.skipped,
            "targets": [asdict(t) for t in targets],
            "errors": bench.errors,
            "logs": str(run_dir / "logs"),
        },
    )
    if not args.keep:
        for sub in ("hozon", "quarter", "repos", "home", "restore", "raw", "virtnbdbackup"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)

    print()
    print(
        f"VM benchmark: {image.size / GiB:.2f} GiB virtual disk, {image.allocated / GiB:.2f} GiB allocated "
        f"(scale {args.scale:g}); change {run.change.get('bytes', 0) / MiB:,.1f} MiB in "
        f"{run.change.get('writes', 0)} writes; page cache {'dropped' if drop else 'NOT dropped'} between steps; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after ({os.cpu_count()} CPUs)"
    )
    print(results_table(bench.steps, run.skipped))
    relative = relative_table(bench.steps)
    if relative:
        print()
        print(relative)
    print()
    print("Targets:")
    print(targets_text(targets))
    if not peer.ok:
        print(f"  note: virtnbdbackup skipped: {peer.reason}")
    if tools["hozon"]["src_changes"]:
        print(f"  note: measured with uncommitted changes in src/: {', '.join(tools['hozon']['src_changes'])}")
    for error in bench.errors:
        print(f"  error: {error.splitlines()[0]}")
    print(f"\nresults: {out_path}\nlogs: {run_dir / 'logs'}")
    return 0 if not bench.errors and crash is None else 2


if __name__ == "__main__":
    sys.exit(main())
