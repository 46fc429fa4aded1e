"""Storage backends, chosen by the repository location's scheme (a plain path is a local directory)."""

from __future__ import annotations

from hozon.errors import UsageError
from hozon.repo.backends.base import Backend
from hozon.repo.backends.local import LocalBackend


def open_backend(location: str) -> Backend:
    scheme, sep, rest = location.partition(":")
    if sep and scheme in {"local", "file"}:
        return LocalBackend(rest)
    if sep and len(scheme) > 1 and "/" not in scheme:
        raise UsageError(f"unknown repository scheme {scheme!r}; supported: a directory path or local:PATH")
    return LocalBackend(location)


__all__ = ["Backend", "LocalBackend", "open_backend"]
