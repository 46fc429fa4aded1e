"""A request the server's rules refuse, with the HTTP status and the one sentence it is answered with."""

from __future__ import annotations

from hozon.errors import HozonError


class Refused(HozonError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
