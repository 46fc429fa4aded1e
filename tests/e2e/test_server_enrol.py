"""Enrolment: a one-time, expiring token that carries the CA fingerprint; agents listed and revoked."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

from tests.hozon_agents import enrol, token
from tests.hozon_server import RunningServer, running_server


def agents(server: RunningServer) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(server.hozon("agents", "--dir", str(server.directory), "--json").stdout)
    return rows


def test_an_agent_enrols_with_the_fingerprint_its_token_carries(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        agent = enrol(server, tmp_path / "agent", "lab", "web1")
        config = json.loads((agent.directory / "agent.json").read_text())
        assert config["namespace"] == "lab" and config["name"] == "web1" and config["url"] == server.url
        assert config["password"] == (server.directory / "keys" / "lab.password").read_text().strip()
        for name in ("agent.json", "ca.pem"):
            assert stat.S_IMODE((agent.directory / name).stat().st_mode) == 0o600, name
        assert (agent.directory / "ca.pem").read_bytes() == server.ca.read_bytes()
        # The server keeps only the credential's hash; the credential itself works.
        assert agent.secret not in (server.directory / "catalog.sqlite").read_bytes().decode(errors="replace")
        with server.client(agent.secret) as c:
            assert c.get("/api/v1/whoami").json() == {"kind": "agent", "name": "web1", "namespace": "lab",
                                                      "version": c.get("/api/v1/whoami").json()["version"]}
        [row] = agents(server)
        assert (row["name"], row["namespace"], row["revoked"]) == ("web1", "lab", False)
        assert row["last_seen"] is not None
        # The namespace got its own encrypted repository on the server.
        assert (server.directory / "datastore" / "lab" / "config").exists()
        assert stat.S_IMODE((server.directory / "keys" / "lab.password").stat().st_mode) == 0o600


def test_a_wrong_fingerprint_is_refused_before_the_token_is_sent(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        secret = token(server, "lab")
        wrong = "ab" * 32
        refused = server.hozon("agent", "enroll", server.url, "--token", secret, "--dir", str(tmp_path / "a"),
                               "--fingerprint", wrong, check=False)
        assert refused.returncode == 1
        assert f"has CA fingerprint {server.fingerprint}, not the expected {wrong}; refusing to enrol" in refused.stderr
        assert "Traceback" not in refused.stderr
        # A token whose fingerprint was altered is refused the same way.
        forged = secret.rsplit(".", 1)[0] + "." + wrong
        again = server.hozon("agent", "enroll", server.url, "--token", forged, "--dir", str(tmp_path / "a"),
                             check=False)
        assert again.returncode == 1 and "refusing to enrol" in again.stderr
        assert not (tmp_path / "a" / "agent.json").exists() and agents(server) == []
        # Nothing was spent: the token still enrols (with the fingerprint given explicitly, in colon form).
        colons = ":".join(server.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
        server.hozon("agent", "enroll", server.url, "--token", secret.rsplit(".", 1)[0], "--dir",
                     str(tmp_path / "a"), "--name", "ok", "--fingerprint", colons)
        assert [row["name"] for row in agents(server)] == ["ok"]


def test_a_used_or_expired_token_enrols_nobody(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        secret = token(server, "lab")
        server.hozon("agent", "enroll", server.url, "--token", secret, "--dir", str(tmp_path / "first"),
                     "--name", "first")
        reused = server.hozon("agent", "enroll", server.url, "--token", secret, "--dir", str(tmp_path / "second"),
                              "--name", "second", check=False)
        assert reused.returncode == 1
        assert "the server refused to enrol this agent: the enrolment token was used already" in reused.stderr
        short = token(server, "lab", expires="1s")
        time.sleep(1.5)
        expired = server.hozon("agent", "enroll", server.url, "--token", short, "--dir", str(tmp_path / "third"),
                               "--name", "third", check=False)
        assert expired.returncode == 1 and "the enrolment token has expired" in expired.stderr
        unknown = server.hozon("agent", "enroll", server.url, "--token", "hzenr_nothing." + server.fingerprint,
                               "--dir", str(tmp_path / "fourth"), check=False)
        assert unknown.returncode == 1 and "the enrolment token is not known to this server" in unknown.stderr
        for name in ("second", "third", "fourth"):
            assert not (tmp_path / name / "agent.json").exists()
        assert [row["name"] for row in agents(server)] == ["first"]
        # A name already taken is refused without spending the token.
        fresh = token(server, "lab")
        taken = server.hozon("agent", "enroll", server.url, "--token", fresh, "--dir", str(tmp_path / "fifth"),
                             "--name", "first", check=False)
        assert taken.returncode == 1 and "an agent named first exists already" in taken.stderr
        server.hozon("agent", "enroll", server.url, "--token", fresh, "--dir", str(tmp_path / "fifth"),
                     "--name", "fifth")


def test_a_revoked_agent_is_refused(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        agent = enrol(server, tmp_path / "agent", "lab", "gone")
        server.hozon("agent", "revoke", "gone", "--dir", str(server.directory))
        with server.client(agent.secret) as c:
            assert c.get("/api/v1/whoami").status_code == 401
        [row] = agents(server)
        assert row["revoked"] is True
        snapshots = server.hozon("snapshots", env=agent.env, check=False)
        assert snapshots.returncode == 1 and "unknown or revoked credential" in snapshots.stderr
        assert "Traceback" not in snapshots.stderr
        missing = server.hozon("agent", "revoke", "nobody", "--dir", str(server.directory), check=False)
        assert missing.returncode == 1 and "no agent is named nobody" in missing.stderr


def test_token_and_agent_commands_need_the_admin_and_a_valid_namespace(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        bad = server.hozon("server", "token", "create", "--dir", str(server.directory), "--namespace", "Bad/Name",
                           check=False)
        assert bad.returncode == 2 and "is not a valid namespace name" in bad.stderr
        duration = server.hozon("server", "token", "create", "--dir", str(server.directory), "--namespace", "lab",
                                "--expires", "soon", check=False)
        assert duration.returncode == 2 and "'soon' is not a duration" in duration.stderr
        agent = enrol(server, tmp_path / "agent", "lab", "a1")
        with server.client(agent.secret) as c:
            assert c.post("/api/v1/tokens", json={"namespace": "other"}).status_code == 403
            assert c.get("/api/v1/agents").status_code == 403
            assert c.post("/api/v1/agents/a1/revoke").status_code == 403
        with server.client(token="") as anonymous:
            assert anonymous.post("/api/v1/tokens", json={"namespace": "lab"}).status_code == 401
            assert anonymous.get("/api/v1/agents").status_code == 401
        assert not (server.directory / "datastore" / "other").exists()
    stopped = server.hozon("agents", "--dir", str(server.directory), check=False)
    assert stopped.returncode == 1 and "cannot reach the server" in stopped.stderr and "Traceback" not in stopped.stderr
