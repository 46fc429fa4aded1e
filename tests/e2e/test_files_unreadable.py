"""Files a backup cannot read: a warning naming each, exit code 3, and the snapshot of the rest is kept.

Root reads everything a mode allows it to, so ``hozon`` runs as user nobody here (through
``setpriv``) on a tree where one file and one directory have mode 000; and as root on a tree holding
a write-only kernel file (bind-mounted from /proc/sys), which even root cannot read.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Hozon

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
PASSWORD = "nobody's password"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to user nobody")


def _probe(python: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, python, "-c", "import hozon"], capture_output=True, text=True, timeout=60,
                          env=env)


@contextmanager
def python_for_nobody(scratch: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A path of this interpreter that user nobody can execute, and the environment to import Hozon.

    Normally that is ``sys.executable`` as it is. A developer's interpreter may live below a private
    home (pyenv under /root, mode 0700); then the same installation is shown to nobody through a
    read-only bind mount of its prefix, with this process's import path mapped onto it.
    """
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if _probe(sys.executable, env).returncode == 0:
        yield sys.executable, env
        return
    if sys.prefix != sys.base_prefix:
        pytest.skip(f"{sys.executable} (a virtualenv) cannot be run by user nobody; put the checkout where "
                    "nobody can read it")
    mnt = scratch / "python"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", sys.base_prefix, str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"{sys.executable} is not reachable by user nobody, and a bind mount of its prefix failed: "
                    f"{mounted.stderr.strip()}")
    try:
        python = str(mnt / Path(sys.executable).relative_to(sys.base_prefix))
        paths = [str(mnt / Path(p).relative_to(sys.base_prefix)) if p.startswith(sys.base_prefix + "/") else p
                 for p in sys.path if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        probe = _probe(python, env)
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot import hozon with {sys.executable}: {probe.stderr.strip()[-300:]}")
        yield python, env
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory user nobody owns (pytest's tmp_path lies below a root-only directory)."""
    path = Path(tempfile.mkdtemp(prefix="hozon-nobody-"))
    os.chown(path, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_unreadable_entries_give_warnings_and_exit_3(scratch: Path) -> None:
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    src = scratch / "src"
    (src / "sub").mkdir(parents=True)
    (src / "readable.txt").write_bytes(b"anyone may read this")
    (src / "sub" / "also_readable").write_bytes(b"and this")
    (src / "secret.key").write_bytes(b"nobody may read this")
    (src / "locked_dir").mkdir()
    (src / "locked_dir" / "inside").write_bytes(b"hidden")
    for dirpath, dirs, files in os.walk(src):
        for name in [".", *dirs, *files]:
            os.chown(Path(dirpath) / name, nobody, nogroup)
    os.chmod(src / "secret.key", 0o000)
    os.chmod(src / "locked_dir", 0o000)

    with python_for_nobody(scratch) as (python, python_env):
        env = {**python_env, "HOZON_REPO": str(scratch / "repo"), "HOZON_PASSWORD": PASSWORD, "HOME": str(scratch),
               "HOZON_CONFIG_DIR": str(scratch / "config")}
        env.pop("HOZON_PASSWORD_FILE", None)

        def hozon(*args: str) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run([*AS_NOBODY, python, "-m", "hozon", *args], capture_output=True, text=True,
                                  env=env, stdin=subprocess.DEVNULL, timeout=120)
            assert "Traceback" not in proc.stderr, proc.stderr
            return proc

        assert hozon("init").returncode == 0
        run = hozon("backup", str(src))
        assert run.returncode == 3, run.stdout + run.stderr
        warnings = [line for line in run.stderr.splitlines() if "warning" in line]
        assert any(str(src / "secret.key") in w and "ermission denied" in w for w in warnings), run.stderr
        assert any(str(src / "locked_dir") in w for w in warnings), run.stderr
        assert "snapshot" in run.stdout and "saved" in run.stdout

        run = hozon("snapshots", "--json")
        assert run.returncode == 0
        [snap] = json.loads(run.stdout)
        assert snap["summary"]["warnings"] == 2

        run = hozon("ls", "latest", str(src), "--json")
        assert run.returncode == 0
        paths = {entry["path"] for entry in json.loads(run.stdout)}
        assert {str(src / "readable.txt"), str(src / "sub" / "also_readable")} <= paths
        # An unreadable file is left out: kept without content it would restore as an empty file.
        assert str(src / "secret.key") not in paths

        run = hozon("backup", "--json", str(src))
        assert run.returncode == 3
        result = json.loads(run.stdout)
        assert len(result["warnings"]) == 2
        assert result["snapshot"]["parent"] == snap["id"]


def test_a_file_even_root_cannot_read(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "readable.txt").write_bytes(b"root reads this")
    unreadable = src / "drop_caches"
    unreadable.write_bytes(b"")
    mounted = subprocess.run(["mount", "--bind", "/proc/sys/vm/drop_caches", str(unreadable)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount a /proc/sys file here: {mounted.stderr.strip()}")
    try:
        with pytest.raises(PermissionError):
            unreadable.read_bytes()
        run = hozon("backup", str(src), check=False)
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == 3, run.stdout + run.stderr
        assert f"warning: {unreadable}: Permission denied" in run.stderr.splitlines()
        assert "saved" in run.stdout

        run = hozon("ls", "latest", str(src), "--json")
        paths = {entry["path"] for entry in json.loads(run.stdout)}
        assert str(src / "readable.txt") in paths and str(unreadable) not in paths
    finally:
        subprocess.run(["umount", str(unreadable)], check=True)
