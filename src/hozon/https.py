"""Talking to a Hozon server: HTTPS that trusts only the server's own CA, and its errors as sentences.

Every client of the server (the storage backend, enrolment, admin commands, the agent) pins the
server's CA certificate instead of the system's trust store, and turns a refused request into a
``ServerError`` carrying the server's one-sentence ``detail``.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import httpx

from hozon.errors import ServerError

TIMEOUT = httpx.Timeout(60.0, connect=15.0)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, lower-case hex: what users pin (``--fingerprint``)."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem.decode())).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """Accept ``AB:CD:…``, ``sha256:abcd…`` or plain hex; give plain lower-case hex."""
    return text.lower().removeprefix("sha256:").replace(":", "").strip()


def pinned_context(ca: Path | bytes) -> ssl.SSLContext:
    """A TLS context that trusts exactly one CA (a PEM file or PEM bytes), TLS 1.2 or newer."""
    context = (ssl.create_default_context(cadata=ca.decode()) if isinstance(ca, bytes)
               else ssl.create_default_context(cafile=str(ca)))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def client(base_url: str, ca: Path | bytes, secret: str | None = None) -> httpx.Client:
    """A client of the server at ``base_url`` pinned to ``ca``; ``secret`` is sent as the bearer credential."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=base_url, verify=pinned_context(ca), headers=headers, timeout=TIMEOUT)


def detail(response: httpx.Response) -> str:
    """The server's one-sentence reason for a refused request (its JSON ``detail``), or the status."""
    try:
        doc = response.json()
    except ValueError:
        doc = None
    text = doc.get("detail") if isinstance(doc, dict) else None
    if isinstance(text, str) and text:
        return text
    if text:  # FastAPI's validation errors: a list of {loc, msg}
        return f"the request was malformed: {text}"
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


def check(response: httpx.Response, doing: str) -> httpx.Response:
    """``response`` if it succeeded; otherwise a ServerError saying what was refused and why."""
    if response.is_success:
        return response
    raise ServerError(f"the server refused to {doing}: {detail(response)}", response.status_code)


def unreachable(url: str, exc: httpx.TransportError) -> ServerError:
    """The one sentence for a server that cannot be reached or whose TLS handshake failed."""
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return ServerError(f"the server at {url} did not present a certificate signed by the pinned CA",
                           hint="check the URL and the pinned CA (an agent's: re-enrol with the server's current "
                                "CA fingerprint)")
    return ServerError(f"cannot reach the server at {url}: {exc or type(exc).__name__}",
                       hint="is hozon server run running there?")


def enrolment_token(secret: str, fingerprint: str) -> str:
    """What ``server token create`` prints: the one-time secret, then the CA fingerprint to pin.

    ``hzenr_<secret>.<sha256 hex>``: whoever holds the token can check the server it talks to
    before sending the secret, with nothing else to copy.
    """
    return f"{secret}.{fingerprint}"


def split_enrolment_token(token: str) -> tuple[str, str | None]:
    """(secret, fingerprint or None) of an enrolment token."""
    secret, _, fingerprint = token.strip().partition(".")
    return secret, fingerprint or None
