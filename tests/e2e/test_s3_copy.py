"""hozon copy between a local directory and S3 (SeaweedFS), and locked copies under S3 Object Lock."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import PASSWORD, Hozon, tree_digest
from tests.e2e.test_s3 import write_image
from tests.hozon_agents import enrol, server_side_env
from tests.hozon_server import running_server
from tests.seaweedfs import Seaweed, running_seaweed

TO_PASSWORD = "another password for the copy"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as running:
        yield running


def s3_repo(s3: Seaweed, tmp_path: Path, password: str = TO_PASSWORD, object_lock: bool = False) -> Hozon:
    h = Hozon(tmp_path / f"unused-{os.urandom(3).hex()}", password)
    h.env.update(s3.env())
    h.env["HOZON_REPO"] = s3.location(s3.make_bucket(f"b{os.urandom(6).hex()}", object_lock), "copies")
    h("init")
    return h


def copy(source: Hozon, target: Hozon, *args: str, check: bool = True) -> Any:
    env = {**target.env, "HOZON_REPO": source.env["HOZON_REPO"], "HOZON_PASSWORD": source.env["HOZON_PASSWORD"],
           "HOZON_TO_PASSWORD": target.env["HOZON_PASSWORD"]}
    result = source("copy", "--to", target.env["HOZON_REPO"], *args, "--json", env=env, check=check)
    return json.loads(result.stdout) if check else result


def test_local_to_s3_with_another_key_copies_incrementally_and_restores(
        hozon: Hozon, seaweed: Seaweed, tmp_path: Path, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    tree = make_tree({"a": os.urandom(3 << 20), "d/b": "hello", "d/e/c": os.urandom(5000)})
    hozon("backup", str(tree))
    image = tmp_path / "vda.raw"
    write_image(image)
    hozon("vm", "backup", "--image", str(image), "--name", "off1")
    target = s3_repo(seaweed, tmp_path)

    first = copy(hozon, target)
    assert len(first["copied"]) == 2 and first["skipped"] == [] and first["blobs_new"] > 0
    target("check", "--read-data")
    target("restore", f"latest:{tree}", "--target", str(tmp_path / "out"))
    assert tree_digest(tmp_path / "out" / str(tree).lstrip("/")) == tree_digest(tree)
    target("vm", "restore", "latest:off1", "--to", str(tmp_path / "vm"), "--format", "raw")
    assert (tmp_path / "vm" / "vda.raw").read_bytes() == image.read_bytes()

    again = copy(hozon, target)  # nothing new: nothing crosses
    assert again["copied"] == [] and len(again["skipped"]) == 2 and again["blobs_new"] == 0

    (tree / "new").write_bytes(os.urandom(100_000))
    hozon("backup", str(tree))
    third = copy(hozon, target)
    assert len(third["copied"]) == 1 and len(third["skipped"]) == 2
    assert third["blobs_new"] >= 1 and third["bytes_stored"] < 300_000  # the new file and its trees: not a 3 MiB again
    target("check", "--read-data")
    target("restore", f"latest:{tree}", "--target", str(tmp_path / "out3"))
    assert tree_digest(tmp_path / "out3" / str(tree).lstrip("/")) == tree_digest(tree)


def test_s3_to_local_latest_per_vm(seaweed: Seaweed, tmp_path: Path) -> None:
    source = s3_repo(seaweed, tmp_path, PASSWORD)
    image = tmp_path / "vda.raw"
    for name in ("web1", "web1", "db1"):
        write_image(image)
        source("vm", "backup", "--image", str(image), "--name", name)
    target = Hozon(tmp_path / "local-copy", TO_PASSWORD)
    target("init")
    done = copy(source, target, "--latest-per-vm")
    assert len(done["copied"]) == 2
    snaps = json.loads(target("snapshots", "--json").stdout)
    assert sorted(s["extra"]["vm"] for s in snaps) == ["db1", "web1"]
    target("check", "--read-data")
    target("vm", "restore", "latest:db1", "--to", str(tmp_path / "vm"), "--format", "raw")
    assert (tmp_path / "vm" / "vda.raw").read_bytes() == image.read_bytes()


def test_locked_copies_cannot_be_deleted_before_their_time(
        hozon: Hozon, seaweed: Seaweed, tmp_path: Path, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    tree = make_tree({"a": os.urandom(1 << 20)})
    hozon("backup", str(tree))
    target = s3_repo(seaweed, tmp_path, object_lock=True)
    done = copy(hozon, target, "--lock-days", "1")
    [(snapshot_id)] = [c["target"] for c in done["copied"]]
    bucket = target.env["HOZON_REPO"].split("/")[3]
    s3 = seaweed.client()
    locked = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
              if o["Key"].startswith(("copies/data/", "copies/snapshots/"))]
    assert locked and all(s3.head_object(Bucket=bucket, Key=k).get("ObjectLockMode") == "COMPLIANCE"
                          for k in locked)
    forget = target("forget", snapshot_id, "--prune", check=False)
    assert forget.returncode != 0 and "Traceback" not in forget.stderr, forget.stderr
    assert f"snapshots/{snapshot_id} is locked (S3 Object Lock) until" in forget.stderr, forget.stderr
    assert [s["id"] for s in json.loads(target("snapshots", "--json").stdout)] == [snapshot_id]
    target("check", "--read-data")


def test_lock_days_on_a_bucket_without_object_lock_is_one_sentence(hozon: Hozon, seaweed: Seaweed,
                                                                    tmp_path: Path) -> None:
    target = s3_repo(seaweed, tmp_path)
    result = copy(hozon, target, "--lock-days", "1", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has no Object Lock, so objects there cannot be locked" in result.stderr, result.stderr


def test_prune_leaves_locked_packs_alone(seaweed: Seaweed, tmp_path: Path,
                                         make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    """A pack no snapshot uses any more but still under Object Lock: prune keeps it (condemned) and succeeds."""
    target = s3_repo(seaweed, tmp_path, object_lock=True)
    bucket = target.env["HOZON_REPO"].split("/")[3]
    tree = make_tree({"a": os.urandom(1 << 20)})
    first = json.loads(target("backup", str(tree), "--json").stdout)["snapshot"]["id"]
    s3 = seaweed.client()
    packs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="copies/data/")["Contents"]]
    until = datetime.now(UTC) + timedelta(days=1)
    for key in packs:  # as a locked copy whose snapshot's own lock ran out would leave them
        s3.put_object_retention(Bucket=bucket, Key=key, Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until})
    (tree / "a").write_bytes(os.urandom(1 << 20))
    target("backup", str(tree))
    target("forget", first)
    for _ in range(2):  # the first prune condemns the unused packs, the second would delete them
        target("prune")
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="copies/data/")["Contents"]} >= set(packs)
    target("check", "--read-data")


def test_local_to_the_backup_server_to_s3(hozon: Hozon, seaweed: Seaweed, tmp_path: Path,
                                          make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    """The server's namespace as a target (as its enrolled agent), then as a source for S3."""
    tree = make_tree({"a": os.urandom(2 << 20), "b": "hello"})
    hozon("backup", str(tree))
    with running_server(tmp_path / "server") as server:
        agent = enrol(server, tmp_path / "agent", "lab", "hv1")
        on_server = Hozon(tmp_path / "unused")
        on_server.env.update(agent.env)
        del on_server.env["HOZON_PASSWORD"]  # the agent's own password opens its namespace
        env = {**agent.env, "HOZON_REPO": str(hozon.repo), "HOZON_PASSWORD": PASSWORD}
        done = json.loads(hozon("copy", "--to", agent.repo, "--json", env=env).stdout)
        assert len(done["copied"]) == 1
        side = server_side_env(server, "lab")
        server.hozon("check", "--read-data", env=side)
        target = s3_repo(seaweed, tmp_path)
        env = {**seaweed.env(), "HOZON_TO_PASSWORD": TO_PASSWORD}
        done = json.loads(on_server("copy", "--to", target.env["HOZON_REPO"], "--json", env=env).stdout)
        assert len(done["copied"]) == 1
    target("check", "--read-data")
    target("restore", f"latest:{tree}", "--target", str(tmp_path / "out"))
    assert tree_digest(tmp_path / "out" / str(tree).lstrip("/")) == tree_digest(tree)


def test_lock_days_into_a_directory_is_refused(hozon: Hozon, tmp_path: Path) -> None:
    target = Hozon(tmp_path / "plain", TO_PASSWORD)
    target("init")
    result = copy(hozon, target, "--lock-days", "1", check=False)
    assert result.returncode == 2 and "cannot lock objects; --lock-days needs an S3 repository" in result.stderr
    assert json.loads(target("snapshots", "--json").stdout) == []
