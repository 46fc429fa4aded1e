"""One storage contract (``hozon.repo.backends.base``), one suite every backend passes: in memory, a local
directory, a Hozon server over HTTPS (as an agent) and S3-compatible object storage (SeaweedFS).

A new backend joins by adding its name to the ``backend`` fixture's parameters."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from tests.hozon_server import RunningServer, running_server
from tests.seaweedfs import Seaweed, running_seaweed

from hozon.agent.config import AgentConfig
from hozon.errors import BackendError, ObjectNotFound, UsageError
from hozon.repo.backends import Backend, Entry, LocalBackend, open_backend
from hozon.repo.backends.local import TMP_DIR
from hozon.repo.backends.mem import MemoryBackend
from hozon.repo.backends.remote import RemoteBackend
from hozon.repo.backends.s3 import S3Backend
from hozon.server import pki
from hozon.server.paths import ServerDir


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("conformance")) as running:
        yield running


def new_agent(server: RunningServer, directory: Path) -> AgentConfig:
    """An agent of a fresh namespace, enrolled through the API (the enrol command has its own tests)."""
    namespace = f"ns{os.urandom(4).hex()}"
    with server.client() as admin:
        token = admin.post("/api/v1/tokens", json={"namespace": namespace}).json()["token"]
    with server.client(token="") as anonymous:
        doc = anonymous.post("/api/v1/enrol", json={"token": token.split(".")[0], "name": namespace}).json()
    config = AgentConfig(server.url, doc["agent_id"], doc["name"], doc["secret"], doc["namespace"], doc["password"],
                         directory)
    config.save(server.ca.read_bytes())
    return config


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as running:
        yield running


@pytest.fixture(params=["mem", "local", "remote", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "mem":
        yield MemoryBackend()
        return
    if request.param == "local":
        yield LocalBackend(tmp_path / "repo")
        return
    if request.param == "s3":
        s3: Seaweed = request.getfixturevalue("seaweed")
        monkeypatch = request.getfixturevalue("monkeypatch")
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        yield open_backend(s3.location(s3.make_bucket(f"b{os.urandom(6).hex()}"), "some/prefix"))
        return
    server: RunningServer = request.getfixturevalue("server")
    agent = new_agent(server, tmp_path / "agent")
    remote = RemoteBackend(f"hozon+https://{server.url.removeprefix('https://')}/{agent.namespace}", agent)
    yield remote
    remote.close()


def data_key(content: bytes) -> str:
    name = blake3.blake3(content).hexdigest()
    return f"data/{name[:2]}/{name}"


def test_put_get_exists(backend: Backend) -> None:
    content = os.urandom(3 << 20)
    key = data_key(content)
    assert not backend.exists(key)
    with pytest.raises(ObjectNotFound) as missing:
        backend.get(key)
    assert missing.value.message == f"{backend.location}: {key} does not exist"
    with pytest.raises(ObjectNotFound):
        backend.get(key, 10, 10)
    backend.put(key, memoryview(content))
    assert backend.exists(key)
    assert backend.get(key) == content
    empty = b""
    backend.put(data_key(empty), empty)
    assert backend.get(data_key(empty)) == b"" and backend.exists(data_key(empty))


def test_ranges(backend: Backend) -> None:
    content = os.urandom(100000)
    key = data_key(content)
    backend.put(key, content)
    assert backend.get(key, 10, 20) == content[10:30]
    assert backend.get(key, 99990) == content[99990:]
    assert backend.get(key, 99990, 50) == content[99990:]  # a length beyond the end is cut
    assert backend.get(key, 0, 1) == content[:1]
    assert backend.get(key, 5, 0) == b""
    assert backend.get(key, 100000) == b""  # at or past the end: nothing
    assert backend.get(key, 200000, 10) == b""


def test_list_with_sizes(backend: Backend) -> None:
    contents = [os.urandom(n) for n in (10, 1000, 70000)]
    for content in contents:
        backend.put(data_key(content), content)
    expected = {data_key(c): len(c) for c in contents}
    listed = list(backend.list("data"))
    assert all(isinstance(e, Entry) for e in listed)
    assert {k: v for k, v in listed if k in expected} == expected
    first = data_key(contents[0])
    assert Entry(first, 10) in set(backend.list(first.rsplit("/", 1)[0]))
    assert list(backend.list("snapshots")) == []
    assert all(e.key.startswith(first[:8]) for e in backend.list(first[:7]))


def test_write_once(backend: Backend) -> None:
    content = os.urandom(5000)
    key = data_key(content)
    backend.put(key, content)
    backend.put(key, content)  # the same bytes again (a retry) is accepted
    assert backend.get(key) == content
    lock = f"locks/{os.urandom(8).hex()}"
    backend.put(lock, b"first")
    try:
        backend.put(lock, b"second")  # a local directory keeps the first silently; the others refuse
    except BackendError as exc:
        assert not isinstance(backend, LocalBackend) and "exists already" in exc.message
    assert backend.get(lock) == b"first"


def test_delete(backend: Backend) -> None:
    lock = f"locks/{os.urandom(8).hex()}"
    backend.put(lock, b"held")
    assert lock in {e.key for e in backend.list("locks")}
    backend.delete(lock)
    assert not backend.exists(lock) and lock not in {e.key for e in backend.list("locks")}
    backend.delete(lock)  # deleting what is gone is no error


def test_parallel_puts(backend: Backend) -> None:
    """The writer runs ``backend.uploaders`` puts at once: each lands whole under its own key."""
    contents = [os.urandom(200_000 + n) for n in range(8)]
    threads = [threading.Thread(target=backend.put, args=(data_key(c), c)) for c in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert backend.uploaders >= 1
    assert all(backend.get(data_key(c)) == c for c in contents)


def interrupt_an_upload(backend: Backend) -> bool:
    """Leave what a writer killed mid-upload leaves; False where a put is atomic and leaves nothing."""
    if isinstance(backend, LocalBackend):
        fd, tmp = backend.temp_file()
        os.write(fd, b"half a pack")
        os.close(fd)
        os.utime(tmp, (time.time() - 10, time.time() - 10))
        return True
    if isinstance(backend, S3Backend):  # its puts are single requests; other S3 tools leave these
        started = backend._s3.create_multipart_upload(Bucket=backend.bucket, Key=f"{backend.root}data/00/half")
        backend._s3.upload_part(Bucket=backend.bucket, Key=f"{backend.root}data/00/half", PartNumber=1,
                                UploadId=started["UploadId"], Body=b"half a pack")
        return True
    return False


def test_interrupted_uploads_are_never_listed_and_are_cleaned_by_the_backend(backend: Backend) -> None:
    backend.put("locks/a", b"x")
    if not interrupt_an_upload(backend):
        assert backend.clean_uploads(0) == 0  # puts are atomic here: nothing is ever left behind
        return
    assert [e.key for e in backend.list("")] == ["locks/a"]
    assert list(backend.list(TMP_DIR)) == [] and list(backend.list("data")) == []
    assert backend.clean_uploads(3600) == 0  # young: perhaps a write in progress, left alone
    time.sleep(2)
    assert backend.clean_uploads(1, dry_run=True) == 1
    assert backend.clean_uploads(1) == 1
    assert backend.clean_uploads(0) == 0


def test_the_remote_backend_retries_while_the_server_restarts(server: RunningServer, tmp_path: Path) -> None:
    agent = new_agent(server, tmp_path / "agent")
    remote = RemoteBackend(f"hozon+https://{server.url.removeprefix('https://')}/{agent.namespace}", agent)
    content = os.urandom(1000)
    remote.put(data_key(content), content)
    server.stop(sig=9)
    restarter = threading.Timer(1.0, server.start)
    restarter.start()
    try:
        assert remote.get(data_key(content)) == content  # the first attempts find nobody listening
    finally:
        restarter.join()
        remote.close()


def test_a_server_whose_ca_is_not_the_pinned_one_is_refused(server: RunningServer, tmp_path: Path) -> None:
    agent = new_agent(server, tmp_path / "agent")
    other = ServerDir(tmp_path / "other")
    pki.create_ca(other)
    (agent.directory / "ca.pem").write_bytes(other.ca_cert.read_bytes())  # as if the agent had pinned another CA
    remote = RemoteBackend(f"hozon+https://{server.url.removeprefix('https://')}/{agent.namespace}", agent)
    with pytest.raises(BackendError, match="did not present a certificate signed by the pinned CA"):
        remote.exists("config")
    remote.close()


def test_a_range_the_server_cannot_serve_is_refused_in_one_sentence(server: RunningServer, tmp_path: Path) -> None:
    agent = new_agent(server, tmp_path / "agent")
    with server.client() as admin:
        assert admin.get("/api/v1/repo/x/objects/config", headers={"range": "lines=1-2"}).status_code == 404
        key = f"/api/v1/repo/{agent.namespace}/objects/config"
        assert admin.get(key, headers={"range": "lines=1-2"}).json()["detail"] == "unsupported Range header 'lines=1-2'"


def test_a_server_repository_needs_an_agent_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOZON_AGENT_DIR", raising=False)
    with pytest.raises(UsageError, match="a hozon\\+https repository needs an enrolled agent: set HOZON_AGENT_DIR"):
        open_backend("hozon+https://127.0.0.1:9/lab")
    monkeypatch.setenv("HOZON_AGENT_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="is not an enrolled agent directory"):
        open_backend("hozon+https://127.0.0.1:9/lab")
    with pytest.raises(UsageError, match="is not a server repository location"):
        open_backend("hozon+https://127.0.0.1:9/")
