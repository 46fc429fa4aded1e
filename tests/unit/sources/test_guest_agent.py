"""The guest agent client against a scripted fake agent, and the freeze bracket around the instant.

A fake agent's script runs in a thread on the server side of a real unix socket and drives a
:class:`Peer`, which sees the raw lines the client sends (the 0xFF before a delimited sync
included) and writes whatever bytes the test wants: stale output, late replies, garbage.
:class:`GuestQuiesce` is tested with a :class:`FakeFreezer`, and once through a fake agent.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from hozon.errors import GuestAgentCommandError, GuestAgentError, HozonError, QmpError
from hozon.sources.qemu import Disk, PointInTime
from hozon.sources.qemu import fleece as fleece_module
from hozon.sources.qemu.guest_agent import GuestAgent, GuestQuiesce

pytestmark = pytest.mark.timeout(30)


class Peer:
    """The agent's end of the connection, as a script sees it."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.buffer = b""
        self.raw: list[bytes] = []  # every line received, as sent

    def send(self, data: bytes | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        """The client's next command (a leading 0xFF is kept in ``raw`` and left out here)."""
        while b"\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.raw.append(line)
        message: dict[str, Any] = json.loads(line.lstrip(b"\xff"))
        return message

    def sync(self, stale: bytes = b"") -> dict[str, Any]:
        """Answer the client's delimited sync, after ``stale`` output."""
        command = self.recv()
        assert command["execute"] == "guest-sync-delimited", command
        self.send(stale + b"\xff" + json.dumps({"return": command["arguments"]["id"]}).encode() + b"\n")
        return command

    def answer(self, command: str, value: Any) -> None:
        message = self.recv()
        assert message == {"execute": command}, message
        self.send({"return": value})

    def stall(self) -> None:
        self.stop.wait(20)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


Script = Callable[[Peer], None]


class FakeAgent:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []


@pytest.fixture
def fake_agent() -> Iterator[Callable[[Script], FakeAgent]]:
    """``fake_agent(script)`` listens on a unix socket; the first client to connect is handed to ``script``."""
    tmp = Path(tempfile.mkdtemp(prefix="hozon-qga-"))
    stop = threading.Event()
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []
    agents: list[FakeAgent] = []

    def start(script: Script) -> FakeAgent:
        agent = FakeAgent(tmp / f"qga{len(agents)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(agent.path))
        listener.listen(4)
        listeners.append(listener)
        agents.append(agent)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            peer = Peer(conn, stop)
            agent.peers.append(peer)
            try:
                script(peer)
            except EOFError:
                pass
            except BaseException as exc:
                agent.errors.append(exc)
            finally:
                if not stop.is_set():
                    stop.wait(0.05)  # let the client read what was sent before the close
                peer.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return agent

    yield start
    stop.set()
    for listener in listeners:
        listener.close()
    for agent in agents:
        for peer in agent.peers:
            peer.close()
    for thread in threads:
        thread.join(5)
    shutil.rmtree(tmp, ignore_errors=True)
    for agent in agents:
        if agent.errors:
            raise agent.errors[0]


# -- synchronising ---------------------------------------------------------------------------------


def test_connecting_skips_stale_output_up_to_the_delimited_reply_with_our_id(
        fake_agent: Callable[[Script], FakeAgent]) -> None:
    def script(peer: Peer) -> None:
        peer.sync(stale=b'{"return": {"half of an old rep'  # a reply an earlier client left half read
                        b'\n{"return": 17}\n'  # a whole stale reply
                        b'\xff{"return": 4}\n'  # the late delimited reply to an earlier client's sync
                        b"\x00garbage")
        peer.answer("guest-ping", {})
        peer.answer("guest-fsfreeze-status", "thawed")

    agent = fake_agent(script)
    with GuestAgent.connect(agent.path, timeout=5) as client:
        client.ping()
        assert client.status() == "thawed"
    assert client.closed
    first = agent.peers[0].raw[0]
    assert first.startswith(b"\xff{")  # flushes the agent's parser before the sync
    sync = json.loads(first[1:])
    assert sync["execute"] == "guest-sync-delimited" and isinstance(sync["arguments"]["id"], int)
    assert agent.peers[0].raw[1:] == [b'{"execute":"guest-ping"}', b'{"execute":"guest-fsfreeze-status"}']


def test_an_agent_without_the_delimited_sync_is_synchronised_with_guest_sync(
        fake_agent: Callable[[Script], FakeAgent]) -> None:
    def script(peer: Peer) -> None:
        assert peer.recv()["execute"] == "guest-sync-delimited"
        peer.send({"error": {"class": "CommandNotFound",
                             "desc": "The command guest-sync-delimited has not been found"}})
        command = peer.recv()
        assert command["execute"] == "guest-sync" and peer.raw[-1][:1] == b"{"
        peer.send(b'{"return": 1}\n{"return": %d}\n' % command["arguments"]["id"])
        peer.answer("guest-fsfreeze-freeze", 2)

    agent = fake_agent(script)
    with GuestAgent.connect(agent.path, timeout=5) as client:
        assert client.freeze(timeout=5) == 2


def test_a_silent_agent_is_a_clear_error_within_the_timeout(fake_agent: Callable[[Script], FakeAgent]) -> None:
    agent = fake_agent(Peer.stall)  # QEMU with the port, a guest without qemu-ga: nothing answers
    started = time.monotonic()
    with pytest.raises(GuestAgentError) as caught:
        GuestAgent.connect(agent.path, timeout=0.5)
    assert 0.4 < time.monotonic() - started < 2
    assert str(caught.value) == (f"the guest agent at {agent.path} did not send the reply to guest-sync-delimited "
                                 "within 0.5 s")
    assert caught.value.hint == "is qemu-ga running in the guest?"
    assert isinstance(caught.value, HozonError) and caught.value.exit_code == 1


def test_no_socket_is_a_clear_error_with_the_qemu_options_as_hint(tmp_path: Path) -> None:
    with pytest.raises(GuestAgentError, match=f"^there is no guest agent socket at {tmp_path}/qga.sock$") as caught:
        GuestAgent.connect(tmp_path / "qga.sock")
    hint = caught.value.hint or ""
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in hint


def test_a_socket_nobody_listens_on_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "qga.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: what a QEMU that quit leaves behind
    with pytest.raises(GuestAgentError, match="refused the connection; is QEMU still running"):
        GuestAgent.connect(path)


# -- commands ------------------------------------------------------------------------------------


def test_freeze_thaw_and_status(fake_agent: Callable[[Script], FakeAgent]) -> None:
    def script(peer: Peer) -> None:
        peer.sync()
        peer.answer("guest-fsfreeze-freeze", 3)
        peer.answer("guest-fsfreeze-status", "frozen")
        peer.answer("guest-fsfreeze-thaw", 3)
        peer.answer("guest-fsfreeze-status", "thawed")

    agent = fake_agent(script)
    with GuestAgent.connect(agent.path) as client:
        assert client.freeze() == 3
        assert client.status() == "frozen"
        assert client.thaw() == 3
        assert client.status() == "thawed"
    assert len(agent.peers[0].raw) == 5  # one sync, when connecting


def test_an_error_reply_keeps_the_agents_words_and_the_connection(fake_agent: Callable[[Script], FakeAgent]) -> None:
    def script(peer: Peer) -> None:
        peer.sync()
        assert peer.recv() == {"execute": "guest-fsfreeze-freeze"}
        peer.send({"error": {"class": "GenericError", "desc": "failed to freeze /: Device or resource busy."}})
        peer.answer("guest-fsfreeze-thaw", 0)

    agent = fake_agent(script)
    with GuestAgent.connect(agent.path) as client:
        with pytest.raises(GuestAgentCommandError) as caught:
            client.freeze()
        assert caught.value.error_class == "GenericError"
        assert caught.value.desc == "failed to freeze /: Device or resource busy"
        assert str(caught.value) == ("guest agent command guest-fsfreeze-freeze failed with GenericError: "
                                     "failed to freeze /: Device or resource busy")
        assert client.thaw() == 0  # no resync needed: the error was the reply


def test_after_a_timeout_the_late_reply_is_dropped_by_a_resync(fake_agent: Callable[[Script], FakeAgent]) -> None:
    def script(peer: Peer) -> None:
        peer.sync()
        assert peer.recv() == {"execute": "guest-fsfreeze-freeze"}
        command = peer.recv()  # the client gave up and resynchronises; only now does the freeze answer
        assert command["execute"] == "guest-sync-delimited" and peer.raw[-1].startswith(b"\xff")
        peer.send(b'{"return": 5}\n\xff' + json.dumps({"return": command["arguments"]["id"]}).encode() + b"\n")
        peer.answer("guest-fsfreeze-thaw", 4)

    agent = fake_agent(script)
    with GuestAgent.connect(agent.path, timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(GuestAgentError, match=r"did not send the reply to guest-fsfreeze-freeze within 0\.3 s$"):
            client.freeze(timeout=0.3)
        assert time.monotonic() - started < 1.5
        assert client.thaw() == 4  # not the freeze's late 5


def test_a_malformed_reply_is_an_error_and_the_next_command_resyncs(fake_agent: Callable[[Script], FakeAgent]) -> None:
    def script(peer: Peer) -> None:
        peer.sync()
        assert peer.recv() == {"execute": "guest-ping"}
        peer.send(b"<html>\n")
        peer.sync(stale=b"more garbage\n")
        peer.answer("guest-fsfreeze-freeze", "three")
        peer.answer("guest-ping", {})

    agent = fake_agent(script)
    with GuestAgent.connect(agent.path) as client:
        with pytest.raises(GuestAgentError, match="answered guest-ping with something that is not JSON: '<html>'"):
            client.ping()
        with pytest.raises(GuestAgentError, match="answered guest-fsfreeze-freeze with '\"three\"', not a number"):
            client.freeze()
        client.ping()


def test_an_agent_that_goes_away_is_reported_and_the_connection_is_closed(
        fake_agent: Callable[[Script], FakeAgent]) -> None:
    def script(peer: Peer) -> None:
        peer.sync()
        peer.recv()
        peer.close()

    agent = fake_agent(script)
    client = GuestAgent.connect(agent.path)
    with pytest.raises(GuestAgentError, match="closed the connection while Hozon waited for the reply to "
                                              "guest-fsfreeze-thaw; did QEMU quit"):
        client.thaw()
    assert client.closed
    with pytest.raises(GuestAgentError, match=r"is gone: .* closed the connection"):
        client.ping()


# -- the freeze around the instant ---------------------------------------------------------------


class FakeFreezer:
    """Freezes and thaws by the book, or raises what ``freeze_error`` / ``thaw_errors`` say."""

    def __init__(self, log: list[str], count: int = 2, freeze_error: BaseException | None = None,
                 thaw_errors: list[HozonError] | None = None) -> None:
        self.log = log
        self.count = count
        self.freeze_error = freeze_error
        self.thaw_errors = thaw_errors if thaw_errors is not None else []

    def freeze(self, timeout: float) -> int:
        self.log.append(f"freeze {timeout:g}")
        if self.freeze_error is not None:
            raise self.freeze_error
        return self.count

    def thaw(self, timeout: float) -> int:
        self.log.append(f"thaw {timeout:g}")
        if self.thaw_errors:
            raise self.thaw_errors.pop(0)
        return self.count

    def close(self) -> None:
        self.log.append("close")


def quiesce_with(freezer: FakeFreezer | HozonError, log: list[str]) -> GuestQuiesce:
    def open_freezer() -> FakeFreezer:
        log.append("open")
        if isinstance(freezer, HozonError):
            raise freezer
        return freezer

    return GuestQuiesce(open_freezer, "the fake agent", freeze_timeout=7, thaw_timeout=3)


def test_a_frozen_instant_is_application_consistent_and_timed() -> None:
    log: list[str] = []
    quiesce = quiesce_with(FakeFreezer(log, count=2), log)
    with quiesce:
        log.append("instant")
        time.sleep(0.05)
    assert log == ["open", "freeze 7", "instant", "thaw 3", "close"]
    assert quiesce.consistency == "application" and quiesce.frozen_filesystems == 2
    assert 0.05 <= quiesce.frozen_seconds < 1
    assert quiesce.notes == [] and quiesce.warnings == []


def test_no_file_system_frozen_is_said() -> None:
    log: list[str] = []
    quiesce = quiesce_with(FakeFreezer(log, count=0), log)
    with quiesce:
        pass
    assert quiesce.consistency == "application" and quiesce.frozen_filesystems == 0
    assert quiesce.notes == ["the fake agent answered the freeze but froze no file system (the guest may have none "
                             "that can be frozen)"]


def test_an_unreachable_agent_gives_a_crash_consistent_instant_and_a_note() -> None:
    log: list[str] = []
    quiesce = quiesce_with(GuestAgentError("there is no guest agent socket at /x"), log)
    with quiesce:
        log.append("instant")
    assert log == ["open", "instant"]
    assert quiesce.consistency == "crash" and quiesce.frozen_filesystems == 0 and quiesce.frozen_seconds == 0
    assert quiesce.notes == ["the guest's file systems were not frozen: there is no guest agent socket at /x; "
                             "the backup is crash-consistent"]


def test_a_freeze_that_fails_or_times_out_is_followed_by_a_thaw() -> None:
    log: list[str] = []
    timeout = GuestAgentError("the guest agent at /x did not send the reply to guest-fsfreeze-freeze within 7 s")
    quiesce = quiesce_with(FakeFreezer(log, freeze_error=timeout), log)
    with quiesce:
        log.append("instant")
    assert log == ["open", "freeze 7", "instant", "thaw 3", "close"]
    assert quiesce.consistency == "crash" and quiesce.frozen_seconds == 0
    assert quiesce.notes == [f"the guest's file systems were not frozen: {timeout.message}; the backup is "
                             "crash-consistent"]
    assert quiesce.warnings == []


def test_a_failed_thaw_is_retried_once_on_a_new_connection() -> None:
    log: list[str] = []
    quiesce = quiesce_with(FakeFreezer(log, thaw_errors=[GuestAgentError("silent")]), log)
    with quiesce:
        pass
    assert log == ["open", "freeze 7", "thaw 3", "close", "open", "thaw 3", "close"]
    assert quiesce.consistency == "application" and quiesce.notes == [] and quiesce.warnings == []


def test_a_thaw_that_fails_twice_is_a_loud_warning_also_on_the_error_in_flight() -> None:
    log: list[str] = []
    quiesce = quiesce_with(FakeFreezer(log, thaw_errors=[GuestAgentError("silent"), GuestAgentError("still")]), log)
    with pytest.raises(QmpError) as caught, quiesce:
        raise QmpError("QEMU's monitor did not send the reply to transaction within 60 s")
    assert log == ["open", "freeze 7", "thaw 3", "close", "open", "thaw 3", "close"]
    warning = ("WARNING: the fake agent did not confirm the thaw (silent; then: still): file systems in the guest "
               "may still be frozen: run guest-fsfreeze-thaw")
    assert quiesce.warnings == [warning] and quiesce.notes == [warning]
    assert caught.value.__notes__ == [warning]
    assert quiesce.consistency == "application"  # the instant itself was frozen


def test_an_interrupt_while_freezing_still_thaws() -> None:
    log: list[str] = []
    quiesce = quiesce_with(FakeFreezer(log, freeze_error=KeyboardInterrupt()), log)
    with pytest.raises(KeyboardInterrupt), quiesce:
        log.append("instant")
    assert log == ["open", "freeze 7", "thaw 3", "close"]


def test_through_an_agent_that_never_answers_the_freeze(fake_agent: Callable[[Script], FakeAgent]) -> None:
    def script(peer: Peer) -> None:
        peer.sync()
        assert peer.recv() == {"execute": "guest-fsfreeze-freeze"}  # ignored
        peer.sync()
        peer.answer("guest-fsfreeze-thaw", 0)

    agent = fake_agent(script)
    quiesce = GuestQuiesce.through_agent(str(agent.path), freeze_timeout=0.5, thaw_timeout=2)
    started = time.monotonic()
    with quiesce:
        pass
    assert time.monotonic() - started < 2
    assert quiesce.consistency == "crash" and quiesce.warnings == []
    assert quiesce.notes == [f"the guest's file systems were not frozen: the guest agent at {agent.path} did not "
                             "send the reply to guest-fsfreeze-freeze within 0.5 s; the backup is crash-consistent"]
    assert [json.loads(line.lstrip(b"\xff"))["execute"] for line in agent.peers[0].raw] == [
        "guest-sync-delimited", "guest-fsfreeze-freeze", "guest-sync-delimited", "guest-fsfreeze-thaw"]


# -- the hook in PointInTime -----------------------------------------------------------------------


class Recorder:
    """A quiesce context manager that logs when it is entered and left."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __enter__(self) -> Recorder:
        self.log.append("freeze")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.log.append(f"thaw ({type(exc).__name__ if exc else 'ok'})")


class LoggingQmp:
    """Answers every command with {} (block nodes with ``nodes``), logging each; ``fail`` raises on it."""

    def __init__(self, log: list[str], nodes: list[dict[str, Any]], fail: str = "") -> None:
        self.log = log
        self.nodes = nodes
        self.fail = fail
        self.closed = False

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        self.log.append(command)
        if command == self.fail:
            raise QmpError(f"QEMU's monitor did not send the reply to {command} within 60 s")
        return self.nodes if command == "query-named-block-nodes" else {}

    def transaction(self, actions: Any, properties: Any = None, timeout: float | None = None) -> None:
        self.execute("transaction")

    def wait_event(self, name: str, timeout: float | None = None, match: Any = None) -> Any:
        raise QmpError("no events here")


@pytest.mark.parametrize("fail", ["", "transaction"])
def test_point_in_time_quiesces_exactly_around_its_transaction(fail: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleece_module, "CLEANUP_WAIT", 0.0)
    monkeypatch.setattr(fleece_module.PointInTime, "_create_scratch",
                        lambda self, path, size: (self._scratch.append(path), path.write_bytes(b"x")))
    log: list[str] = []
    nodes = [{"node-name": "vda-format", "drv": "qcow2", "image": {"virtual-size": 1 << 20}}]
    qmp = LoggingQmp(log, nodes, fail)
    disks = [Disk("vda", "vda-format", "/img/vda", "qcow2", 1 << 20)]
    point = PointInTime(qmp, disks, tmp_path, "hozon-2", quiesce=Recorder(log))  # type: ignore[arg-type]
    if fail:
        with pytest.raises(QmpError), point:
            pass
        assert log[log.index("blockdev-add"):][:4] == ["blockdev-add", "freeze", "transaction", "thaw (QmpError)"]
        assert "block-job-cancel" in log and "block-dirty-bitmap-remove" in log  # the instant may have happened
    else:
        with point:
            pass
        assert log[log.index("blockdev-add"):][:5] == ["blockdev-add", "freeze", "transaction", "thaw (ok)",
                                                       "nbd-server-start"]
