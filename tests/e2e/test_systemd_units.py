"""The shipped systemd units run what they say: a nightly file backup with retention (the VM unit is
run against a real libvirt domain in test_vm_libvirt.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.systemd_units import UNITS, read_env_file, run_unit


def test_the_file_backup_unit_backs_up_and_keeps_what_its_policy_says(tmp_path: Path) -> None:
    repo, password = tmp_path / "repo", tmp_path / "password"
    password.write_text("unit test password\n")
    src = tmp_path / "etc-like"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "a.conf").write_text("a")
    (src / "cache.tmp").write_text("skip me")
    excludes = tmp_path / "excludes"
    excludes.write_text("*.tmp\n")
    env = read_env_file(UNITS / "hozon.env.example")
    assert {"HOZON_REPO", "HOZON_PASSWORD_FILE", "HOZON_BACKUP_PATHS", "HOZON_KEEP"} <= set(env)
    env.update(HOZON_REPO=str(repo), HOZON_PASSWORD_FILE=str(password), HOZON_BACKUP_PATHS=str(src),
               HOZON_BACKUP_OPTIONS=f"--one-file-system --exclude-file {excludes}", HOZON_KEEP="--keep-last 2")
    init = subprocess.run([sys.executable, "-m", "hozon", "init"], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)
    assert init.returncode == 0, init.stderr

    for night in range(3):
        (src / "keep" / "a.conf").write_text(f"night {night}")
        runs = run_unit("hozon-backup.service", env)
        assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    listed = subprocess.run([sys.executable, "-m", "hozon", "snapshots", "--json"], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    snaps = json.loads(listed.stdout)
    assert len(snaps) == 2 and all(s["tags"] == ["systemd"] for s in snaps)  # the policy kept the last two
    restored = tmp_path / "restored"
    subprocess.run([sys.executable, "-m", "hozon", "restore", "latest", "--target", str(restored)],
                   env={**os.environ, **env}, check=True, capture_output=True, timeout=120)
    copy = restored / str(src).lstrip("/")
    assert (copy / "keep" / "a.conf").read_text() == "night 2" and not (copy / "cache.tmp").exists()


def test_the_timers_name_their_services_and_catch_up() -> None:
    for timer in ("hozon-backup.timer", "hozon-vm-backup@.timer"):
        text = (UNITS / timer).read_text()
        assert "OnCalendar=" in text and "Persistent=true" in text and "WantedBy=timers.target" in text
        assert (UNITS / timer.replace(".timer", ".service")).exists()
