"""Secrets the server hands out (admin, enrolment and agent credentials), and how it keeps them.

A credential is 32 random bytes, shown once, in URL-safe base64. The server stores only its
SHA-256: with that much entropy a slow hash adds nothing, and a stolen catalog gives no usable
credential. Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

PREFIXES = {"admin": "hzadm_", "enrol": "hzenr_", "agent": "hzagt_", "metrics": "hzmet_"}


def new_secret(kind: str) -> str:
    """A fresh credential of ``kind`` (admin, enrol, agent, metrics); the prefix says what it is in logs."""
    return PREFIXES[kind] + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)
