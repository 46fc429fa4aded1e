"""Running ``virsh``, libvirt's command-line client, as a subprocess.

Hozon talks to libvirt through ``virsh`` rather than through libvirt's Python binding: the
binding is a C extension built against the host's libvirt (or Debian's ``python3-libvirt``, which
a virtual environment does not see), while ``virsh`` comes with every libvirt host
(Debian: libvirt-clients) and speaks the same API. One call costs about 20–30 ms.

Every call runs with ``LC_ALL=C.UTF-8``: virsh translates its messages, and Hozon reads some of
them (an event line, "domain is not running").
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Final

from hozon.errors import HozonError

VIRSH: Final = "virsh"
DEFAULT_TIMEOUT: Final = 60.0
LIBVIRT_CLIENTS_HINT: Final = "install libvirt's client tools (Debian: libvirt-clients)"


class VirshFailed(HozonError):
    """virsh ran and said no; ``detail`` is libvirt's message without virsh's "error: " prefixes."""

    def __init__(self, message: str, detail: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.detail = detail

    @property
    def unreachable(self) -> bool:
        """libvirt itself could not be reached (no daemon, wrong URI, no permission)."""
        return "failed to connect to the hypervisor" in self.detail

    @property
    def no_domain(self) -> bool:
        return "failed to get domain" in self.detail or "Domain not found" in self.detail

    @property
    def not_running(self) -> bool:
        return "is not running" in self.detail


class Virsh:
    """virsh against one libvirt connection: ``uri`` (None: virsh's default, LIBVIRT_DEFAULT_URI or
    qemu:///system for root)."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or None
        self.env = {**os.environ, "LC_ALL": "C.UTF-8"}
        self.env.pop("LANGUAGE", None)

    def command(self, *args: str) -> list[str]:
        """The argument vector for ``virsh ARGS…`` on this connection."""
        return [VIRSH, "--quiet", *(["--connect", self.uri] if self.uri else []), *args]

    def run(self, args: Sequence[str], what: str, timeout: float = DEFAULT_TIMEOUT, input: str | None = None,
            pass_fds: Sequence[int] = ()) -> str:
        """Run ``virsh ARGS…`` and return what it printed; ``what`` says what it was for, in errors.

        A virsh that says no raises :class:`VirshFailed`; one that does not finish in ``timeout``
        seconds is killed and raises :class:`subprocess.TimeoutExpired` (the caller knows what an
        unfinished call means for it).
        """
        try:
            done = subprocess.run(self.command(*args), capture_output=True, text=True, env=self.env,
                                  timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                                  pass_fds=tuple(pass_fds), check=False)
        except FileNotFoundError:
            raise HozonError("virsh is not installed; Hozon needs it to work with libvirt",
                             hint=LIBVIRT_CLIENTS_HINT) from None
        if done.returncode != 0:
            detail = _error_text(done.stderr) or f"virsh exited with code {done.returncode}"
            failed = VirshFailed(f"libvirt could not {what}: {detail}", detail)
            if failed.unreachable:
                failed.hint = ("is libvirtd running? Say which libvirt to use with --connect URI "
                               "(e.g. qemu:///system or qemu:///session)")
            raise failed
        return done.stdout

    def where(self) -> str:
        return f"libvirt at {self.uri}" if self.uri else "libvirt"


def _error_text(stderr: str) -> str:
    """libvirt's message from virsh's stderr: its "error: …" lines, joined, less the prefixes."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    return "; ".join(errors or lines)
