"""How the server answers a typed error: a status and the error's one sentence as ``detail``.

A ``ServerError`` carries its status (a refused key 400, another namespace 403, a conflict 409, …),
a full repository disk is 507 (the client turns it back into ``RepositoryFull``), a usage error
400, anything else 500.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from hozon.errors import HozonError, RepositoryFull, ServerError, UsageError


def install(app: FastAPI) -> None:
    async def answer(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HozonError)
        if isinstance(exc, ServerError) and exc.status:
            status = exc.status
        else:
            status = 507 if isinstance(exc, RepositoryFull) else 400 if isinstance(exc, UsageError) else 500
        return JSONResponse({"detail": exc.message, "hint": exc.hint}, status)

    app.add_exception_handler(HozonError, answer)
