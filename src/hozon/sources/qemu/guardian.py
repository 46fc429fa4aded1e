"""Leaves QEMU clean when the Hozon that was backing it up dies mid-way (kill -9, OOM, power of the client).

A killed Hozon cannot clean up after itself, yet it may have left the guest paused (a checkpoint
stops it for its instant), a state migration running and the fleecing jobs, nodes and exports
of a point in time in place — copy-before-write filling a scratch image for as long as they
stay. So every image backup and checkpoint first starts a guardian: a small process of its own
(its own session, so a signal to Hozon's process group spares it) that holds the read end of a
pipe from Hozon. Hozon tells it ``paused``/``resumed`` around the instant and ``done`` at the end.
When the pipe closes without ``done``, Hozon is gone; the guardian then connects to the monitor
(a QMP socket serves one client, and Hozon's connection closed with it) and undoes what Hozon
left: ``cont`` if Hozon had paused the guest; a checkpoint's state stream read to its end and
dropped (the guardian holds the pipe's read end from the start: QEMU must neither wait on a pipe
nobody reads nor see it break mid-way, see :func:`_undo`); the background-snapshot capability off;
and :func:`~hozon.sources.qemu.fleece.cleanup_leftovers` with the bitmaps the
repository's last snapshot relies on kept.

    with Guardian(["--qmp", path], prefix, keep) as guardian:   # hozon.backup.image
        guardian.say("paused") …
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Final

from hozon.errors import HozonError
from hozon.sources.qemu.fleece import cleanup_leftovers
from hozon.sources.qemu.qmp import QmpClient
from hozon.sources.qemu.vmstate import MIGRATION_TIMEOUT, STATE_FD_NAME, drain, wait_migration_over

CONNECT_TIMEOUT: Final = 15.0  # for Hozon's own connection to go away


class Guardian:
    """The guardian process of one backup; ``monitor`` is how it reaches QEMU (``--qmp PATH`` or
    ``--libvirt DOMAIN [--connect URI]``)."""

    def __init__(self, monitor: Sequence[str], prefix: str, keep: Sequence[str], drain: int | None = None) -> None:
        self.argv = [sys.executable, "-m", "hozon.sources.qemu.guardian", *monitor, "--prefix", prefix,
                     *[arg for bitmap in keep for arg in ("--keep", bitmap)],
                     *(["--drain", str(drain)] if drain is not None else [])]
        self.drain = drain
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Guardian:
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                                      pass_fds=() if self.drain is None else (self.drain,))
        return self

    def say(self, word: str) -> None:
        """Tell the guardian ``paused`` or ``resumed``."""
        stdin = self._stdin()
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.write(word + "\n")
                stdin.flush()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Hozon cleaned up itself (or tried): the guardian has nothing to do."""
        self.say("done")
        if self._proc is not None:
            with contextlib.suppress(OSError):
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _stdin(self) -> IO[str] | None:
        return self._proc.stdin if self._proc is not None else None


def _connect(args: argparse.Namespace) -> QmpClient:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            if args.libvirt:
                # hozon.sources.libvirt builds on this package: imported here, not at the top, to stay acyclic
                from hozon.sources.libvirt.monitor import LibvirtMonitor

                return LibvirtMonitor.connect(args.libvirt, uri=args.connect)
            return QmpClient.connect(args.qmp, timeout=2.0)
        except HozonError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _undo(qmp: QmpClient, paused: bool, prefix: str, keep: Sequence[str], draining: bool) -> None:
    """What a dead Hozon left: each step is tried, whatever the others did."""
    with contextlib.suppress(HozonError):
        status = qmp.execute("query-status")
        if paused and isinstance(status, dict) and status.get("status") == "paused":
            qmp.execute("cont")
    with contextlib.suppress(HozonError):  # drained, a background snapshot is let end (StateCapture.close)
        wait_migration_over(qmp, MIGRATION_TIMEOUT if draining else 0)
    with contextlib.suppress(HozonError):
        qmp.execute("closefd", {"fdname": STATE_FD_NAME})  # passed, but the migration never started
    with contextlib.suppress(HozonError):
        qmp.execute("migrate-set-capabilities",
                    {"capabilities": [{"capability": "background-snapshot", "state": False}]})
    with contextlib.suppress(HozonError):
        cleanup_leftovers(qmp, prefix, keep=keep)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hozon-guardian", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--qmp")
    where.add_argument("--libvirt")
    parser.add_argument("--connect")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--keep", action="append", default=[])
    parser.add_argument("--drain", type=int, help="the read end of a checkpoint's state pipe")
    args = parser.parse_args(argv)
    paused = False
    for line in sys.stdin:
        word = line.strip()
        if word == "done":
            return 0
        paused = {"paused": True, "resumed": False}.get(word, paused)
    # The pipe closed without "done": Hozon died.
    if args.drain is not None:
        threading.Thread(target=drain, args=(args.drain,), daemon=True).start()
    try:
        with _connect(args) as qmp:
            _undo(qmp, paused, args.prefix, args.keep, args.drain is not None)
    except HozonError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
