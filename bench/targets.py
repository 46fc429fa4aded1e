"""Storage targets: the S3 client libraries side by side, and Hozon backing up to a directory vs S3.

    python bench/targets.py                      # 48 objects of 4 MiB, 256 MiB tree
    python bench/targets.py --objects 96 --tree-mib 1024

Part 1 (how the S3 backend's library was chosen): boto3 and obstore against one SeaweedFS on
loopback in the same run: import time, put and get throughput with 4 threads (packs are uploaded
by several threads), and the latency of one small request (HEAD). obstore is not a dependency:
``pip install obstore`` to include it. Part 2: ``hozon backup`` of a generated tree (random data)
into a local directory and into S3, then ``hozon copy`` local → S3, wall time and MB/s.
Writes bench/results/targets-<UTC time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the SeaweedFS helper the tests use

from tests.seaweedfs import ACCESS_KEY, REGION, SECRET_KEY, Seaweed, running_seaweed  # noqa: E402

THREADS = 4


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def clients(s3: Seaweed) -> dict[str, dict[str, Callable[..., Any]]]:
    import boto3
    import botocore.config

    boto = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION,
                        config=botocore.config.Config(max_pool_connections=16))
    s3.make_bucket("bench-boto3")
    found: dict[str, dict[str, Callable[..., Any]]] = {"boto3": {
        "put": lambda k, b: boto.put_object(Bucket="bench-boto3", Key=k, Body=b, IfNoneMatch="*"),
        "get": lambda k: boto.get_object(Bucket="bench-boto3", Key=k)["Body"].read(),
        "head": lambda k: boto.head_object(Bucket="bench-boto3", Key=k)}}
    try:
        import obstore
        from obstore.store import S3Store
    except ImportError:
        return found
    s3.make_bucket("bench-obstore")
    store = S3Store("bench-obstore", endpoint=s3.endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                    region=REGION, client_options={"allow_http": True})
    found["obstore"] = {
        "put": lambda k, b: obstore.put(store, k, b, mode="create"),
        "get": lambda k: bytes(obstore.get(store, k).bytes()),
        "head": lambda k: obstore.head(store, k)}
    return found


def compare_clients(s3: Seaweed, objects: int) -> dict[str, Any]:
    blobs = [os.urandom(4 << 20) for _ in range(objects)]
    mb = objects * 4 * 1.048576
    out: dict[str, Any] = {}
    for name, ops in clients(s3).items():
        with ThreadPoolExecutor(THREADS) as pool:
            put = timed(lambda ops=ops: list(pool.map(lambda i: ops["put"](f"o/{i}", blobs[i]), range(objects))))
            get = timed(lambda ops=ops: list(pool.map(lambda i: ops["get"](f"o/{i}"), range(objects))))
        head = timed(lambda ops=ops: [ops["head"]("o/0") for _ in range(200)]) / 200
        out[name] = {"import_s": import_seconds(name if name == "boto3" else "obstore.store"),
                     "put_MBps": mb / put, "get_MBps": mb / get, "head_ms": head * 1000}
    return out


def hozon(env: dict[str, str], *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hozon", *args], env=env, check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def backups(s3: Seaweed, work: Path, tree_mib: int) -> dict[str, Any]:
    tree = work / "tree"
    for n in range(tree_mib // 16):
        (tree / f"d{n % 8}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{n % 8}" / f"f{n}").write_bytes(os.urandom(16 << 20))
    s3.make_bucket("bench-hozon")
    base = {**os.environ, **s3.env(), "HOZON_PASSWORD": "bench", "HOZON_CONFIG_DIR": str(work / "config"),
            "PYTHONPATH": str(ROOT / "src")}
    local = {**base, "HOZON_REPO": str(work / "repo")}
    remote = {**base, "HOZON_REPO": s3.location("bench-hozon", "backup")}
    copy_target = s3.location("bench-hozon", "copy")
    hozon(local, "init")
    hozon(remote, "init")
    hozon({**base, "HOZON_REPO": copy_target}, "init")
    seconds = {"backup_local_s": hozon(local, "backup", str(tree)),
               "backup_s3_s": hozon(remote, "backup", str(tree)),
               "copy_local_to_s3_s": hozon(local, "copy", "--to", copy_target)}
    return {**seconds, **{k.removesuffix("_s") + "_MBps": tree_mib * 1.048576 / v for k, v in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=48)
    parser.add_argument("--tree-mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp, running_seaweed(Path(tmp) / "seaweed") as s3:
        result = {"when": datetime.datetime.now(datetime.UTC).isoformat(), "machine": platform.node(),
                  "cpus": os.cpu_count(), "clients": compare_clients(s3, args.objects),
                  "hozon": backups(s3, Path(tmp), args.tree_mib)}
    for name, row in result["clients"].items():
        print(f"{name:8} import {row['import_s']:.3f} s  put {row['put_MBps']:6.0f} MB/s  "
              f"get {row['get_MBps']:6.0f} MB/s  HEAD {row['head_ms']:.2f} ms")
    for key, value in result["hozon"].items():
        print(f"{key:24} {value:8.1f}")
    out = ROOT / "bench" / "results" / f"targets-{result['when'][:19].replace(':', '')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
