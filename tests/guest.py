"""A tiny real Linux guest for end-to-end tests: Debian's kernel and a busybox initramfs.

Built once per machine and cached (``~/.cache/hozon-test-guest/KEY/``, or ``$HOZON_TEST_GUEST_CACHE``),
keyed by the package versions and the init script below. The packages are fetched with
``apt-get download`` (no install, so it works on any Debian 12 with a reachable mirror) and only the
files needed are taken out of them: the kernel image, seven virtio modules (decompressed when the
package ships them as ``.ko.xz``/``.ko.zst``/``.ko.gz``) and the static busybox.

The initramfs's ``/init`` mounts proc, sys and devtmpfs, loads the virtio modules, prints
:data:`READY_MARKER` on the serial console, runs ``/test.sh`` (the script a test passes to
:func:`build_initramfs`), prints ``HOZON-GUEST-EXIT <status>``, syncs and powers off, so QEMU started
with ``-no-reboot`` exits when the script is done. Disks on virtio-blk appear as /dev/vda, /dev/vdb, …

Usage::

    initrd = build_initramfs("echo hi > /dev/ttyS0; echo HELLO | dd of=/dev/vda conv=notrunc")
    vm = qemu_vm(disks=[("vda", "16M")], extra_args=boot_args(initrd), paused=False, serial=True)
    wait_for_serial(vm.serial_log, READY_MARKER, timeout=60)

Archives are written in the cpio "newc" format by this module itself (there is no ``cpio`` on
the machine); the per-test script travels as a second archive appended to the cached one, which
the kernel unpacks on top of the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk",
           "virtio_console")  # virtio_console: virtio-serial ports (/dev/vport*p*), e.g. the guest agent's
READY_MARKER = "HOZON-GUEST-READY"
EXIT_MARKER = "HOZON-GUEST-EXIT"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
FORMAT = 1  # bump when what is built changes in a way the key below does not see

INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in {" ".join(MODULES)}; do
    if [ -f /lib/modules/$m.ko ]; then
        insmod /lib/modules/$m.ko || echo "HOZON-GUEST: insmod $m failed"
    fi
done
echo {READY_MARKER}
if [ -f /test.sh ]; then
    sh /test.sh
    echo "{EXIT_MARKER} $?"
fi
sync
poweroff -f
"""


class GuestBuildError(Exception):
    """The test guest could not be built (no apt-get, no mirror, an unexpected package layout)."""


@dataclass(frozen=True)
class Guest:
    kernel: Path  # bzImage for -kernel
    initramfs: Path  # the cached base archive, without /test.sh
    kernel_release: str  # e.g. "6.1.0-56-amd64"
    packages: dict[str, str]  # package → version it was built from


# -- public helpers ------------------------------------------------------------------------------


def kernel_path() -> Path:
    return guest().kernel


def build_initramfs(script: str, dest: Path | None = None, files: Mapping[str, bytes] | None = None) -> Path:
    """The guest's initramfs with ``script`` as /test.sh (and ``files``: {absolute path: content}).

    Without ``dest`` it is written next to the cache, named by its content, and reused.
    """
    base = guest().initramfs.read_bytes()
    entries: list[tuple[str, int, bytes]] = []
    for name in sorted(files or {}):
        _parents(name, entries)
        entries.append((name, stat.S_IFREG | 0o644, (files or {})[name]))
    entries.append(("/test.sh", stat.S_IFREG | 0o755, script.encode()))
    data = base + newc_archive(entries, first_inode=100_000)
    if dest is None:
        dest = guest().initramfs.parent / "initrd" / f"{hashlib.sha256(data).hexdigest()[:20]}.cpio"
        if dest.exists():
            return dest
    _write_atomically(dest, data)
    return dest


def boot_args(initrd: Path, append: str = "") -> list[str]:
    """QEMU arguments that boot the guest (add disks, ``-serial file:…``, memory and the rest yourself)."""
    cmdline = f"console=ttyS0 panic=-1 quiet {append}".strip()
    return ["-kernel", str(kernel_path()), "-initrd", str(initrd), "-append", cmdline, "-no-reboot"]


def wait_for_serial(log: Path, marker: str, timeout: float, alive: Callable[[], bool] | None = None) -> float:
    """Wait until ``marker`` appears in the serial log; the seconds it took. ``alive()`` false: stop early."""
    started = time.monotonic()
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return time.monotonic() - started
        if alive is not None and not alive():
            raise AssertionError(f"the guest stopped before printing {marker!r}; serial log:\n{text[-4000:]}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{marker!r} did not appear on the serial console within {timeout:g} s; "
                                 f"serial log:\n{text[-4000:]}")
        time.sleep(0.1)


# -- building --------------------------------------------------------------------------------------


def cache_root() -> Path:
    if os.environ.get("HOZON_TEST_GUEST_CACHE"):
        return Path(os.environ["HOZON_TEST_GUEST_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hozon-test-guest"


@functools.cache
def guest() -> Guest:
    """The cached guest, built first if this machine has none for today's package versions.

    As root, a failed download is retried once after ``apt-get update``: package lists older
    than the mirror name kernel versions it no longer serves.
    """
    try:
        return _guest()
    except GuestBuildError:
        if os.geteuid() != 0:
            raise
    _apt("apt-get", "update", "-qq", what="update the package lists")
    return _guest()


def _guest() -> Guest:
    kernel_package = _kernel_package()
    packages = {kernel_package: _candidate_version(kernel_package),
                BUSYBOX_PACKAGE: _candidate_version(BUSYBOX_PACKAGE)}
    key_source = json.dumps({"format": FORMAT, "packages": packages, "init": INIT, "modules": MODULES},
                            sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    root = cache_root()
    final = root / key
    if not (final / "info.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with (root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building the same guest
            if not (final / "info.json").exists():
                for stale in root.glob("build-*"):  # left by a build that was killed; nobody else builds now
                    shutil.rmtree(stale, ignore_errors=True)
                _build(packages, kernel_package, root, final)
    info = json.loads((final / "info.json").read_text())
    return Guest(final / "vmlinuz", final / "base.cpio", info["kernel_release"], info["packages"])


def _build(packages: dict[str, str], kernel_package: str, root: Path, final: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        _download(packages, work)
        debs = {name: _deb_for(work, name) for name in packages}
        kernel, release, modules = _take_kernel(debs[kernel_package])
        busybox = _take_busybox(debs[BUSYBOX_PACKAGE])
        entries: list[tuple[str, int, bytes]] = []
        for directory in ("/bin", "/dev", "/proc", "/sys", "/tmp", "/run", "/mnt", "/lib", "/lib/modules"):
            entries.append((directory, stat.S_IFDIR | 0o755, b""))
        entries.append(("/dev/console", stat.S_IFCHR | 0o600, (5 << 8 | 1).to_bytes(4, "big")))
        entries.append(("/bin/busybox", stat.S_IFREG | 0o755, busybox))
        entries.append(("/init", stat.S_IFREG | 0o755, INIT.encode()))
        for name, data in modules.items():
            entries.append((f"/lib/modules/{name}.ko", stat.S_IFREG | 0o644, data))
        out = work / "out"
        out.mkdir()
        (out / "vmlinuz").write_bytes(kernel)
        (out / "base.cpio").write_bytes(newc_archive(entries))
        info = {"kernel_release": release, "packages": packages, "modules": sorted(modules),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "info.json").write_text(json.dumps(info, indent=1))  # written last: marks a finished build
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _apt(*args: str, what: str, cwd: Path | None = None) -> str:
    if shutil.which(args[0]) is None:
        raise GuestBuildError(f"cannot {what}: {args[0]} is missing (the test guest is built from Debian packages)")
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "LC_ALL": "C"})
    if done.returncode != 0:
        raise GuestBuildError(f"cannot {what}: {' '.join(args)} exited {done.returncode}: "
                              f"{done.stderr.strip()[-2000:]}")
    return done.stdout


def _kernel_package() -> str:
    """The versioned kernel package the meta package points at (e.g. linux-image-6.1.0-56-amd64)."""
    out = _apt("apt-cache", "depends", KERNEL_META_PACKAGE,
               what=f"find the kernel {KERNEL_META_PACKAGE} depends on (run apt-get update?)")
    found = re.findall(r"^\s*Depends: (linux-image-\S+)$", out, re.MULTILINE)
    if not found:
        raise GuestBuildError(f"apt-cache depends {KERNEL_META_PACKAGE} names no linux-image package; "
                              "run apt-get update")
    return str(found[0])


def _candidate_version(package: str) -> str:
    out = _apt("apt-cache", "show", "--no-all-versions", package, what=f"find the version of {package}")
    match = re.search(r"^Version: (\S+)$", out, re.MULTILINE)
    if match is None:
        raise GuestBuildError(f"apt-cache show {package} gave no version; run apt-get update")
    return match.group(1)


def _download(packages: dict[str, str], work: Path) -> None:
    args = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        args += ["-o", "APT::Sandbox::User=root"]  # _apt could not write into our directory
    args += [f"{name}={version}" for name, version in packages.items()]
    # apt-get download saves into its working directory
    _apt(*args, what="download the test guest's packages (is a Debian mirror reachable?)", cwd=work)


def _deb_for(work: Path, package: str) -> Path:
    found = sorted(work.glob(f"{package}_*.deb"))
    if not found:
        raise GuestBuildError(f"apt-get download reported success but left no {package}_*.deb in {work}")
    return found[0]


def _extract(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of a .deb whose names ``wanted`` accepts, streamed without unpacking it all."""
    if shutil.which("dpkg-deb") is None:
        raise GuestBuildError("cannot unpack the test guest's packages: dpkg-deb is missing")
    found: dict[str, bytes] = {}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and wanted(member.name):
                        handle = tar.extractfile(member)
                        assert handle is not None
                        found[member.name] = handle.read()
        except tarfile.TarError as exc:
            proc.kill()
            raise GuestBuildError(f"cannot read {deb.name}: {exc}") from exc
        err = proc.stderr.read()
    if proc.returncode != 0:
        raise GuestBuildError(f"dpkg-deb --fsys-tarfile {deb.name} exited {proc.returncode}: "
                              f"{err.decode(errors='replace').strip()}")
    return found


_VMLINUZ = re.compile(r"^\./boot/vmlinuz-(.+)$")
_BUILTIN = re.compile(r"^\./(?:usr/)?lib/modules/[^/]+/modules\.builtin$")
_MODULE = re.compile(r"^\./(?:usr/)?lib/modules/[^/]+/kernel/.*/([^/]+)\.ko(\.xz|\.zst|\.gz)?$")


def _module_name(path: str) -> str | None:
    match = _MODULE.match(path)
    name = match.group(1).replace("-", "_") if match else None
    return name if name in MODULES else None


def _take_kernel(deb: Path) -> tuple[bytes, str, dict[str, bytes]]:
    """The kernel image, its release and the wanted modules (decompressed) from a linux-image .deb."""
    files = _extract(deb, lambda n: bool(_VMLINUZ.match(n) or _BUILTIN.match(n) or _module_name(n)))
    kernel, release, builtin = b"", "", set()
    modules: dict[str, bytes] = {}
    for path, data in files.items():
        if match := _VMLINUZ.match(path):
            kernel, release = data, match.group(1)
        elif _BUILTIN.match(path):
            builtin = {Path(line).name.split(".ko")[0].replace("-", "_") for line in data.decode().split()}
        elif name := _module_name(path):
            modules[name] = _decompress(data, Path(path).suffix, path)
    if not kernel:
        raise GuestBuildError(f"{deb.name} holds no /boot/vmlinuz-*")
    missing = [m for m in MODULES if m not in modules and m not in builtin]
    if missing:
        raise GuestBuildError(f"{deb.name} has no module {', '.join(missing)} and does not build them in")
    return kernel, release, modules


def _decompress(data: bytes, suffix: str, name: str) -> bytes:
    try:
        if suffix == ".xz":
            return lzma.decompress(data)
        if suffix == ".gz":
            return gzip.decompress(data)
        if suffix == ".zst":
            import zstandard  # a dependency of Hozon itself

            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except Exception as exc:
        raise GuestBuildError(f"cannot decompress {name}: {exc}") from exc
    return data


def _take_busybox(deb: Path) -> bytes:
    files = _extract(deb, lambda n: n in ("./bin/busybox", "./usr/bin/busybox"))
    if not files:
        raise GuestBuildError(f"{deb.name} holds no bin/busybox")
    return next(iter(files.values()))


# -- cpio (newc) -----------------------------------------------------------------------------------


def newc_archive(entries: Iterable[tuple[str, int, bytes]], first_inode: int = 1) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks as an initramfs.

    Each entry is (absolute path, st_mode, content); a symlink's content is its target, a device
    node's is 4 bytes: major << 8 | minor, big-endian.
    """
    out = bytearray()
    for ino, (path, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=first_inode):
        name = path.lstrip("/") if path != "TRAILER!!!" else path
        rdev_major = rdev_minor = 0
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            number = int.from_bytes(data, "big")
            rdev_major, rdev_minor, data = number >> 8, number & 0xFF, b""
        if path == "TRAILER!!!":
            ino = 0
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev_major, rdev_minor, len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields)
        out += name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _parents(path: str, entries: list[tuple[str, int, bytes]]) -> None:
    parts = Path(path).parent.parts[1:]
    for i in range(len(parts)):
        entries.append(("/" + "/".join(parts[: i + 1]), stat.S_IFDIR | 0o755, b""))


def _write_atomically(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
