"""hozon vm …: image-level backups of whole VMs from the hypervisor host."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from hozon.backup.image import (
    BackupMode,
    ImageBackupOptions,
    ImageBackupResult,
    ProgressCallback,
    backup_images,
    backup_vm,
)
from hozon.cli.common import (
    CompressionOption,
    IoniceOption,
    JsonOption,
    NiceOption,
    QuietOption,
    RepoOption,
    RetryLockOption,
    WorkersOption,
    compression_level,
    console,
    err_console,
    human_bytes,
    interactive,
    local_time,
    locked_repo,
    lower_priority,
    open_repo,
    print_json,
    saving_snapshot,
)
from hozon.cli.status import JsonStatus
from hozon.errors import HozonError, UsageError
from hozon.repo.imagemap import image_disks
from hozon.repo.locks import SHARED
from hozon.restore.image import DiskRestore, restore_image
from hozon.sources.libvirt import LibvirtSource, RestoredDisk, check_name_free, define_copy, saved_definition

vm_app = typer.Typer(help="Back up and restore whole VMs (image level).", no_args_is_help=True)


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),  # KiB
                    TimeRemainingColumn(), console=err_console, transient=True)


QmpOption = typer.Option(None, "--qmp", metavar="SOCKET",
                         help="QEMU's QMP unix socket (give QEMU a second -qmp for Hozon).")
LibvirtOption = typer.Option(None, "--libvirt", metavar="DOMAIN", help="A running libvirt domain (name, id or UUID).")
ConnectOption = typer.Option(None, "--connect", metavar="URI", help="libvirt URI for --libvirt (default: virsh's).")
VmNameOption = typer.Option(None, "--name", metavar="NAME",
                            help="How the VM is called in the repository (default: QEMU's -name).")


@vm_app.command("backup")
def vm_backup(
    qmp: str = QmpOption,
    image: list[str] = typer.Option([], "--image", metavar="FILE",
                                    help="Disk image of a shut-off VM (repeatable; needs --name)."),
    libvirt: str = LibvirtOption,
    connect: str = ConnectOption,
    name: str = VmNameOption,
    mode: BackupMode = typer.Option("auto", "--mode", metavar="MODE",
                                  help="auto (incremental when the chain allows), full or incremental. Default: auto."),
    vm_config: str = typer.Option(None, "--vm-config", metavar="FILE",
                                  help="File with the VM's QEMU command line, kept with it."),
    tag: list[str] = typer.Option([], "--tag", metavar="TAG", help="Tag the snapshot (repeatable)."),
    scratch: str = typer.Option(None, "--scratch", metavar="DIR",
                                help="Directory for QEMU's point-in-time scratch images."),
    freeze: bool = typer.Option(False, "--freeze",
                                help="Freeze the guest's file systems for the instant through the guest agent "
                                     "(application-consistent). With --libvirt: through libvirt's agent channel. "
                                     "With --qmp: needs --guest-agent SOCKET."),
    guest_agent: str = typer.Option(None, "--guest-agent", metavar="SOCKET",
                                    help="With --qmp: the guest agent's unix socket (QEMU -chardev socket,…); implies "
                                         "--freeze. Not for --libvirt, whose agent channel libvirt keeps."),
    compression: str = CompressionOption,
    workers: int = WorkersOption,
    nice: int | None = NiceOption,
    ionice: str | None = IoniceOption,
    quiet: bool = QuietOption,
    repo: str | None = RepoOption,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON; progress as JSON lines on stderr."),
    retry_lock: str = RetryLockOption,
) -> None:
    """Back up every disk of a running VM at one instant; incremental through dirty bitmaps.

    Without --freeze the backup is crash-consistent: the disks as a power cut would leave them.
    With --freeze the guest agent (qemu-ga) flushes and freezes the guest's file systems for that
    instant and thaws them right after (application-consistent): --libvirt DOMAIN --freeze uses
    the domain's channel org.qemu.guest_agent.0; --qmp SOCKET --guest-agent AGENT_SOCKET uses the
    agent's socket. A guest that cannot be frozen (no agent, no answer within 10 s) is backed up
    crash-consistent with a note; the snapshot's extra.consistency says which it is. A thaw that is
    not confirmed is retried once, then reported as a WARNING note.
    """
    if [bool(qmp), bool(image), bool(libvirt)].count(True) != 1:
        raise UsageError("say which VM to back up: a running one or the images of a shut-off one",
                         hint="hozon vm backup --qmp SOCKET, --libvirt DOMAIN, or --image FILE … --name NAME")
    if connect and not libvirt:
        raise UsageError("--connect is for --libvirt DOMAIN")
    if (guest_agent or freeze) and image:
        raise UsageError(f"{'--guest-agent' if guest_agent else '--freeze'} is for a running VM; the images of a "
                         "shut-off one need no freeze")
    if guest_agent and libvirt:
        raise UsageError("--guest-agent SOCKET is for --qmp; libvirt keeps the agent's channel of a domain itself",
                         hint="hozon vm backup --libvirt DOMAIN --freeze")
    if freeze and qmp and not guest_agent:
        raise UsageError("--freeze with --qmp needs the guest agent's socket",
                         hint="add --guest-agent SOCKET (QEMU: -chardev socket,id=qga0,path=SOCKET,server=on,wait=off "
                              "-device virtio-serial-pci -device virtserialport,chardev=qga0,"
                              "name=org.qemu.guest_agent.0)")
    lower_priority(nice, ionice)  # before any thread starts (and qemu-nbd, which inherits them)
    options = ImageBackupOptions(qmp=qmp or "", name=name, mode=mode, vm_config=vm_config, tags=tag,
                                 scratch_dir=scratch, source=LibvirtSource(libvirt, connect) if libvirt else None,
                                 guest_agent=guest_agent, freeze=freeze or bool(guest_agent),
                                 compression=compression_level(compression), workers=workers or None)
    with locked_repo(repo, SHARED, "vm backup", retry_lock=retry_lock) as repository:
        with saving_snapshot("the VM backup"):
            result = run_image_backup(lambda progress: backup_images(repository, image, options, progress) if image
                                      else backup_vm(repository, options, progress), "reading disks",
                                      json_out, quiet)
        render_image_backup(result, json_out, quiet)  # before the lock goes: its id is out even if the removal fails


def run_image_backup(run: Callable[[ProgressCallback | None], ImageBackupResult], what: str,
                     json_out: bool, quiet: bool = False) -> ImageBackupResult:
    """Run an image backup, with a progress bar on a terminal, or JSON status lines on stderr."""
    if json_out:
        status = JsonStatus("vm backup")
        return run(lambda done, total: status.status(files_done=0, total_files=0, bytes_done=done,
                                                     total_bytes=total, current=[]))
    if interactive() and not quiet:
        with _bar() as bar:
            task = bar.add_task(what, total=None)
            return run(lambda done, total: bar.update(task, completed=done, total=total))
    return run(None)


def render_image_backup(result: ImageBackupResult, json_out: bool, quiet: bool = False) -> None:
    snap = result.snapshot
    if json_out:
        print_json({"snapshot": snap.listing(), "notes": result.notes})
        return
    for note in result.notes:  # shown under --quiet too: they say why a backup read more, or what is left
        err_console.print(f"note: {note}", markup=False, soft_wrap=True)
    if quiet:
        return
    for d in image_disks(snap.extra):
        console.print(f"disk {d['name']}: {d['mode']}, {human_bytes(d['bytes_read'])} read of "
                      f"{human_bytes(d['size'])} ({human_bytes(d['zero_bytes'])} zero, not stored)", markup=False)
    s = snap.summary
    paused = f"; VM I/O paused {s['pause_ms']} ms" if snap.extra.get("source") != "image" else ""
    if "frozen_ms" in s:  # --freeze
        paused += (f"; guest file systems frozen {s['frozen_ms']} ms" if snap.extra["consistency"] == "application"
                   else "; crash-consistent (not frozen)")
    if snap.kind == "checkpoint":
        paused = f"; VM paused {s['pause_ms']} ms"
        console.print(f"state: {human_bytes(s['state_bytes'])} of CPU, memory and device state", markup=False)
    console.print(f"added to the repository: {human_bytes(s['data_added'])} ({human_bytes(s['data_added_stored'])} "
                  f"stored) in {s['duration_s']:.1f} s{paused}", markup=False)
    console.print(f"{'checkpoint' if snap.kind == 'checkpoint' else 'snapshot'} {snap.short_id} of VM "
                  f"{snap.extra['vm']} saved", markup=False)


@vm_app.command("restore")
def vm_restore(
    snapshot: str = typer.Argument(..., metavar="SNAPSHOT", help="Snapshot id, prefix, or 'latest:VM'."),
    to: str = typer.Option(..., "--to", metavar="PATH",
                           help="Directory (one image per disk) or, with --disk, a file or device."),
    disk: str = typer.Option(None, "--disk", metavar="DISK", help="Restore only this disk."),
    fmt: str = typer.Option(None, "--format", metavar="FORMAT", help="qcow2 (default in a directory) or raw."),
    libvirt_define: str = typer.Option(None, "--libvirt-define", metavar="NAME",
                                       help="Define the restored VM in libvirt under this name (new UUID and MACs)."),
    connect: str = typer.Option(None, "--connect", metavar="URI",
                                help="libvirt URI for --libvirt-define (default: virsh's)."),
    overwrite: str = typer.Option(None, "--overwrite", metavar="WHEN",
                                  help="An image already there (refused by default): always (replace it), if-newer "
                                       "(replace it if older than the snapshot), never (leave it, skip the disk)."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Write nothing; say what would be done."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary."),
    repo: str | None = RepoOption,
    retry_lock: str = RetryLockOption,
) -> None:
    """Restore a VM snapshot's disks as thin images; any snapshot restores on its own."""
    if fmt not in (None, "qcow2", "raw"):
        raise UsageError(f"unknown image format {fmt!r}; use qcow2 or raw")
    if libvirt_define and disk:
        raise UsageError("--libvirt-define defines the whole VM; it cannot go with --disk")
    if connect and not libvirt_define:
        raise UsageError("--connect is for --libvirt-define NAME")
    if libvirt_define and dry_run:
        raise UsageError("--libvirt-define defines a domain; it cannot go with --dry-run")
    with locked_repo(repo, SHARED, "vm restore", retry_lock=retry_lock) as repository:
        snap = repository.resolve_snapshot(snapshot)
        if snap.tree is not None:
            raise HozonError(f"snapshot {snap.short_id} is a file snapshot", hint="use: hozon restore")
        domain_xml = saved_definition(snap.extra, snap.short_id) if libvirt_define else ""
        if libvirt_define:
            check_name_free(libvirt_define, connect)
        if interactive() and not json_out and not dry_run:
            with _bar() as bar:
                task = bar.add_task("restoring", total=None)
                disks = restore_image(repository, snap, to, disk, fmt,
                                      lambda done, total: bar.update(task, completed=done, total=total),
                                      overwrite, dry_run)
        else:
            disks = restore_image(repository, snap, to, disk, fmt, None, overwrite, dry_run)
    if json_out:
        print_json({"snapshot": snap.id, "vm": snap.extra.get("vm"), "to": to, "dry_run": dry_run,
                    "disks": [vars(d) for d in disks], "bytes": sum(d.bytes_written for d in disks),
                    "overwritten": sum(d.action == "replaced" for d in disks),
                    "skipped": sum(d.action == "skipped" for d in disks), "warnings": []})
    else:
        _render_image_restore(disks, dry_run, overwrite)
        console.print(f"{'would restore' if dry_run else 'restored'} snapshot {snap.short_id} of VM "
                      f"{snap.extra.get('vm')}", markup=False)
    if libvirt_define:
        defined = define_copy(domain_xml, libvirt_define, [RestoredDisk(d.name, d.path, d.format) for d in disks],
                              connect)
        for note in defined.notes:
            err_console.print(f"note: {note}", markup=False, soft_wrap=True)
        console.print(f"defined libvirt domain {defined.name} (UUID {defined.uuid}) on the restored images",
                      markup=False)


def _render_image_restore(disks: list[DiskRestore], dry_run: bool, overwrite: str | None) -> None:
    for d in disks:
        if d.action == "skipped":
            console.print(f"disk {d.name}: {d.path} is there; left as it is (--overwrite {overwrite})", markup=False)
        elif dry_run:
            verb = "would replace" if d.action == "replaced" else "would write"
            console.print(f"disk {d.name}: {verb} {d.path} ({d.format}, {human_bytes(d.size)})", markup=False)
        else:
            zeros = "zeros written" if d.path.startswith("/dev/") else "left unallocated"
            verb = " (replaced)" if d.action == "replaced" else ""
            console.print(f"disk {d.name} → {d.path}{verb} ({d.format}, {human_bytes(d.size)}, "
                          f"{human_bytes(d.bytes_written)} written, {human_bytes(d.zero_bytes)} {zeros})",
                          markup=False)


@vm_app.command("ls")
def vm_ls(repo: str | None = RepoOption, json_out: bool = JsonOption) -> None:
    """List the VMs in the repository and their image snapshots."""
    repository = open_repo(repo, load_index=False)
    snaps, _damaged = repository.readable_snapshots()
    vms: dict[str, list[dict[str, Any]]] = {}
    for s in snaps:
        if s.tree is None and s.extra.get("vm"):
            disks = image_disks(s.extra)
            vms.setdefault(str(s.extra["vm"]), []).append({
                "id": s.id, "short_id": s.short_id, "time": s.time, "kind": s.kind,
                "disks": [{"name": d.get("name"), "size": d.get("size"), "mode": d.get("mode"),
                           "bytes_read": d.get("bytes_read")} for d in disks],
            })
    if json_out:
        print_json(vms)
        return
    if not vms:
        console.print("no VM snapshots")
    for vm, entries in sorted(vms.items()):
        table = Table(title=f"VM {vm}", box=None, header_style="bold", title_justify="left")
        for col in ("ID", "Time", "Kind", "Disks", "Read"):
            table.add_column(col)
        for e in entries:
            disks = e["disks"]
            when = local_time(str(e["time"]))
            names = ", ".join(f"{d['name']} {human_bytes(d['size'] or 0)} ({d['mode']})" for d in disks)
            read = human_bytes(sum(d["bytes_read"] or 0 for d in disks))
            table.add_row(str(e["short_id"]), when, str(e["kind"]), names, read)
        console.print(table)
