"""hozon vm checkpoint …, hozon vm memory: a VM's disks and running state at one instant."""

from __future__ import annotations

import shlex

import typer

from hozon.backup.image import BackupMode, ImageBackupOptions, backup_vm
from hozon.cli.common import (
    RepoOption,
    RetryLockOption,
    console,
    err_console,
    human_bytes,
    locked_repo,
    saving_snapshot,
)
from hozon.cli.vm_cmd import (
    ConnectOption,
    LibvirtOption,
    QmpOption,
    VmNameOption,
    render_image_backup,
    run_image_backup,
)
from hozon.errors import UsageError
from hozon.repo.locks import SHARED
from hozon.restore.checkpoint import restore_checkpoint
from hozon.restore.memory import export_memory
from hozon.sources.libvirt import LibvirtSource

checkpoint_app = typer.Typer(help="Checkpoints: a VM's disks and its CPU, memory and device state at one instant.")


@checkpoint_app.callback(invoke_without_command=True)
def vm_checkpoint(
    ctx: typer.Context,
    qmp: str = QmpOption,
    libvirt: str = LibvirtOption,
    connect: str = ConnectOption,
    name: str = VmNameOption,
    mode: BackupMode = typer.Option("auto", "--mode", metavar="MODE",
                                    help="Disks: auto (incremental when the chain allows), full, "
                                                     "incremental."),
    vm_config: str = typer.Option(None, "--vm-config", metavar="FILE",
                                  help="File with the VM's QEMU command line (one shell-quoted line): what "
                                       "restore --start and memory run."),
    tag: list[str] = typer.Option([], "--tag", metavar="TAG", help="Tag the checkpoint (repeatable)."),
    scratch: str = typer.Option(None, "--scratch", metavar="DIR",
                                help="Directory for QEMU's point-in-time scratch images."),
    repo: str | None = RepoOption,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    retry_lock: str = RetryLockOption,
) -> None:
    """Take a checkpoint of a running VM: every disk and the VM's state at one instant; the VM keeps running.

    The guest is paused only while the instant is fixed (milliseconds); its memory then streams
    into the repository while it runs on. Subcommands: restore.
    """
    if ctx.invoked_subcommand is not None:
        return
    if bool(qmp) == bool(libvirt):
        raise UsageError("say which VM to checkpoint", hint="hozon vm checkpoint --qmp SOCKET or --libvirt DOMAIN")
    if connect and not libvirt:
        raise UsageError("--connect is for --libvirt DOMAIN")
    options = ImageBackupOptions(qmp=qmp or "", name=name, mode=mode, vm_config=vm_config, tags=tag,
                                 scratch_dir=scratch, source=LibvirtSource(libvirt, connect) if libvirt else None,
                                 checkpoint=True)
    with locked_repo(repo, SHARED, "vm checkpoint", retry_lock=retry_lock) as repository:
        with saving_snapshot("the checkpoint"):
            result = run_image_backup(lambda progress: backup_vm(repository, options, progress),
                                      "saving state and disks", json_out)
        render_image_backup(result, json_out)  # before the lock goes: its id is out even if the removal fails


@checkpoint_app.command("restore")
def checkpoint_restore(
    snapshot: str = typer.Argument(..., metavar="SNAPSHOT", help="Checkpoint id, prefix, or 'latest:VM'."),
    to: str = typer.Option(..., "--to", metavar="DIR", help="Directory for the disks (thin) and the state."),
    start: bool = typer.Option(False, "--start", help="Resume the VM right away (its saved command line, or "
                                                      "virsh restore for a libvirt checkpoint)."),
    paused: bool = typer.Option(False, "--paused", help="With --start: load the state but keep the VM paused."),
    copy_name: str = typer.Option(None, "--as", metavar="NAME",
                                  help="libvirt checkpoints: resume a copy called NAME beside the "
                                                     "original (new UUID, network links down)."),
    connect: str = typer.Option(None, "--connect", metavar="URI",
                                help="libvirt checkpoints: the libvirt URI to resume in "
                                                        "(default: the one the checkpoint was taken from)."),
    repo: str | None = RepoOption,
    retry_lock: str = RetryLockOption,
) -> None:
    """Restore a checkpoint's disks and state; print (or, with --start, run) the command that resumes the VM.

    A checkpoint of a libvirt domain resumes through libvirt (virsh restore): as the domain
    itself, which must be stopped or undefined, or with --as NAME as a copy beside it.
    """
    if paused and not start:
        raise UsageError("--paused goes with --start")
    with locked_repo(repo, SHARED, "vm checkpoint restore", retry_lock=retry_lock) as repository:
        snap = repository.resolve_snapshot(snapshot)
        restored = restore_checkpoint(repository, snap, to, start, paused, copy_name=copy_name, uri=connect)
    for note in restored.notes:
        err_console.print(f"note: {note}", markup=False, soft_wrap=True)
    for d in restored.disks:
        console.print(f"disk {d.name} → {d.path} ({d.format}, {human_bytes(d.size)}, "
                      f"{human_bytes(d.bytes_written)} written)", markup=False)
    console.print(f"state → {restored.state_path}", markup=False)
    if restored.domain is not None:
        how = "paused (virsh resume to run it)" if restored.status == "paused" else restored.status
        console.print(f"VM {snap.extra.get('vm')} resumed from checkpoint {snap.short_id} as libvirt domain "
                      f"{restored.domain}: {how}", markup=False)
    elif restored.pid is not None:
        how = "paused (send 'cont' on its monitor to run it)" if restored.status == "paused" else restored.status
        console.print(f"VM {snap.extra.get('vm')} resumed from checkpoint {snap.short_id}: QEMU pid {restored.pid}, "
                      f"{how}", markup=False)
    elif restored.command is not None:
        console.print("resume the VM with:", markup=False)
        console.print(shlex.join(restored.command), markup=False, soft_wrap=True)
    else:
        console.print("the checkpoint kept no QEMU command line: start the VM's QEMU with "
                      f"-incoming \"exec:cat {restored.state_path}\" and its disks on the restored images",
                      markup=False, soft_wrap=True)


def vm_memory(
    snapshot: str = typer.Argument(..., metavar="SNAPSHOT", help="Checkpoint id, prefix, or 'latest:VM'."),
    to: str = typer.Option(..., "--to", metavar="FILE", help="The ELF core file to write."),
    connect: str = typer.Option(None, "--connect", metavar="URI",
                                help="libvirt checkpoints: the libvirt URI that loads the "
                                                        "state (default: the one the checkpoint was taken from)."),
    repo: str | None = RepoOption,
    retry_lock: str = RetryLockOption,
) -> None:
    """Export a checkpoint's guest physical memory as an ELF core file (for memory forensics)."""
    with locked_repo(repo, SHARED, "vm memory", retry_lock=retry_lock) as repository:
        snap = repository.resolve_snapshot(snapshot)
        size = export_memory(repository, snap, to, uri=connect)
    console.print(f"guest memory of checkpoint {snap.short_id} → {to} (ELF core, {human_bytes(size)})", markup=False)
