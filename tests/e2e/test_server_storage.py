"""The repository over HTTPS: agents back up through the server; the server enforces who writes what."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3
from tests.conftest import tree_digest
from tests.hozon_agents import enrol, server_side_env
from tests.hozon_server import running_server


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_an_agent_backs_up_through_the_server_and_the_server_restores_it(
        tmp_path: Path, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    tree = make_tree({"big.bin": os.urandom(5 << 20), "etc/motd": "hello\n", "etc/empty": b"",
                      "deep/a/b/c.txt": "x" * 10000})
    with running_server(tmp_path) as server:
        agent = enrol(server, tmp_path / "agent", "lab", "web1")
        server.hozon("backup", str(tree), env=agent.env)
        (tree / "etc" / "motd").write_text("changed\n")
        server.hozon("backup", str(tree), env=agent.env)
        snaps = json.loads(server.hozon("snapshots", "--json", env=agent.env).stdout)
        assert len(snaps) == 2
        server.hozon("check", env=agent.env)
        # Restored through the agent …
        server.hozon("restore", "latest", "--target", str(tmp_path / "via-agent"), env=agent.env)
        assert tree_digest(tmp_path / "via-agent" / str(tree).lstrip("/")) == tree_digest(tree)
        # … and on the server host, with the namespace's own password file: no agent involved.
        side = server_side_env(server, "lab")
        assert side["HOZON_REPO"] == str(server.directory / "datastore" / "lab")
        server.hozon("check", "--read-data", env=side)
        server.hozon("restore", "latest", "--target", str(tmp_path / "on-server"), env=side)
        assert tree_digest(tmp_path / "on-server" / str(tree).lstrip("/")) == tree_digest(tree)
        # The agent's lock files are gone; no temporary upload is left behind.
        assert files_under(server.directory / "datastore" / "lab" / "locks") == set()
        assert files_under(server.directory / "datastore" / "lab" / "tmp") == set()


def test_a_vm_image_backed_up_through_the_server_restores_byte_exact(tmp_path: Path) -> None:
    image = tmp_path / "vda.raw"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
        for offset in (0, 5 << 20, (16 << 20) - 65536):
            f.seek(offset)
            f.write(os.urandom(65536))
    with running_server(tmp_path) as server:
        agent = enrol(server, tmp_path / "agent", "vms", "hv1")
        server.hozon("vm", "backup", "--image", str(image), "--name", "off1", env=agent.env)
        side = server_side_env(server, "vms")
        server.hozon("vm", "restore", "latest:off1", "--to", str(tmp_path / "out"), "--format", "raw", env=side)
        assert (tmp_path / "out" / "vda.raw").read_bytes() == image.read_bytes()
        server.hozon("check", "--read-data", env=side)


def test_agents_write_only_their_own_namespace_and_never_rewrite_or_delete_data(
        tmp_path: Path, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    tree = make_tree({"f": os.urandom(100000)})
    with running_server(tmp_path) as server:
        a = enrol(server, tmp_path / "a", "ns-a", "agent-a")
        b = enrol(server, tmp_path / "b", "ns-b", "agent-b")
        server.hozon("backup", str(tree), env=a.env)
        server.hozon("backup", str(tree), env=b.env)
        repo_a, repo_b = server.directory / "datastore" / "ns-a", server.directory / "datastore" / "ns-b"
        before_a, before_b = tree_digest(repo_a), tree_digest(repo_b)
        [pack_b] = [k for k in files_under(repo_b) if k.startswith("data/")]
        [pack_a] = [k for k in files_under(repo_a) if k.startswith("data/")]
        [snap_a] = [k for k in files_under(repo_a) if k.startswith("snapshots/")]
        [index_a] = [k for k in files_under(repo_a) if k.startswith("index/")]
        other = b"not a pack"
        other_key = f"data/{blake3.blake3(other).hexdigest()[:2]}/{blake3.blake3(other).hexdigest()}"

        with server.client(a.secret) as c:
            # Another namespace: refused whatever the verb, before anything is read or written.
            for method, path in (("GET", f"/objects/{pack_b}"), ("HEAD", f"/objects/{pack_b}"),
                                 ("GET", "/list?prefix=data"), ("DELETE", f"/objects/{pack_b}"),
                                 ("PUT", f"/objects/{other_key}")):
                response = c.request(method, f"/api/v1/repo/ns-b{path}", content=other if method == "PUT" else None)
                assert response.status_code == 403, (method, path, response.text)
            assert "may not use namespace ns-b" in c.get(f"/api/v1/repo/ns-b/objects/{pack_b}").json()["detail"]
            # Its own namespace: no overwriting, no deleting data, index or snapshots, no keys or config.
            mine = f"/api/v1/repo/ns-a/objects/{pack_a}"
            assert c.put(mine, content=b"garbage").status_code == 400  # not the content its name promises
            assert c.put(mine, content=(repo_a / pack_a).read_bytes()).status_code == 200  # an identical retry
            for key in (pack_a, snap_a, index_a, "config"):
                refused = c.delete(f"/api/v1/repo/ns-a/objects/{key}")
                assert refused.status_code == 403 and "only the server deletes data" in refused.json()["detail"]
            key_body = b'{"kdf": "none"}'
            for key in (f"keys/{blake3.blake3(key_body).hexdigest()}", "config"):
                assert c.put(f"/api/v1/repo/ns-a/objects/{key}", content=key_body).status_code == 403
            for bad in ("data/zz/notahash", "tmp/x", "locks/.hidden", "snapshots/%2E%2E/%2E%2E/ns-b/config"):
                refused = c.put(f"/api/v1/repo/ns-a/objects/{bad}", content=b"x")
                assert refused.status_code == 400 and "is not a repository file name" in refused.json()["detail"], bad
            assert c.get("/api/v1/repo/ns-a/list?prefix=../ns-b").status_code == 400
            # Locks: the one kind of file an agent adds, rewrites never, and deletes.
            lock = "/api/v1/repo/ns-a/objects/locks/abc123"
            assert c.put(lock, content=b"one").status_code == 201
            assert c.put(lock, content=b"one").status_code == 200
            conflict = c.put(lock, content=b"two")
            assert conflict.status_code == 409 and "exists already with different content" in conflict.json()["detail"]
            assert c.get(lock).content == b"one"
            assert c.delete(lock).status_code == 204 and c.head(lock).status_code == 404
        with server.client(token="") as anonymous:
            assert anonymous.get(f"/api/v1/repo/ns-a/objects/{pack_a}").status_code == 401
            assert anonymous.put(f"/api/v1/repo/ns-a/objects/{other_key}", content=other).status_code == 401
            assert anonymous.get("/api/v1/repo/ns-a/list").status_code == 401
        with server.client() as admin:  # the server's own credential may delete (prune runs as the server)
            assert admin.get(f"/api/v1/repo/ns-b/objects/{pack_b}").content == (repo_b / pack_b).read_bytes()
        assert tree_digest(repo_a) == before_a and tree_digest(repo_b) == before_b
        # Through the ordinary commands: a forget by the agent is refused in one sentence, nothing removed.
        forget = server.hozon("forget", "latest", env=a.env, check=False)
        assert forget.returncode == 1 and "Traceback" not in forget.stderr
        assert "the server refused to delete snapshots/" in forget.stderr and "only the server deletes data" in \
            forget.stderr
        assert files_under(repo_a / "snapshots") == {snap_a.removeprefix("snapshots/")}
        server.hozon("agent", "revoke", "agent-a", "--dir", str(server.directory))
        with server.client(a.secret) as c:
            assert c.get(f"/api/v1/repo/ns-a/objects/{pack_a}").status_code == 401


def test_a_server_killed_mid_upload_leaves_a_repository_that_checks_and_takes_the_next_backup(
        tmp_path: Path, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    tree = make_tree({f"part{i}.bin": os.urandom(32 << 20) for i in range(8)})
    with running_server(tmp_path) as server:
        agent = enrol(server, tmp_path / "agent", "lab", "big")
        repo = server.directory / "datastore" / "lab"
        backup = subprocess.Popen([sys.executable, "-m", "hozon", "backup", str(tree)], text=True,
                                  env={**os.environ, **agent.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while len([k for k in files_under(repo) if k.startswith("data/")]) < 2:
            assert backup.poll() is None, "the backup finished before the server could be killed"
            assert time.monotonic() < deadline, "no pack arrived within 120 s"
            time.sleep(0.05)
        server.stop(sig=9)
        assert files_under(repo / "snapshots") == set()  # nothing that looks like a finished backup
        server.start()
        _out, err = backup.communicate(timeout=300)
        first_succeeded = backup.returncode == 0
        if not first_succeeded:  # it retried for a while, then gave up in one sentence
            assert err.startswith("hozon: error:") and "Traceback" not in err, err
        server.hozon("backup", str(tree), env=agent.env)
        side = server_side_env(server, "lab")
        server.hozon("check", "--read-data", env=side)
        snaps = json.loads(server.hozon("snapshots", "--json", env=side).stdout)
        assert len(snaps) == 1 + first_succeeded
        server.hozon("restore", "latest", "--target", str(tmp_path / "out"), env=side)
        assert tree_digest(tmp_path / "out" / str(tree).lstrip("/")) == tree_digest(tree)


def test_a_full_disk_on_the_server_is_one_sentence_and_earlier_snapshots_stay(
        tmp_path: Path, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    small = make_tree({"etc/motd": "hello\n" * 100})
    big = tmp_path / "big"
    big.mkdir()
    (big / "random.bin").write_bytes(os.urandom(48 << 20))  # incompressible, twice the datastore's room
    with running_server(tmp_path) as server:
        datastore = server.directory / "datastore"
        datastore.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(datastore)], check=True, timeout=30)
        try:
            agent = enrol(server, tmp_path / "agent", "lab", "web1")
            server.hozon("backup", str(small), env=agent.env)
            full = server.hozon("backup", str(big), env=agent.env, check=False)
            assert full.returncode == 1, full.stdout + full.stderr
            assert "no space left on the repository's disk" in full.stderr and "Traceback" not in full.stderr
            snaps = json.loads(server.hozon("snapshots", "--json", env=agent.env).stdout)
            assert [s["paths"] for s in snaps] == [[str(small)]]  # no partial snapshot of the big tree
            side = server_side_env(server, "lab")
            server.hozon("check", "--read-data", env=side)
            server.hozon("restore", "latest", "--target", str(tmp_path / "restored"), env=side)
            assert tree_digest(tmp_path / "restored" / str(small).lstrip("/")) == tree_digest(small)
        finally:
            server.stop()
            subprocess.run(["umount", "-l", str(datastore)], check=False, timeout=30)
