"""Storage backends, chosen by the repository location's scheme (a plain path is a local directory)."""

from __future__ import annotations

from hozon.errors import UsageError
from hozon.repo.backends.base import Backend
from hozon.repo.backends.local import LocalBackend


def open_backend(location: str) -> Backend:
    scheme, sep, rest = location.partition(":")
    if scheme == "hozon+https" and sep:
        from hozon.repo.backends.remote import RemoteBackend  # httpx is loaded only for server repositories

        return RemoteBackend(location)
    if sep and scheme in {"local", "file"}:
        return LocalBackend(rest)
    if sep and len(scheme) > 1 and "/" not in scheme:
        raise UsageError(f"unknown repository scheme {scheme!r}; supported: a directory path, local:PATH or hozon+https://HOST:PORT/NAMESPACE")
    return LocalBackend(location)


__all__ = ["Backend", "LocalBackend", "open_backend"]
