"""The QMP client against a scripted fake monitor: odd framing, events between replies, broken peers.

Each test's script runs in a thread on the server side of a real unix socket and drives a
:class:`Peer`, which speaks just enough of QEMU's side of QMP.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hozon.errors import HozonError
from hozon.sources.qemu import QemuVersion, QmpClient, QmpCommandError, QmpError, QmpEvent
from hozon.sources.qemu import qmp as qmp_module

GREETING = {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7 "},
                    "capabilities": ["oob"]}}

pytestmark = pytest.mark.timeout(30)


class Peer:
    """QEMU's end of the connection, as a script sees it."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.buffer = b""
        self.received: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\r\n"
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        """The client's next command."""
        while b"\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        self.received.append(message)
        return message

    def handshake(self) -> None:
        self.send(GREETING)
        command = self.recv()
        assert command["execute"] == "qmp_capabilities"
        self.send({"return": {}, "id": command["id"]})

    def reply(self, command: dict[str, Any], value: Any = None) -> None:
        self.send({"return": {} if value is None else value, "id": command["id"]})

    def event(self, name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {"event": name, "timestamp": {"seconds": 1700000000, "microseconds": 250000}}
        if data is not None:
            event["data"] = data
        return event

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def stall(self) -> None:
        self.stop.wait(20)


Script = Callable[[Peer], None]


class FakeMonitor:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []


@pytest.fixture
def fake_qmp() -> Iterator[Callable[[Script], FakeMonitor]]:
    """``fake_qmp(script)`` listens on a unix socket; the first client to connect is handed to ``script``."""
    tmp = Path(tempfile.mkdtemp(prefix="hozon-qmp-"))
    stop = threading.Event()
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []
    monitors: list[FakeMonitor] = []

    def start(script: Script) -> FakeMonitor:
        monitor = FakeMonitor(tmp / f"qmp{len(monitors)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(monitor.path))
        listener.listen(4)
        listeners.append(listener)
        monitors.append(monitor)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            peer = Peer(conn, stop)
            monitor.peers.append(peer)
            try:
                script(peer)
            except EOFError:
                pass
            except BaseException as exc:
                monitor.errors.append(exc)
            finally:
                if not stop.is_set():
                    stop.wait(0.05)  # let the client read what was sent before the close
                peer.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return monitor

    yield start
    stop.set()
    for listener in listeners:
        listener.close()
    for monitor in monitors:
        for peer in monitor.peers:
            peer.close()  # a script still blocked in recv() ends
    for thread in threads:
        thread.join(5)
    shutil.rmtree(tmp, ignore_errors=True)
    for monitor in monitors:
        if monitor.errors:
            raise monitor.errors[0]


# -- connecting ------------------------------------------------------------------------------------


def test_connect_reads_the_greeting_and_leaves_negotiation_mode(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.reply(peer.recv(), {"status": "running", "running": True})

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client:
        assert client.version == QemuVersion(7, 2, 22) and str(client.version) == "7.2.22"
        assert client.version >= (7, 2) and client.version < (8, 2)
        assert client.package == "Debian 1:7.2+dfsg-7"
        assert client.capabilities == ("oob",)
        assert client.execute("query-status") == {"status": "running", "running": True}
    assert client.closed
    first, second = monitor.peers[0].received
    assert first == {"execute": "qmp_capabilities", "id": first["id"]}  # no arguments, no oob
    assert second == {"execute": "query-status", "id": second["id"]} and second["id"] != first["id"]


def test_a_monitor_that_never_greets_is_reported_as_busy_within_the_timeout(
        fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    monitor = fake_qmp(Peer.stall)
    started = time.monotonic()
    with pytest.raises(QmpError) as caught:
        QmpClient.connect(monitor.path, timeout=0.5)
    assert 0.4 < time.monotonic() - started < 2
    assert str(caught.value) == (f"QEMU's monitor at {monitor.path} did not answer within 0.5 s; "
                                 "is another client connected to it?")
    assert caught.value.hint == "a QMP socket serves one client at a time: give QEMU a second -qmp socket for Hozon"
    assert isinstance(caught.value, HozonError) and caught.value.exit_code == 1


@pytest.mark.parametrize(("greeting", "expected"), [
    (b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ", "did not greet like a QMP monitor"),
    (json.dumps({"return": {}}).encode() + b"\n", "did not greet like a QMP monitor"),
    (json.dumps({"QMP": {"capabilities": []}}).encode() + b"\n", "greeted without a QEMU version"),
    (json.dumps({"QMP": {"version": {"qemu": {"major": "x"}}}}).encode() + b"\n", "greeted without a QEMU version"),
])
def test_a_wrong_greeting_is_refused(fake_qmp: Callable[[Script], FakeMonitor], greeting: bytes,
                                     expected: str) -> None:
    def script(peer: Peer) -> None:
        peer.send(greeting)
        peer.stall()

    monitor = fake_qmp(script)
    with pytest.raises(QmpError, match=f"QEMU's monitor at {monitor.path} {expected}"):
        QmpClient.connect(monitor.path, timeout=5)


def test_an_hmp_monitor_gets_a_hint(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    monitor = fake_qmp(lambda peer: peer.send(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n"))
    with pytest.raises(QmpError) as caught:
        QmpClient.connect(monitor.path, timeout=5)
    assert caught.value.hint is not None and "-qmp" in caught.value.hint


def test_refused_capabilities_fail_the_connect(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        command = peer.recv()
        peer.send({"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete"},
                   "id": command["id"]})

    monitor = fake_qmp(script)
    with pytest.raises(QmpCommandError, match=r"QMP command qmp_capabilities failed with CommandNotFound: "
                                              r"Capabilities negotiation is already complete$"):
        QmpClient.connect(monitor.path, timeout=5)


def test_a_missing_or_dead_socket_is_named(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match=f"there is no QEMU monitor socket at {tmp_path}/none.sock"):
        QmpClient.connect(tmp_path / "none.sock")
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()  # the file stays, nobody listens: a QEMU that died
    with pytest.raises(QmpError, match="refused the connection; is QEMU still running"):
        QmpClient.connect(stale)
    with pytest.raises(ValueError):
        QmpClient(socket.socket(socket.AF_UNIX), "x", 0, 1)


# -- commands and events -----------------------------------------------------------------------------


def test_events_between_a_command_and_its_reply_are_queued(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        command = peer.recv()
        assert command["arguments"] == {"job-id": "job0", "sync": "full"}
        peer.send(peer.event("JOB_STATUS_CHANGE", {"id": "job0", "status": "created"}))
        # the reply and two events in one write, the reply itself split over several writes
        batch = b"".join(json.dumps(m).encode() + b"\r\n" for m in [
            peer.event("JOB_STATUS_CHANGE", {"id": "job0", "status": "running"}),
            {"return": {}, "id": command["id"]},
            peer.event("BLOCK_JOB_COMPLETED", {"device": "job0", "len": 10, "offset": 10, "type": "backup"}),
        ])
        for i in range(0, len(batch), 7):
            peer.send(batch[i : i + 7])
            time.sleep(0.001)
        peer.send(peer.event("RESUME"))
        peer.reply(peer.recv(), "pong")

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client:
        assert client.execute("blockdev-backup", {"job-id": "job0", "sync": "full"}) == {}
        assert client.execute("ping") == "pong"
        done = client.wait_event("BLOCK_JOB_COMPLETED", timeout=1, match={"device": "job0"})
        assert done == QmpEvent("BLOCK_JOB_COMPLETED", {"device": "job0", "len": 10, "offset": 10, "type": "backup"},
                                1700000000.25)
        assert [e.data["status"] for e in client.events("JOB_STATUS_CHANGE")] == ["created", "running"]
        assert client.events() == [QmpEvent("RESUME", {}, 1700000000.25)]
        assert client.events() == []


def test_wait_event_matches_data_and_leaves_other_events_queued(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.reply(peer.recv())
        peer.send(peer.event("JOB_STATUS_CHANGE", {"id": "other", "status": "concluded"}))
        peer.send(peer.event("JOB_STATUS_CHANGE", {"id": "job0", "status": "running"}))
        time.sleep(0.1)
        peer.send(peer.event("BLOCK_JOB_ERROR", {"device": "job0", "info": {"op": "read", "errno": 5}}))
        peer.send(peer.event("JOB_STATUS_CHANGE", {"id": "job0", "status": "concluded"}))
        peer.stall()

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client:
        client.execute("job-start")
        event = client.wait_event("JOB_STATUS_CHANGE", timeout=5, match={"id": "job0", "status": "concluded"})
        assert event.data == {"id": "job0", "status": "concluded"}
        error = client.wait_event("BLOCK_JOB_ERROR", timeout=1, match={"info": {"op": "read"}})
        assert error.data["info"]["errno"] == 5
        left = client.events()
        assert [(e.name, e.data["id"]) for e in left] == [("JOB_STATUS_CHANGE", "other"), ("JOB_STATUS_CHANGE", "job0")]
        with pytest.raises(QmpError, match=r"did not send a STOP event within 0.2 s"):
            client.wait_event("STOP", timeout=0.2)


def test_matching_is_a_subset_test() -> None:
    event = QmpEvent("X", {"a": 1, "b": {"c": 2, "d": 3}})
    assert event.matches("X") and event.matches(None) and not event.matches("Y")
    assert event.matches("X", {"a": 1, "b": {"c": 2}})
    assert not event.matches("X", {"a": 2})
    assert not event.matches("X", {"e": 1})
    assert not event.matches("X", {"a": {"c": 2}})  # not a mapping


def test_qemu_errors_name_command_class_and_description(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        command = peer.recv()
        peer.send({"error": {"class": "GenericError", "desc": "Bitmap already exists: b0"}, "id": command["id"]})
        command = peer.recv()
        peer.send({"error": {"class": "GenericError", "desc": "JSON parse error."}})  # QEMU gave no id
        peer.reply(peer.recv(), [1, 2])

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client:
        with pytest.raises(QmpCommandError) as caught:
            client.execute("block-dirty-bitmap-add", {"node": "d0", "name": "b0"})
        assert str(caught.value) == ("QMP command block-dirty-bitmap-add failed with GenericError: "
                                     "Bitmap already exists: b0")
        assert (caught.value.command, caught.value.error_class, caught.value.desc) == (
            "block-dirty-bitmap-add", "GenericError", "Bitmap already exists: b0")
        with pytest.raises(QmpCommandError, match=r"JSON parse error$"):
            client.execute("x")
        assert client.execute("y") == [1, 2]  # the session goes on


def test_a_late_reply_to_a_timed_out_command_is_dropped(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        slow = peer.recv()
        fast = peer.recv()
        peer.reply(slow, "slow")
        peer.reply(fast, "fast")
        late = peer.recv()
        peer.send(peer.event("STOP"))
        time.sleep(0.3)
        peer.reply(late, "late")
        peer.reply(peer.recv(), "last")

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client:
        started = time.monotonic()
        with pytest.raises(QmpError, match=r"did not send the reply to slow-command within 0.2 s"):
            client.execute("slow-command", timeout=0.2)
        assert time.monotonic() - started < 1
        assert client.execute("fast-command") == "fast"
        with pytest.raises(QmpError, match="did not send the reply to late-command"):
            client.execute("late-command", timeout=0.1)
        assert client.wait_event("STOP", timeout=2).name == "STOP"
        assert client.execute("last-command") == "last"


def test_transaction_and_hmp_send_what_qemu_expects(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.reply(peer.recv())
        peer.reply(peer.recv())
        peer.reply(peer.recv(), "wrote 65536/65536 bytes at offset 0\r\n")
        peer.reply(peer.recv(), {"not": "text"})

    monitor = fake_qmp(script)
    actions = [{"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}},
               {"type": "block-dirty-bitmap-disable", "data": {"node": "d0", "name": "b0"}}]
    with QmpClient.connect(monitor.path) as client:
        assert client.transaction(actions) is None
        client.transaction(actions[:1], properties={"completion-mode": "grouped"})
        assert client.hmp('qemu-io -d vda/virtio-backend "write 0 64k"').startswith("wrote 65536")
        with pytest.raises(QmpError, match="answered the HMP command 'info block' with dict, not text"):
            client.hmp("info block")
    sent = monitor.peers[0].received
    assert sent[1]["execute"] == "transaction" and sent[1]["arguments"] == {"actions": actions}
    assert sent[2]["arguments"] == {"actions": actions[:1], "properties": {"completion-mode": "grouped"}}
    assert sent[3]["arguments"] == {"command-line": 'qemu-io -d vda/virtio-backend "write 0 64k"'}


def test_arguments_that_are_not_json_are_refused_before_sending(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.reply(peer.recv(), "ok")

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client:
        with pytest.raises(QmpError, match="arguments of QMP command x cannot be sent as JSON"):
            client.execute("x", {"path": Path("/")})
        assert client.execute("y") == "ok"


# -- broken peers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"return": {}, "id": \n', "sent a malformed message"),
    (b"[1, 2]\n", "sent a malformed message"),
    (b"\xff\xfe\n", "sent a malformed message"),
    (b'{"hello": 1}\n', "sent a message that is not QMP"),
    (b'{"event": 5}\n', "sent an event without a name"),
    (b'{"return": {}, "id": "{\n', "sent a malformed message"),  # pretty=on or garbage
])
def test_a_malformed_message_breaks_the_connection(fake_qmp: Callable[[Script], FakeMonitor], line: bytes,
                                                    expected: str) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.recv()
        peer.send(line)
        peer.stall()

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client:
        with pytest.raises(QmpError, match=f"QEMU's monitor at {monitor.path} {expected}"):
            client.execute("query-status")
        assert client.closed
        with pytest.raises(QmpError, match=f"the connection to QEMU's monitor at {monitor.path} is gone: .*{expected}"):
            client.execute("query-status")


def test_a_line_without_end_is_not_buffered_forever(fake_qmp: Callable[[Script], FakeMonitor],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qmp_module, "MAX_LINE", 4096)

    def script(peer: Peer) -> None:
        peer.handshake()
        peer.recv()
        peer.send(b"x" * 10_000)
        peer.stall()

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client, pytest.raises(QmpError, match="without a line break"):
        client.execute("query-status")


def test_a_monitor_closing_while_a_command_waits_says_qemu_quit(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.recv()
        peer.close()

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client:
        with pytest.raises(QmpError) as caught:
            client.execute("query-status")
        assert str(caught.value) == (f"QEMU's monitor at {monitor.path} closed the connection while Hozon waited "
                                     "for the reply to query-status; did QEMU quit?")
        with pytest.raises(QmpError, match=r"is gone: .*did QEMU quit"):
            client.execute("query-status")


def test_a_monitor_closing_in_the_middle_of_a_message(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.recv()
        peer.send(b'{"return": {"status": "runn')
        peer.close()

    monitor = fake_qmp(script)
    with QmpClient.connect(monitor.path) as client, pytest.raises(QmpError, match="in the middle of a message"):
        client.execute("query-status")


def test_a_monitor_closing_during_the_greeting(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    monitor = fake_qmp(lambda peer: peer.close())
    with pytest.raises(QmpError, match="closed the connection while Hozon waited for its greeting"):
        QmpClient.connect(monitor.path, timeout=5)


def test_events_sent_before_the_monitor_went_away_can_still_be_read(
        fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.reply(peer.recv())
        peer.send(peer.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
        peer.close()

    monitor = fake_qmp(script)
    client = QmpClient.connect(monitor.path)
    assert client.execute("quit") == {}
    time.sleep(0.2)
    assert [e.data["reason"] for e in client.events("SHUTDOWN")] == ["host-qmp-quit"]
    assert client.closed
    with pytest.raises(QmpError, match="did QEMU quit"):
        client.execute("query-status")
    client.close()
    client.close()  # harmless


def test_a_closed_client_says_so(fake_qmp: Callable[[Script], FakeMonitor]) -> None:
    monitor = fake_qmp(Peer.handshake)
    client = QmpClient.connect(monitor.path)
    client.close()
    with pytest.raises(QmpError, match=f"the connection to QEMU's monitor at {monitor.path} is closed$"):
        client.execute("query-status")
    with pytest.raises(QmpError, match="is closed"):
        client.wait_event("STOP", timeout=1)
    assert client.events() == []
