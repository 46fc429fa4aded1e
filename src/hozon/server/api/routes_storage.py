"""The repository as a storage backend over HTTPS: put, get (ranges), exists, list, delete.

What ``hozon+https://HOST:PORT/NS`` speaks (``repo/backends/remote.py``). Request bodies stream to a
private temporary file in bounded pieces, are fsynced, then linked under their name (write-once),
so a connection or a server dying mid-upload leaves no file under the key. The rules of
``server.storage`` are checked before anything is read or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from hozon.errors import ServerError
from hozon.repo.backends.local import LocalBackend
from hozon.server.api.deps import Principal, context, principal
from hozon.server.paths import NAMESPACE_RE
from hozon.server.storage import (
    Upload,
    check_key,
    check_list_prefix,
    may_delete,
    may_write,
    namespace_backend,
)

router = APIRouter(prefix="/api/v1/repo", tags=["storage"])

WRITE_PIECE = 1 << 20  # bytes gathered before one write to the temporary file
READ_PIECE = 1 << 20


def _backend(request: Request, namespace: str, who: Principal) -> LocalBackend:
    who.require_namespace(namespace)
    if not NAMESPACE_RE.fullmatch(namespace):
        raise ServerError(f"namespace {namespace} has no repository", 404)
    return namespace_backend(context(request).server_dir, namespace)


@router.put("/{namespace}/objects/{key:path}", status_code=201)
async def put_object(namespace: str, key: str, request: Request, who: Principal = Depends(principal)) -> Response:
    """Store a new file (201); the same content again is a harmless retry (200); other content is 409."""
    backend = _backend(request, namespace, who)
    may_write(check_key(key), who.is_admin)
    length = request.headers.get("content-length")
    upload = await run_in_threadpool(Upload.start, backend, key)
    try:
        piece = bytearray()
        async for chunk in request.stream():
            piece += chunk
            if len(piece) >= WRITE_PIECE:
                await run_in_threadpool(upload.write, bytes(piece))
                piece.clear()
        if piece:
            await run_in_threadpool(upload.write, bytes(piece))
    except ClientDisconnect:
        upload.abort()
        return Response(status_code=400)  # nobody is listening; nothing was stored
    except BaseException:
        upload.abort()
        raise
    created = await run_in_threadpool(upload.finish, int(length) if length and length.isdigit() else None)
    return Response(status_code=201 if created else 200)


@router.get("/{namespace}/objects/{key:path}")
def get_object(namespace: str, key: str, request: Request, range_header: str | None = Header(None, alias="range"),
               who: Principal = Depends(principal)) -> Response:
    """The whole file, or one ``Range: bytes=a-b`` of it (206)."""
    backend = _backend(request, namespace, who)
    path = backend.root / check_key(key)
    size = _size(path, key)
    start, end = 0, size
    headers = {"accept-ranges": "bytes"}
    if range_header:
        start, end = _parse_range(range_header, size)
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    headers["content-length"] = str(end - start)
    return StreamingResponse(_read(path, start, end), 206 if range_header else 200, headers=headers,
                             media_type="application/octet-stream")


@router.head("/{namespace}/objects/{key:path}")
def head_object(namespace: str, key: str, request: Request, who: Principal = Depends(principal)) -> Response:
    backend = _backend(request, namespace, who)
    size = _size(backend.root / check_key(key), key)
    return Response(headers={"content-length": str(size), "accept-ranges": "bytes"})


@router.get("/{namespace}/list")
def list_objects(namespace: str, request: Request, prefix: str = "", who: Principal = Depends(principal)) -> Response:
    """JSON lines ``{"key": …, "size": …}`` of the files under ``prefix``, streamed."""
    backend = _backend(request, namespace, who)
    prefix = check_list_prefix(prefix)

    def lines() -> Iterator[bytes]:
        for key, size in backend.list(prefix):
            yield json.dumps({"key": key, "size": size}).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.delete("/{namespace}/objects/{key:path}", status_code=204)
def delete_object(namespace: str, key: str, request: Request, who: Principal = Depends(principal)) -> Response:
    """Agents delete only their locks; the server (admin) anything. A missing file is no error."""
    backend = _backend(request, namespace, who)
    may_delete(check_key(key), who.is_admin)
    backend.delete(key)
    return Response(status_code=204)


def _size(path: os.PathLike[str], key: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise ServerError(f"{key} does not exist", 404) from None


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """``bytes=a-b`` or ``bytes=a-`` (what the client sends) as [start, end); one range only."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    try:
        if unit.strip() != "bytes" or not dash:
            raise ValueError
        start, end = int(first), (min(int(last) + 1, size) if last else size)
    except ValueError:
        raise ServerError(f"unsupported Range header {header!r}", 400) from None
    if start >= size or start >= end:
        raise ServerError(f"range {header!r} is outside the file's {size} bytes", 416)
    return start, end


def _read(path: os.PathLike[str], start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            piece = f.read(min(READ_PIECE, left))
            if not piece:
                return
            left -= len(piece)
            yield piece
