"""A repository in S3-compatible object storage: ``s3:https://HOST[:PORT]/BUCKET[/PREFIX]``.

Credentials and region come as for any AWS client: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, or a profile (``AWS_PROFILE``). ``s3:http://…`` is for a test server on loopback.

Write-once is the server's job: every put is conditional (``If-None-Match: *``), so an object that
exists is never replaced, even by a concurrent writer. A server that cannot do conditional writes is
refused rather than trusted. A put is one request, so an object is there whole or not at all; the
only half-written state S3 knows is an unfinished multipart upload, which ``clean_uploads`` aborts.

boto3 rather than obstore (measured in ``bench/targets.py``): puts were as fast with either (the
server was the limit), and boto3 alone reads AWS profiles, sets Object Lock retention and lists
multipart uploads; it costs ~0.2 s of import, paid only by ``s3:`` locations.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

from hozon.errors import BackendError, HozonError, ObjectNotFound, UsageError
from hozon.repo.backends.base import Entry

SCHEME = "s3"
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


class S3Backend:
    uploaders = 8  # a request waits on the network and the server far more than on this machine

    def __init__(self, location: str) -> None:
        scheme, _, url = location.partition(":")
        if "://" not in url:
            url = f"https://{url}"
        parts = urlsplit(url)
        bucket, _, prefix = parts.path.strip("/").partition("/")
        if scheme != SCHEME or parts.scheme not in {"http", "https"} or not parts.hostname or not bucket:
            raise UsageError(f"{location!r} is not an S3 repository location",
                             hint="write it as s3:https://HOST[:PORT]/BUCKET[/PREFIX]")
        self.location = location
        self.endpoint = f"{parts.scheme}://{parts.netloc}"
        self.bucket = bucket
        self.root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        session = boto3.session.Session()
        config = botocore.config.Config(max_pool_connections=2 * self.uploaders, retries={"mode": "standard"},
                                        connect_timeout=10, read_timeout=120)
        try:
            self._s3: Any = session.client("s3", endpoint_url=self.endpoint, config=config,
                                           region_name=session.region_name or "us-east-1")
        except botocore.exceptions.ProfileNotFound as exc:
            raise UsageError(f"S3: {exc}", hint="set AWS_PROFILE to a profile in ~/.aws/config") from exc

    @classmethod
    def from_location(cls, location: str) -> S3Backend:
        return cls(location)

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.put_retained(key, data, None)

    def put_retained(self, key: str, data: bytes | memoryview, until: datetime.datetime | None) -> None:
        """Store ``key`` unless it exists; with ``until``, under an Object Lock (compliance) until then."""
        body = memoryview(data).cast("B")
        extra: dict[str, Any] = {}
        if until is not None:
            extra = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until,
                     "ChecksumAlgorithm": "SHA256"}  # S3 wants a checksum with every locked put
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(body), IfNoneMatch="*", **extra)
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                if self.get(key) != body:
                    raise BackendError(f"{self.location}: {key} exists already with different content") from exc
                return  # the same bytes: a retry of a put that had succeeded
            if code in {"NotImplemented", "NotImplementedError"}:
                raise BackendError(f"{self.endpoint} does not support conditional writes (If-None-Match), so it "
                                   "could overwrite repository files; Hozon does not write there") from exc
            raise self._error(exc, "store", key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, "store", key) from exc

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        extra = {}
        if offset or length is not None:
            extra["Range"] = f"bytes={offset}-{'' if length is None else offset + length - 1}"
        try:
            body: bytes = self._s3.get_object(Bucket=self.bucket, Key=self._key(key), **extra)["Body"].read()
            return body
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "InvalidRange":
                return b""  # at or past the end
            raise self._error(exc, "read", key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, "read", key) from exc

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in {"404", "NoSuchKey", "NotFound"}:
                self._probe()  # a missing bucket answers 404 to HEAD too
                return False
            if _code(exc) in {"403", "Forbidden"}:
                self._probe()  # a HEAD answer has no body to say why
            raise self._error(exc, "look up", key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, "look up", key) from exc

    def list(self, prefix: str) -> Iterator[Entry]:
        base = prefix.strip("/")
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.root}{base}/" if base else self.root)
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield Entry(item["Key"][len(self.root):], int(item["Size"]))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error(exc, "list", f"{base}/") from exc

    def delete(self, key: str) -> None:
        """Delete the object's stored version itself: in a versioned bucket a plain delete only hides it
        behind a delete marker, so a locked object would seem gone while it stays."""
        try:
            version = self._s3.head_object(Bucket=self.bucket, Key=self._key(key)).get("VersionId")
            extra = {"VersionId": version} if version and version != "null" else {}
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key), **extra)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in {"404", "NoSuchKey", "NotFound"}:
                return
            if _code(exc) == "AccessDenied" and (until := self.locked_until(key)) is not None:
                raise BackendError(f"{self.location}: {key} is locked (S3 Object Lock) until "
                                   f"{until:%Y-%m-%d %H:%M} UTC; it cannot be deleted before") from exc
            raise self._error(exc, "delete", key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, "delete", key) from exc

    def check_retention(self) -> None:
        try:
            config = self._s3.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in {"ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"}:
                config = {}
            else:
                raise self._error(exc, "read the Object Lock configuration of", "the bucket") from exc
        if config.get("ObjectLockEnabled") != "Enabled":
            raise UsageError(f"S3 bucket {self.bucket!r} has no Object Lock, so objects there cannot be locked",
                             hint="create a bucket with Object Lock enabled for locked copies")

    def retain(self, key: str, until: datetime.datetime) -> None:
        current = self.locked_until(key)
        if current is not None and current >= until:
            return
        try:
            self._s3.put_object_retention(Bucket=self.bucket, Key=self._key(key),
                                          Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until})
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error(exc, "lock", key) from exc

    def locked_until(self, key: str) -> datetime.datetime | None:
        """The end of the object's retention, if it is in the future."""
        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error(exc, "look up", key) from exc
        until = head.get("ObjectLockRetainUntilDate")
        if isinstance(until, datetime.datetime) and until > datetime.datetime.now(datetime.UTC):
            return until
        return None

    def clean_uploads(self, max_age: float, dry_run: bool = False) -> int:
        """Abort multipart uploads under the repository's prefix started more than ``max_age`` s ago."""
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=max_age)
        stale = 0
        try:
            pages = self._s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.root)
            for page in pages:
                for upload in page.get("Uploads", ()):
                    if upload["Initiated"] >= cutoff:
                        continue
                    if not dry_run:
                        self._s3.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                        UploadId=upload["UploadId"])
                    stale += 1
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error(exc, "clean up", "unfinished uploads") from exc
        return stale

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise BackendError(f"invalid repository key {key!r}")
        return f"{self.root}{key}"

    def _probe(self) -> None:
        """Raise what S3 says to a small GET of the bucket (a missing bucket, refused credentials), if anything."""
        try:
            self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self.root, MaxKeys=1)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error(exc, "open", "the bucket") from exc

    def _error(self, exc: Exception, verb: str, key: str) -> HozonError:
        """One sentence for what S3 (or the way to it) answered."""
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return UsageError("no S3 credentials were found",
                              hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectionClosedError):
            return BackendError(f"cannot reach S3 at {self.endpoint} to {verb} {key}")
        if not isinstance(exc, botocore.exceptions.ClientError):
            return BackendError(f"{self.location}: cannot {verb} {key}: {exc}")
        code = _code(exc)
        if code == "NoSuchBucket":
            return BackendError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}",
                                hint="create it first (hozon does not create buckets)")
        if code in {"NoSuchKey", "404", "NotFound"}:
            return ObjectNotFound(self.location, key)
        if code in _CREDENTIAL_CODES:
            return BackendError(f"S3 at {self.endpoint} refused the credentials ({code})",
                                hint="check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        if code == "AccessDenied" and verb == "delete":
            return BackendError(f"{self.location}: S3 refused to delete {key}: it is locked (Object Lock) "
                                "or these credentials may not delete")
        message = exc.response.get("Error", {}).get("Message") or code
        return BackendError(f"{self.location}: S3 refused to {verb} {key}: {message} ({code})")


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
