"""hozon server init and run: TLS with its own CA, an admin credential, every request authenticated."""

from __future__ import annotations

import json
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from tests.hozon_server import running_server


def test_a_new_server_answers_over_tls_and_only_with_a_credential(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        for secret in ("admin.token", "tls/ca.key", "tls/server.key", "server.json"):
            assert stat.S_IMODE((server.directory / secret).stat().st_mode) == 0o600, secret
        with server.client() as admin:
            assert admin.get("/api/v1/whoami").json()["kind"] == "admin"
        with server.client(token="") as anonymous:
            assert anonymous.get("/api/v1/whoami").status_code == 401
        with server.client(token="hzadm_forged") as forged:
            assert forged.get("/api/v1/whoami").status_code == 401
        with pytest.raises(httpx.TransportError):  # plain HTTP gets no answer
            httpx.get(server.url.replace("https://", "http://") + "/api/v1/whoami", timeout=5)
        with pytest.raises(httpx.ConnectError) as err:  # a client that does not trust its CA refuses it
            httpx.get(server.url + "/api/v1/whoami", verify=ssl.create_default_context(), timeout=5)
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
        openapi = httpx.get(server.url + "/api/openapi.json", verify=server.tls(), timeout=5)
        assert openapi.status_code == 200 and "/api/v1/whoami" in openapi.json()["paths"]


def test_init_refuses_a_directory_that_holds_a_server_and_a_bad_listen(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        again = server.hozon("server", "init", "--dir", str(server.directory), check=False)
        assert again.returncode == 2 and "already holds a Hozon server" in again.stderr
        bad = server.hozon("server", "init", "--dir", str(tmp_path / "other"), "--listen", "nowhere", check=False)
        assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
        missing = server.hozon("server", "run", "--dir", str(tmp_path / "nothing"), check=False)
        assert missing.returncode == 2 and "is not a Hozon server directory" in missing.stderr


def test_the_server_logs_one_json_object_a_line_and_never_a_credential(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        with server.client() as admin:
            assert admin.get("/api/v1/whoami").status_code == 200
        with server.client(token="") as anonymous:
            assert anonymous.get("/api/v1/jobs").status_code == 401
        server.stop()
        lines = [line for line in server.log.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    requests = [(r["method"], r["path"], r["status"]) for r in records if r["message"] == "request"]
    assert ("GET", "/api/v1/whoami", 200) in requests and ("GET", "/api/v1/jobs", 401) in requests
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert server.admin_token not in server.log.read_text()
