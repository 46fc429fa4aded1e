"""Fixtures for end-to-end tests against a real QEMU.

``qemu_vm`` starts ``qemu-system-x86_64`` with two QMP sockets (one for the test, one kept free
for Hozon: a QMP socket serves one client at a time) and qcow2 disks on virtio-blk, and always
kills it at teardown. Without ``-kernel`` it is paused (``-S``) and runs no guest code, which is
all block-layer work needs; guest writes then come from HMP ``qemu-io -d NAME/virtio-backend``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hozon.sources.qemu import QmpClient

QEMU = "qemu-system-x86_64"

# Marks for a module whose tests boot the tiny real guest (tests/guest.py): ``pytestmark = [timeout, *NEEDS_GUEST]``.
NEEDS_GUEST = [
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
        reason="needs qemu-system-x86_64 and qemu-img (Debian qemu-system-x86, qemu-utils); CI installs them",
    ),
    pytest.mark.skipif(
        shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
        reason="the test guest is built from Debian packages (apt-get download, dpkg-deb); CI runs on Debian",
    ),
]


@dataclass(frozen=True)
class QemuDisk:
    """A disk of a test VM: ``name`` is the device's qdev id, ``node`` the format node's name."""

    name: str
    path: Path
    node: str
    format: str

    @property
    def qemu_io_device(self) -> str:
        """What HMP ``qemu-io -d`` takes to write through the device, as a guest would."""
        return f"{self.name}/virtio-backend"


@dataclass
class QemuVm:
    """A running ``qemu-system-x86_64``."""

    proc: subprocess.Popen[bytes]
    qmp_path: Path  # the test's monitor
    hozon_qmp_path: Path  # a second monitor, left free for Hozon
    disks: dict[str, QemuDisk]
    log_path: Path  # QEMU's stdout and stderr (HMP qemu-io prints here)
    serial_log: Path | None = None
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def monitor(self, timeout: float = 10.0) -> QmpClient:
        """A client on the test's monitor (close it, or use ``with``)."""
        return QmpClient.connect(self.qmp_path, timeout=timeout)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (QEMU flushes its images and exits), then SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """kill -9: no flush, no clean shutdown, as in a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


QemuVmFactory = Callable[..., QemuVm]


@pytest.fixture
def qemu_vm(tmp_path: Path) -> Iterator[QemuVmFactory]:
    """Start QEMU VMs: ``qemu_vm(disks=[("vda", "64M")], extra_args=[...])`` → :class:`QemuVm`.

    Keyword options: ``paused`` (default True: ``-S``, no guest code runs), ``machine`` ("q35"),
    ``memory`` (MiB), ``serial`` (True: ``-serial file:`` into ``vm.serial_log``), ``disk_format``
    ("qcow2" or "raw"). Disks are created in tmp_path as NAME.FORMAT; QEMU runs under TCG.
    Every VM is killed at teardown.
    """
    sockdir = Path(tempfile.mkdtemp(prefix="hozon-qemu-"))  # unix socket paths are limited to 107 bytes
    started: list[QemuVm] = []

    def start(
        disks: Sequence[tuple[str, int | str]] = (("vda", "64M"),),
        extra_args: Sequence[str] = (),
        *,
        paused: bool = True,
        machine: str = "q35",
        memory: int = 128,
        serial: bool = False,
        disk_format: str = "qcow2",
    ) -> QemuVm:
        n = len(started)
        workdir = tmp_path / f"vm{n}"
        workdir.mkdir()
        qmp_path, hozon_qmp_path = sockdir / f"vm{n}-test.qmp", sockdir / f"vm{n}-hozon.qmp"
        args = [QEMU, "-accel", "tcg", "-machine", machine, "-m", str(memory), "-nodefaults", "-display", "none",
                "-qmp", f"unix:{qmp_path},server=on,wait=off", "-qmp", f"unix:{hozon_qmp_path},server=on,wait=off"]
        if paused:
            args.append("-S")
        serial_log = None
        if serial:
            serial_log = workdir / "serial.log"
            args += ["-serial", f"file:{serial_log}"]
        vm_disks: dict[str, QemuDisk] = {}
        for name, size in disks:
            image = workdir / f"{name}.{disk_format}"
            subprocess.run(["qemu-img", "create", "-q", "-f", disk_format, str(image), str(size)],
                           check=True, capture_output=True, timeout=60)
            disk = QemuDisk(name, image, f"{name}-format", disk_format)
            args += ["-blockdev", f"driver={disk_format},node-name={disk.node},file.driver=file,"
                                  f"file.node-name={name}-file,file.filename={image}",
                     "-device", f"virtio-blk-pci,drive={disk.node},id={name}"]
            vm_disks[name] = disk
        args += list(extra_args)
        log_path = workdir / "qemu.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        vm = QemuVm(proc, qmp_path, hozon_qmp_path, vm_disks, log_path, serial_log, args)
        started.append(vm)
        deadline = time.monotonic() + 30
        while not (qmp_path.exists() and hozon_qmp_path.exists()):
            if proc.poll() is not None:
                raise AssertionError(f"QEMU exited with {proc.returncode} at start:\n{vm.output()}\n{args}")
            if time.monotonic() > deadline:
                raise AssertionError(f"QEMU made no QMP socket within 30 s:\n{vm.output()}")
            time.sleep(0.01)
        return vm

    yield start
    for vm in started:
        with contextlib.suppress(Exception):
            vm.kill()
    shutil.rmtree(sockdir, ignore_errors=True)
