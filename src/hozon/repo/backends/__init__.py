"""Storage backends, chosen by the repository location's scheme (a plain path is a local directory).

``SCHEMES`` is the registry: scheme → the class that serves it, as ``module:Class`` so a backend's
client library (httpx, boto3) is imported only when a location names it. The class's
``from_location(location)`` receives the whole location string.
"""

from __future__ import annotations

import importlib

from hozon.errors import UsageError
from hozon.repo.backends.base import Backend, Entry
from hozon.repo.backends.local import LocalBackend

SCHEMES: dict[str, str] = {
    "local": "hozon.repo.backends.local:LocalBackend",
    "file": "hozon.repo.backends.local:LocalBackend",
    "hozon+https": "hozon.repo.backends.remote:RemoteBackend",
    "s3": "hozon.repo.backends.s3:S3Backend",
}
FORMS = "a directory path, local:PATH, hozon+https://HOST:PORT/NAMESPACE or s3:https://HOST[:PORT]/BUCKET[/PREFIX]"


def open_backend(location: str) -> Backend:
    scheme, sep, _rest = location.partition(":")
    if not sep or len(scheme) == 1 or "/" in scheme:  # a path (C:\\ included), not a scheme
        return LocalBackend(location)
    if scheme not in SCHEMES:
        raise UsageError(f"unknown repository scheme {scheme!r}; supported: {FORMS}")
    module, _, name = SCHEMES[scheme].partition(":")
    backend: Backend = getattr(importlib.import_module(module), name).from_location(location)
    return backend


__all__ = ["SCHEMES", "Backend", "Entry", "LocalBackend", "open_backend"]
