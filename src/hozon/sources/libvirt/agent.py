"""The guest agent of a libvirt domain, reached through libvirt's own channel to it.

libvirt connects to the host side of a domain's agent channel itself (``<channel type='unix'>
<target type='virtio' name='org.qemu.guest_agent.0'/></channel>``) and keeps it, so Hozon cannot
open that socket; it passes each command through libvirt instead, like the monitor
(``virsh qemu-agent-command DOMAIN '{"execute": …}' --timeout N``, the API
``virDomainQemuAgentCommand``). libvirt synchronises the stream first (``guest-sync``, within
5 s) and then waits up to N seconds for the reply; on a timeout it gives the agent up for that
command, drops the late reply when it comes, and frees the domain for the next command.

Why not ``virsh domfsfreeze``/``domfsthaw`` (``virDomainFSFreeze``)? They wait for the agent as
long as the domain's agent timeout says, and that is "forever" unless someone set one with
``virsh guest-agent-timeout``: a freeze the agent never answers would hold libvirt's agent job,
and the thaw Hozon sends next would wait behind it. ``qemu-agent-command --timeout`` bounds both,
so a freeze is always followed by a thaw that reaches the agent. The price: libvirt marks the
domain *tainted* ("custom-ga-command", in its log), as passing QMP through already does
(see ``monitor.py``); it runs on unchanged.

:class:`LibvirtGuestAgent` implements :class:`~hozon.sources.qemu.guest_agent.GuestFreezer`, so
:class:`~hozon.sources.qemu.guest_agent.GuestQuiesce` freezes a libvirt domain exactly as it
freezes a guest behind an agent socket: :func:`guest_quiesce`.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

from hozon.errors import GuestAgentError
from hozon.sources.libvirt.virsh import Virsh, VirshFailed
from hozon.sources.qemu.guest_agent import DEFAULT_TIMEOUT, FREEZE_TIMEOUT, THAW_TIMEOUT, GuestQuiesce

AGENT_CHANNEL: Final = "org.qemu.guest_agent.0"
LIBVIRT_SYNC_TIME: Final = 5  # libvirt's guest-sync before each command (QEMU_AGENT_WAIT_TIME)
_VIRSH_MARGIN: Final = 15.0  # virsh itself, and libvirt waiting for the domain's agent job
_CHANNEL_HINT: Final = (f"add <channel type='unix'><target type='virtio' name='{AGENT_CHANNEL}'/></channel> to the "
                        "domain's devices (virsh edit; it takes effect at the next start) and run qemu-ga in the guest")


class LibvirtGuestAgent:
    """The guest agent of the running libvirt domain ``domain``, through libvirt. Open it with :meth:`connect`.

    ``name`` is how messages call the domain. Implements :class:`GuestFreezer`; a context manager.
    """

    def __init__(self, virsh: Virsh, domain: str, name: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("guest agent timeouts must be positive")
        self.virsh = virsh
        self.domain = domain
        self.timeout = timeout
        self.name = name or domain
        self._where = f"the guest agent of libvirt domain {self.name}"
        self._closed = False

    @classmethod
    def connect(cls, domain: str, uri: str | None = None, name: str | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> LibvirtGuestAgent:
        """The agent of ``domain`` (name, id or UUID) on libvirt ``uri``, once it answered ``guest-ping``."""
        agent = cls(Virsh(uri), domain, name, timeout)
        agent.ping()
        return agent

    def close(self) -> None:
        """Nothing to release (libvirt keeps its channel); later calls fail. Safe to repeat."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> LibvirtGuestAgent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------------

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run ``command``; the agent's ``return`` value. libvirt waits ``timeout`` seconds (whole, at least 1)
        for the reply, after up to :data:`LIBVIRT_SYNC_TIME` for its own ``guest-sync``."""
        if self._closed:
            raise GuestAgentError(f"the connection to {self._where} is closed")
        seconds = max(1, math.ceil(self.timeout if timeout is None else timeout))
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        try:
            text = json.dumps(message, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise GuestAgentError(f"the arguments of guest agent command {command} cannot be sent as JSON: "
                                  f"{exc}") from None
        try:
            output = self.virsh.run(["qemu-agent-command", "--timeout", str(seconds), "--", self.domain, text],
                                    f"pass {command} to the guest agent of domain {self.name}",
                                    timeout=seconds + LIBVIRT_SYNC_TIME + _VIRSH_MARGIN)
        except subprocess.TimeoutExpired:
            raise GuestAgentError(f"libvirt did not answer within {seconds + LIBVIRT_SYNC_TIME + _VIRSH_MARGIN:g} s "
                                  f"when asked to pass {command} to {self._where}") from None
        except VirshFailed as exc:
            raise self._translate(exc, command, seconds) from None
        try:
            reply = json.loads(output)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or "return" not in reply:
            raise GuestAgentError(f"{self._where} answered {command} with something that is not a return value: "
                                  f"{output.strip()[:120]!r}")
        return reply["return"]

    def ping(self, timeout: float | None = None) -> None:
        self.execute("guest-ping", timeout=timeout)

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> int:
        """``guest-fsfreeze-freeze``: how many file systems the agent froze.

        After a timeout the agent may still be freezing: call :meth:`thaw`.
        """
        return self._count("guest-fsfreeze-freeze", timeout)

    def thaw(self, timeout: float | None = THAW_TIMEOUT) -> int:
        """``guest-fsfreeze-thaw``: how many file systems the agent thawed."""
        return self._count("guest-fsfreeze-thaw", timeout)

    def status(self, timeout: float | None = None) -> str:
        """``guest-fsfreeze-status``: "thawed" or "frozen"."""
        answer = self.execute("guest-fsfreeze-status", timeout=timeout)
        if not isinstance(answer, str):
            raise GuestAgentError(f"{self._where} answered guest-fsfreeze-status with {answer!r}, not a word")
        return answer

    def _count(self, command: str, timeout: float | None) -> int:
        answer = self.execute(command, timeout=timeout)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise GuestAgentError(f"{self._where} answered {command} with {answer!r}, not a number")
        return answer

    def _translate(self, exc: VirshFailed, command: str, seconds: int) -> GuestAgentError:
        """libvirt's refusal as what it means for the agent."""
        detail = exc.detail
        if "is not configured" in detail:
            return GuestAgentError(f"libvirt domain {self.name} has no guest agent channel", hint=_CHANNEL_HINT)
        if "is not connected" in detail:
            return GuestAgentError(f"{self._where} is not connected: nothing in the guest opened its port",
                                   hint="is qemu-ga running in the guest?")
        if "not available for now" in detail:  # libvirt's timeout, of its guest-sync or of the command
            return GuestAgentError(f"{self._where} did not answer {command} within {seconds} s",
                                   hint="is qemu-ga running in the guest?")
        if "unable to execute QEMU agent command" in detail:  # the agent's own error
            desc = detail.partition(f"'{command}': ")[2] or detail
            return GuestAgentError(f"{self._where} failed {command}: {desc.rstrip('.')}")
        if exc.not_running:
            return GuestAgentError(f"libvirt domain {self.name} is not running (paused?), so its guest agent "
                                   "cannot answer")
        return GuestAgentError(f"libvirt could not pass {command} to {self._where}: {detail}", hint=exc.hint)


def guest_quiesce(domain: str, uri: str | None = None, name: str | None = None,
                  freeze_timeout: float = FREEZE_TIMEOUT, thaw_timeout: float = THAW_TIMEOUT) -> GuestQuiesce:
    """The freeze around an image backup's instant, through libvirt's channel to the agent of ``domain``."""
    label = name or domain
    opened = False

    def open_agent() -> LibvirtGuestAgent:
        # The first opening checks that the agent answers; the second is for the thaw's retry, which
        # goes straight to libvirt (it synchronises with the agent itself before every command).
        nonlocal opened
        if opened:
            return LibvirtGuestAgent(Virsh(uri), domain, label)
        opened = True
        return LibvirtGuestAgent.connect(domain, uri, label)

    thaw_by_hand = f"virsh{f' --connect {uri}' if uri else ''} domfsthaw {label}"
    return GuestQuiesce(open_agent, f"the guest agent of libvirt domain {label}", freeze_timeout, thaw_timeout,
                        thaw_hint=thaw_by_hand)
