"""How refused requests and storage failures are answered: a status and a one-sentence ``detail``."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from hozon.errors import HozonError, RepositoryFull
from hozon.server.refused import Refused


def install(app: FastAPI) -> None:
    async def refused(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return JSONResponse({"detail": exc.message}, exc.status)

    async def failed(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HozonError)
        return JSONResponse({"detail": exc.message}, 507 if isinstance(exc, RepositoryFull) else 500)

    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(HozonError, failed)
