"""A real ``hozon server`` process for tests: initialised in a temp directory, on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    directory: Path
    url: str
    fingerprint: str
    proc: subprocess.Popen[bytes]
    log: Path
    catalog: str = ""

    @property
    def admin_token(self) -> str:
        return (self.directory / "admin.token").read_text().strip()

    @property
    def ca(self) -> Path:
        return self.directory / "tls" / "ca.pem"

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTPS client that trusts only this server's CA, with ``token`` (default: the admin's)."""
        headers = {"Authorization": f"Bearer {token or self.admin_token}"} if token != "" else {}
        return httpx.Client(base_url=self.url, verify=self.tls(), headers=headers, timeout=30)

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def hozon(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "hozon", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"hozon {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def start(self) -> None:
        """(Re)start the server process on the same directory and wait until it answers."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hozon", "server", "run", "--dir", str(self.directory)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"hozon server run exited {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError), self.client() as c:
                if c.get("/api/v1/whoami").status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"hozon server did not answer within 60 s:\n{self.log.read_text()}")


@contextlib.contextmanager
def running_server(tmp_path: Path, catalog: str = "") -> Iterator[RunningServer]:
    """``hozon server init`` then ``hozon server run``; stopped (and killed if need be) at the end."""
    import json

    directory = tmp_path / "server"
    args = ["server", "init", "--dir", str(directory), "--listen", f"127.0.0.1:{free_port()}", "--json"]
    if catalog:
        args += ["--catalog", catalog]
    init = subprocess.run([sys.executable, "-m", "hozon", *args], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    doc = json.loads(init.stdout)
    server = RunningServer(directory, doc["url"], doc["fingerprint"], None, tmp_path / "server.log", catalog)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()
