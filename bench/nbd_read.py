#!/usr/bin/env python3
"""NBD read benchmark: Hozon's NBD client reading a qcow2 through qemu-nbd.

Usage (from the repository root, after ``pip install -e .``)::

    python bench/nbd_read.py                 # 1 GiB of data, 5 runs per configuration
    python bench/nbd_read.py --size-gib 4 --runs 3

What it does:

1. Builds (once, cached under ``bench/work/nbd/``) a qcow2 whose every byte was written by
   qemu-io (a different pattern per 64 MiB), and serves it read-only with ``qemu-nbd`` on a unix
   socket; the image is read from the page cache, so this measures the protocol path, not a disk.
2. Reads the whole disk with each configuration: one request at a time (``read``), and
   ``read_many`` with several requests in flight; reports GB/s (median and best of ``--runs``).
   As a reference, ``qemu-img convert`` copies the same export to QEMU's null driver.
3. Times ``allocation()`` (block status walk) over a sparse 1 TiB qcow2 with a few data regions.

Prints a table and writes ``bench/results/nbd-read-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "src"))

from hozon.nbd import NbdClient  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=3600)


def build_image(path: Path, size: int) -> None:
    marker = path.with_suffix(".done")
    if path.exists() and marker.exists() and marker.read_text() == str(size):
        return
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    step = 64 * MiB
    commands = [arg for off in range(0, size, step) for arg in ("-c", f"write -P {1 + off // step % 250} {off} {step}")]
    run("qemu-io", "-f", "qcow2", *commands, str(path))
    marker.write_text(str(size))


@contextlib.contextmanager
def serve(image: Path, sock: Path) -> Iterator[str]:
    args = ["qemu-nbd", f"--socket={sock}", "--format=qcow2", "--persistent", "--shared=8", "--read-only", str(image)]
    proc = subprocess.Popen(args)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.02)
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(10)


def read_one_at_a_time(path: str, request: int) -> int:
    with NbdClient.connect_unix(path) as client:
        total = 0
        for offset in range(0, client.size, request):
            total += len(client.read(offset, min(request, client.size - offset), depth=1))
        return total


def read_pipelined(path: str, request: int, depth: int) -> int:
    with NbdClient.connect_unix(path) as client:
        wanted = ((o, min(request, client.size - o)) for o in range(0, client.size, request))
        return sum(len(data) for _, data in client.read_many(wanted, depth=depth))


def qemu_img_convert(path: str, size: int) -> int:
    run(
        "qemu-img", "convert", "-n", "-f", "raw", f"nbd+unix:///?socket={path}",
        "--target-image-opts", f"driver=null-co,size={size}",
    )  # fmt: skip
    return size


def measure(fn: Callable[[], int], runs: int) -> dict[str, Any]:
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        total = fn()
        rates.append(total / (time.perf_counter() - started) / 1e9)
    return {"gb_per_s_median": statistics.median(rates), "gb_per_s_best": max(rates), "runs": rates}


def allocation_walk(work: Path, sock: Path) -> dict[str, Any]:
    image = work / "sparse-1t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(1024 * GiB))
    run("qemu-io", "-f", "qcow2", *[a for i in range(16) for a in ("-c", f"write -P 7 {i * 64 * GiB} 1M")], str(image))
    with serve(image, sock) as path, NbdClient.connect_unix(path) as client:
        started = time.perf_counter()
        extents = client.allocation()
        seconds = time.perf_counter() - started
    image.unlink()
    return {"disk_bytes": 1024 * GiB, "extents": len(extents), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work" / "nbd")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (Debian package qemu-utils)")
    size = int(args.size_gib * GiB)
    args.work.mkdir(parents=True, exist_ok=True)
    image = args.work / f"data-{size}.qcow2"
    build_image(image, size)

    configs: list[tuple[str, Callable[[str], int]]] = [
        ("one at a time, 1 MiB", lambda path: read_one_at_a_time(path, MiB)),
        ("one at a time, 4 MiB", lambda path: read_one_at_a_time(path, 4 * MiB)),
        ("2 x 1 MiB in flight", lambda path: read_pipelined(path, MiB, 2)),
        ("4 x 1 MiB in flight", lambda path: read_pipelined(path, MiB, 4)),
        ("8 x 1 MiB in flight", lambda path: read_pipelined(path, MiB, 8)),
        ("4 x 4 MiB in flight", lambda path: read_pipelined(path, 4 * MiB, 4)),
        ("qemu-img convert (reference)", lambda path: qemu_img_convert(path, size)),
    ]
    results = []
    with tempfile.TemporaryDirectory(prefix="hozon-bench-") as tmp:
        sock = Path(tmp) / "nbd.sock"
        with serve(image, sock) as path:
            read_pipelined(path, MiB, 4)  # warm the page cache
            for name, fn in configs:
                result = {"config": name, **measure(lambda fn=fn: fn(path), args.runs)}  # type: ignore[misc]
                results.append(result)
                print(f"{name:32} {result['gb_per_s_median']:5.2f} GB/s (best {result['gb_per_s_best']:.2f})")
        walk = allocation_walk(args.work, Path(tmp) / "sparse.sock")
        print(f"allocation() of a sparse 1 TiB qcow2: {walk['seconds']:.2f} s, {walk['extents']} extents")

    stamp = datetime.now(UTC)
    out = BENCH_DIR / "results" / f"nbd-read-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(exist_ok=True)
    doc = {
        "time": stamp.isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "disk_bytes": size,
        "results": results,
        "allocation_walk": walk,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
