#!/usr/bin/env python3
"""Checkpoint benchmark: ``hozon vm checkpoint`` of a running guest with 1 GiB of RAM, twice.

Usage (from the repository root, with the project's environment)::

    python bench/checkpoint.py                  # 1 GiB guest, ~600 MiB of it filled
    python bench/checkpoint.py --memory 256 --fill 96   # smoke run

The guest is the tiny real Linux of the tests (``tests/guest.py``: Debian's kernel, a busybox
initramfs), booted under TCG. Its script fills part of its memory (``--fill`` MiB in a RAM file
system: a quarter random, the rest text-like), prints ``FILLED`` and then counts on its serial
console, otherwise idle. Measured, for a first and a second checkpoint a few seconds apart into
one encrypted repository: the guest's pause (Hozon's ``pause_ms``: from ``stop`` until QEMU runs
the guest again, and QEMU's own ``downtime``), the whole command's wall time and peak RSS, the
state stream's size, and how much the repository grew (``du``). The second checkpoint shows how
much deduplication saves on a mostly idle guest. Then ``hozon vm memory`` (the ELF export) is
timed. Results go to ``bench/results/checkpoint-<UTC timestamp>.json``, and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import guest  # noqa: E402  (the test guest, built once per machine)

PASSWORD = "bench-password"
FILL_SCRIPT = """
mkdir -p /fill && mount -t tmpfs -o size=2g tmpfs /fill
dd if=/dev/urandom of=/fill/random bs=1M count={random} 2>/dev/null
i=0
while [ $i -lt {text} ]; do
    yes "hozon checkpoint benchmark line $i of text that compresses somewhat" | head -c 1048576 > /fill/text.$i
    i=$((i+1))
done
echo FILLED
n=0
while true; do n=$((n+1)); echo "TICK $n"; sleep 1; done
"""


def du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def hozon(env: dict[str, str], *args: str) -> tuple[float, float, str]:
    """Run hozon; (seconds, peak RSS MiB from wait4, stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "hozon", *args], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"hozon {' '.join(args)} failed ({proc.returncode}):\n{err.read()}")
        return took, usage.ru_maxrss / 1024, out.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM, MiB")
    parser.add_argument("--fill", type=int, default=600, help="MiB of the guest's memory to fill")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds between the two checkpoints")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hozon-bench-checkpoint-"))
    env = {**os.environ, "HOZON_PASSWORD": PASSWORD, "HOZON_REPO": str(work / "repo"),
           "PYTHONPATH": str(ROOT / "src")}
    random_mib = args.fill // 4
    initrd = guest.build_initramfs(FILL_SCRIPT.format(random=random_mib, text=args.fill - random_mib))
    disk, serial, qmp = work / "vda.qcow2", work / "serial.log", work / "hozon.qmp"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", str(args.memory), "-nodefaults",
            "-display", "none", "-qmp", f"unix:{qmp},server=on,wait=off", "-serial", f"file:{serial}",
            "-blockdev", f"driver=qcow2,node-name=vda-format,file.driver=file,file.filename={disk}",
            "-device", "virtio-blk-pci,drive=vda-format,id=vda", *guest.boot_args(initrd)]
    config = work / "vm.cmdline"
    config.write_text(shlex.join(argv) + "\n")
    vm = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, Any] = {"memory_mib": args.memory, "fill_mib": args.fill, "steps": []}
    try:
        print(f"booting a {args.memory} MiB guest and filling {args.fill} MiB of it (TCG: a few minutes)…")
        filled = guest.wait_for_serial(serial, "FILLED", timeout=1800, alive=lambda: vm.poll() is None)
        results["fill_seconds"] = round(filled, 1)
        hozon(env, "init")
        for step in ("first", "second"):
            if step == "second":
                time.sleep(args.idle)
            before = du(work / "repo")
            took, rss, out = hozon(env, "vm", "checkpoint", "--qmp", str(qmp), "--name", "bench", "--vm-config",
                                   str(config), "--json")
            snap = json.loads(out)["snapshot"]
            s = snap["summary"]
            growth = du(work / "repo") - before
            results["steps"].append({
                "step": step, "seconds": round(took, 2), "pause_ms": s["pause_ms"],
                "qemu_downtime_ms": snap["extra"]["state"].get("downtime_ms"), "state_bytes": s["state_bytes"],
                "repo_growth_bytes": growth, "growth_of_state": round(growth / s["state_bytes"], 4),
                "data_added": s["data_added"], "peak_rss_mib": round(rss, 1), "id": snap["id"],
            })
        core = work / "memory.elf"
        took, rss, _ = hozon(env, "vm", "memory", results["steps"][0]["id"], "--to", str(core))
        results["memory_export"] = {"seconds": round(took, 2), "bytes": core.stat().st_size}
    finally:
        vm.kill()
        vm.wait()
    print(f"\ncheckpoint of a running guest: {args.memory} MiB RAM, {args.fill} MiB filled (TCG)")
    print(f"{'step':<8} {'seconds':>8} {'pause ms':>9} {'QEMU downtime ms':>17} {'state MiB':>10} "
          f"{'repo growth MiB':>16} {'growth/state':>13} {'peak RSS MiB':>13}")
    for r in results["steps"]:
        print(f"{r['step']:<8} {r['seconds']:>8.2f} {r['pause_ms']:>9.1f} {r['qemu_downtime_ms']!s:>17} "
              f"{r['state_bytes'] / 2**20:>10.1f} {r['repo_growth_bytes'] / 2**20:>16.1f} "
              f"{r['growth_of_state']:>13.1%} {r['peak_rss_mib']:>13.1f}")
    m = results["memory_export"]
    print(f"memory export (ELF core of {m['bytes'] / 2**20:.0f} MiB): {m['seconds']:.1f} s")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"checkpoint-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
