"""Repositories in S3-compatible object storage, through the real ``hozon`` command and a real SeaweedFS."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import Hozon, tree_digest
from tests.seaweedfs import Seaweed, running_seaweed


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as running:
        yield running


def s3_hozon(s3: Seaweed, tmp_path: Path, location: str | None = None) -> Hozon:
    """A runner whose repository is a fresh bucket (with a prefix) on ``s3``, initialised."""
    h = Hozon(tmp_path / "unused")
    h.env.update(s3.env())
    h.env["HOZON_REPO"] = location or s3.location(s3.make_bucket(f"b{os.urandom(6).hex()}"), "backups/lab")
    h("init")
    return h


def write_image(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(16 << 20)
        for offset in (0, 5 << 20, (16 << 20) - 65536):
            f.seek(offset)
            f.write(os.urandom(65536))


def test_files_back_up_restore_check_and_prune(seaweed: Seaweed, tmp_path: Path,
                                               make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    h = s3_hozon(seaweed, tmp_path)
    tree = make_tree({"a": os.urandom(3 << 20), "dir/b": "hello", "dir/c": os.urandom(100)})
    h("backup", str(tree))
    (tree / "a").write_bytes(os.urandom(2 << 20))
    h("backup", str(tree))
    h("restore", "latest", "--target", str(tmp_path / "out"))
    assert tree_digest(tmp_path / "out" / str(tree).lstrip("/")) == tree_digest(tree)
    h("check", "--read-data")
    before = {o["Key"] for o in seaweed.client().list_objects_v2(
        Bucket=h.env["HOZON_REPO"].split("/")[3])["Contents"]}
    assert all(k.startswith("backups/lab/") for k in before)
    h("forget", "--keep-last", "1", "--prune")
    after = {o["Key"] for o in seaweed.client().list_objects_v2(
        Bucket=h.env["HOZON_REPO"].split("/")[3])["Contents"]}
    assert any(k.startswith("backups/lab/data/") for k in before - after)  # packs of the forgotten one went
    h("check", "--read-data")
    h("restore", "latest", "--target", str(tmp_path / "again"))
    assert tree_digest(tmp_path / "again" / str(tree).lstrip("/")) == tree_digest(tree)


def test_a_vm_image_backs_up_and_restores_byte_exact(seaweed: Seaweed, tmp_path: Path) -> None:
    h = s3_hozon(seaweed, tmp_path)
    image = tmp_path / "vda.raw"
    write_image(image)
    h("vm", "backup", "--image", str(image), "--name", "off1")
    h("vm", "restore", "latest:off1", "--to", str(tmp_path / "out"), "--format", "raw")
    assert (tmp_path / "out" / "vda.raw").read_bytes() == image.read_bytes()
    h("check", "--read-data")


def test_the_server_killed_mid_upload_then_restarted_the_next_backup_completes(
        tmp_path: Path, make_tree: Callable[[dict[str, bytes | str]], Path]) -> None:
    with running_seaweed(tmp_path / "seaweed-own") as s3:
        h = s3_hozon(s3, tmp_path)
        bucket = h.env["HOZON_REPO"].split("/")[3]
        tree = make_tree({f"f{n}": os.urandom(8 << 20) for n in range(12)})
        backup = h.popen("backup", str(tree))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the first packs, then pull the plug
            listed = s3.client().list_objects_v2(Bucket=bucket, Prefix="backups/lab/data/")
            if listed.get("KeyCount", 0) >= 2:
                break
            time.sleep(0.05)
        s3.stop(sig=9)
        _out, err = backup.communicate(timeout=300)
        assert backup.returncode != 0 and "Traceback" not in err, err
        assert f"cannot reach S3 at {s3.endpoint}" in err, err
        s3.start()
        h("backup", str(tree))
        h("check", "--read-data")
        h("restore", "latest", "--target", str(tmp_path / "out"))
        assert tree_digest(tmp_path / "out" / str(tree).lstrip("/")) == tree_digest(tree)


def test_wrong_credentials_are_one_sentence(seaweed: Seaweed, tmp_path: Path) -> None:
    h = s3_hozon(seaweed, tmp_path)
    wrong = h("snapshots", check=False, env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert f"S3 at {seaweed.endpoint} refused the credentials (SignatureDoesNotMatch)" in wrong.stderr
    unknown = h("snapshots", check=False, env={"AWS_ACCESS_KEY_ID": "nobody"})
    assert unknown.returncode == 1 and "refused the credentials (InvalidAccessKeyId)" in unknown.stderr
    none = h("snapshots", check=False, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    assert none.returncode == 2 and "no S3 credentials were found" in none.stderr, none.stderr


def test_a_missing_bucket_is_one_sentence(seaweed: Seaweed, tmp_path: Path) -> None:
    h = Hozon(tmp_path / "unused")
    h.env.update(seaweed.env())
    h.env["HOZON_REPO"] = seaweed.location("no-such-bucket")
    for command in (("init",), ("snapshots",)):
        result = h(*command, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"S3 bucket 'no-such-bucket' does not exist at {seaweed.endpoint}" in result.stderr, result.stderr


def test_a_location_that_is_not_s3_is_a_usage_error(tmp_path: Path) -> None:
    h = Hozon(tmp_path / "unused")
    h.env["HOZON_REPO"] = "s3:https://"
    result = h("snapshots", check=False)
    assert result.returncode == 2 and "is not an S3 repository location" in result.stderr
    assert "s3:https://HOST[:PORT]/BUCKET[/PREFIX]" in result.stderr


def test_json_output_names_the_s3_location(seaweed: Seaweed, tmp_path: Path) -> None:
    h = s3_hozon(seaweed, tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    doc = json.loads(h("backup", str(tmp_path / "src"), "--json").stdout)
    assert doc["snapshot"]["id"]
