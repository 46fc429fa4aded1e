"""A local disk image served by a private ``qemu-nbd``, with an :class:`NbdClient` connected to it.

This is how Hozon reads or writes image formats it does not parse itself (qcow2 and whatever
else QEMU opens): ``qemu-nbd`` (Debian package qemu-utils) serves the one image on a unix socket
in a fresh temporary directory, to one client, and exits when that client disconnects.

    with QemuNbd("/var/lib/images/vda.qcow2") as client:     # writable unless read_only=True
        client.write_many(chunks)
        client.flush()

Leaving the block closes the connection and waits for qemu-nbd to exit (it closes the image
cleanly); one that does not go is terminated, then killed. A qemu-nbd that fails is reported
with the last line it printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Final

from hozon.errors import HozonError, NbdError
from hozon.nbd.client import NbdClient, NbdRequestError

QEMU_UTILS_HINT: Final = "install the Debian package qemu-utils"
START_TIMEOUT: Final = 30.0
EXIT_TIMEOUT: Final = 30.0  # closing a large qcow2 writes its metadata out


class QemuNbd:
    """``qemu-nbd`` serving ``image`` (format ``fmt``) for the duration of a ``with`` block."""

    def __init__(self, image: str, fmt: str = "qcow2", read_only: bool = False, cache: str = "writeback",
                 meta_contexts: tuple[str, ...] = ()) -> None:
        self.image = os.path.abspath(image)  # absolute: QEMU never reads it as an option or a protocol
        self.fmt = fmt
        self.read_only = read_only
        self.cache = cache
        self.meta_contexts = meta_contexts  # e.g. ("base:allocation",) to read the image's zero map
        self.sockdir = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: NbdClient | None = None
        self._last_words = ""  # what qemu-nbd printed last, kept once its directory is gone

    def __enter__(self) -> NbdClient:
        self.sockdir = tempfile.mkdtemp(prefix="hozon-nbd-")  # short: socket paths are limited to 107 bytes
        args = ["qemu-nbd", f"--socket={self._sock}", f"--format={self.fmt}", "--shared=1", f"--cache={self.cache}",
                "--aio=threads", *(["--read-only"] if self.read_only else []), self.image]
        try:
            with open(self._log, "wb") as log:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self.client = self._connect()
            return self.client
        except FileNotFoundError as exc:
            self._stop(clean=False)
            raise HozonError("qemu-nbd is not installed", hint=QEMU_UTILS_HINT) from exc
        except BaseException:
            self._stop(clean=False)
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop(clean=exc_type is None)
        if isinstance(exc, NbdError) and not isinstance(exc, NbdRequestError) and self._failed():
            # The connection broke because qemu-nbd died: what it said is the useful part.
            raise HozonError(f"qemu-nbd failed serving {self.image}: {self._said()}") from exc

    @property
    def _sock(self) -> str:
        return os.path.join(self.sockdir, "nbd.sock")

    @property
    def _log(self) -> str:
        return os.path.join(self.sockdir, "qemu-nbd.log")

    def _connect(self) -> NbdClient:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise HozonError(f"qemu-nbd could not serve {self.image}: {self._said()}")
            if os.path.exists(self._sock):
                try:
                    return NbdClient.connect_unix(self._sock, meta_contexts=self.meta_contexts)
                except NbdError:  # the socket exists a moment before qemu-nbd listens on it
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                raise HozonError(f"qemu-nbd did not start serving {self.image} within {START_TIMEOUT:g} s")
            time.sleep(0.02)

    def _stop(self, clean: bool) -> None:
        """Disconnect, wait for qemu-nbd to exit (or end it); on a clean exit, its failure raises."""
        try:
            if self.client is not None:
                self.client.close()
            if self.proc is None:
                return
            try:
                code = self.proc.wait(EXIT_TIMEOUT if clean else 5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                if clean:
                    raise HozonError(f"qemu-nbd did not finish with {self.image} within {EXIT_TIMEOUT:g} s") \
                        from None
                return
            if clean and code != 0:
                raise HozonError(f"qemu-nbd failed serving {self.image}: {self._said()}")
        finally:
            if self.sockdir:
                self._last_words = self._said()
                shutil.rmtree(self.sockdir, ignore_errors=True)
                self.sockdir = ""

    def _failed(self) -> bool:
        return self.proc is not None and self.proc.returncode not in (0, None)

    def _said(self) -> str:
        """The last line qemu-nbd printed (or its exit status)."""
        if not self.sockdir:
            return self._last_words
        try:
            with open(self._log, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        if lines:
            return lines[-1]
        return f"exit status {self.proc.returncode}" if self.proc is not None else "it did not start"
