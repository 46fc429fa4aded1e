"""The typed errors a Hozon user can meet.

Every error a user is expected to see is a ``HozonError``: it carries a one-sentence message, an
optional hint, and the process exit code that ``hozon.cli`` maps it to (docs/exit-codes.md lists them;
a test keeps that table honest). Anything else that escapes is a bug and is shown as one.

    HozonError                      exit 1
    ├── UsageError                  exit 2   a command line that cannot work
    ├── RepositoryNotFound          exit 10
    ├── RepositoryExists            exit 1
    ├── RepositoryLocked            exit 11
    ├── LockLost                    exit 1   the command's lock went stale or was removed: it saved nothing
    ├── LockNotRemoved              exit 3   the work is done, but its lock could not be removed
    ├── WrongPassword               exit 12
    ├── UntrustedRepository         exit 13  not the repository this client knows at that location
    ├── SnapshotNotFound            exit 1
    ├── CorruptData                 exit 1   a repository file fails its checks
    ├── RepositoryFull              exit 1   the repository's disk is full
    ├── BackendError                exit 1   the storage failed in another way
    │   ├── ObjectNotFound          exit 1   the storage has no object under that key
    │   └── RepositoryReadOnly      exit 1   the repository cannot be written (read-only mount, permissions)
    ├── Interrupted                 exit 130 Ctrl-C (SIGINT) before the command committed anything
    ├── RestoreOutsideTarget        exit 1   a stored name tries to escape the restore target
    ├── NbdError                    exit 1   an NBD server misbehaved, refused or failed a request
    ├── QmpError                    exit 1   QEMU's monitor (QMP) could not be reached, misbehaved or went away
    │   └── QmpCommandError         exit 1   QEMU ran a QMP command and reported an error
    ├── GuestAgentError             exit 1   the guest agent could not be reached, was silent or misbehaved
    │   └── GuestAgentCommandError  exit 1   the guest agent ran a command and reported an error
    └── ServerError                 exit 1   the backup server refused a request, could not find what it
                                             names, or could not be reached
"""

from __future__ import annotations


class HozonError(Exception):
    """Root of every expected failure; ``str()`` is the one sentence shown to the user."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(HozonError):
    exit_code = 2


class RepositoryNotFound(HozonError):
    exit_code = 10

    def __init__(self, location: str) -> None:
        super().__init__(
            f"no Hozon repository at {location}",
            hint="check --repo / HOZON_REPO, or create one with: hozon init",
        )


class RepositoryExists(HozonError):
    def __init__(self, location: str) -> None:
        super().__init__(f"a repository already exists at {location}")


class RepositoryLocked(HozonError):
    exit_code = 11

    def __init__(self, holder: str) -> None:
        super().__init__(
            f"repository is locked by {holder}",
            hint="if that process is gone, remove its lock with: hozon unlock",
        )


class LockLost(HozonError):
    """The lock was not refreshed in time or its file vanished: a prune may have deleted data we use."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the repository lock was lost ({reason}); no snapshot was saved",
            hint="the data stored so far is reused by the next run; check that the repository's locks/ "
                 "can be written and that nobody runs: hozon unlock --remove-all",
        )


class LockNotRemoved(HozonError):
    """Finished, but its lock file stays: others see it until it goes stale."""

    exit_code = 3

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"the work is done, but the repository lock locks/{name} could not be removed ({reason})",
            hint="it counts as stale after 30 minutes, or remove it now with: hozon unlock",
        )


class WrongPassword(HozonError):
    exit_code = 12

    def __init__(self) -> None:
        super().__init__(
            "wrong password: no key of this repository opens with it",
            hint="if the password is right, a key file under keys/ may be damaged: hozon list keys",
        )


class UntrustedRepository(HozonError):
    """The repository at a location is not what this client knew there (replaced, or downgraded)."""

    exit_code = 13


class SnapshotNotFound(HozonError):
    def __init__(self, ref: str) -> None:
        super().__init__(f"no snapshot matches {ref!r}", hint="list them with: hozon snapshots")


class CorruptData(HozonError):
    """A repository file is truncated, altered or unreadable; ``path`` names it."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"repository file {path} is damaged: {what}", hint="run: hozon check --read-data")
        self.path = path


class RepositoryFull(HozonError):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"no space left on the repository's disk while writing {path}; nothing was committed",
            hint="free space, then run the backup again: chunks already stored are reused",
        )


class BackendError(HozonError):
    pass


class ObjectNotFound(BackendError):
    """Every backend's answer to reading a key it does not hold; ``key`` names it."""

    def __init__(self, location: str, key: str) -> None:
        super().__init__(f"{location}: {key} does not exist")
        self.key = key


class RepositoryReadOnly(BackendError):
    """Reading commands then go on without a lock; writing ones stop."""


class Interrupted(HozonError):
    exit_code = 130


class RestoreOutsideTarget(HozonError):
    def __init__(self, name: str) -> None:
        super().__init__(f"refusing to restore {name!r}: it would be written outside the target")


class NbdError(HozonError):
    """An NBD server misbehaved, refused a request, failed one, or could not be reached."""


class QmpError(HozonError):
    """QEMU's monitor (QMP) could not be reached, did not answer in time, misbehaved, or went away."""


class QmpCommandError(QmpError):
    """QEMU ran a QMP command and answered with an error; ``error_class`` and ``desc`` are QEMU's words."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP command {command} failed with {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class GuestAgentError(HozonError):
    """The guest agent (qemu-ga) could not be reached, did not answer in time, or misbehaved."""


class GuestAgentCommandError(GuestAgentError):
    """The guest agent ran a command and answered with an error; ``error_class`` and ``desc`` are its words."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"guest agent command {command} failed with {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class ServerError(HozonError):
    """The backup server refused a request, has no such job or run, or could not be reached.

    ``status`` is the HTTP status the server answered with (the API maps this error to it), 0 when
    no answer came."""

    def __init__(self, message: str, status: int = 0, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
