"""`s3://bucket/prefix` storage over boto3: AWS S3 and S3-compatible servers.

Credentials come only from the standard AWS chain (env, config/credentials files, instance
roles); the endpoint from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (botocore reads both) or the
config file. Every failure leaves as one `StorageError` line that never holds a secret.

Downloads into memory (whole objects and ranges: what pulls and fetches use) take a fast path:
botocore presigns the GET (endpoint, addressing style, region, credentials as for any call) and
a plain urllib3 pool sends it, about a third of the CPU of a full botocore call, which is what
bounds a pull of many small files. Anything but a clean 200/206 with the announced length falls
back to the normal botocore call, so retries, redirects and error messages are botocore's.
`LORAJOBS_S3_FAST_GET=0` turns it off; it is off when an HTTP(S) proxy is configured.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lorajobs.jobspecs.failures import (
    InvalidInput,
    MissingCredentials,
    ObjectNotFound,
    StorageAuthError,
    StorageError,
)
from lorajobs.storage.base import BytesCallback, ObjectInfo, safe_key
from lorajobs.storage.s3_errors import one_line, root_cause, stream_errors, transport_errors

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
# Below this size one PUT; above it multipart (parts in parallel, each retried on its own).
# The AWS CLI uses 8 MiB for both; a larger threshold keeps mid-size files to one request.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024

_AUTH_CODES = {
    "AccessDenied",
    "AccountProblem",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
    "UnrecognizedClientException",
    "403",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


def _aws_hosted(endpoint: str) -> bool:
    host = urlparse(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


class S3Storage:
    """A bucket (or a prefix in one) on S3 or an S3-compatible server.

    No network in `__init__`: the client is created on first use, once, thread-safely (boto3
    clients may be shared between threads; sessions may not).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNKSIZE,
        max_concurrency: int = 8,
        list_page_size: int = 1000,
        max_pool_connections: int = 64,
    ):
        if not bucket:
            raise InvalidInput("s3:// URI without a bucket name")
        self.bucket = bucket
        self.prefix = safe_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._threshold = multipart_threshold
        self._chunksize = multipart_chunksize
        self._concurrency = max_concurrency
        self._page_size = list_page_size
        self._pool = max_pool_connections
        self._attempts = 5
        self._client: Any = None
        self._http: Any = None  # urllib3 pool of the fast GET path (None: off)
        self._transfer_config: Any = None
        self._lock = threading.Lock()

    # -- client -----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to (for messages)."""
        return str(self.client.meta.endpoint_url)

    def _make_client(self) -> Any:
        import boto3
        from boto3.s3.transfer import TransferConfig

        session = boto3.session.Session()
        region = session.region_name or DEFAULT_REGION
        attempts = os.environ.get("AWS_MAX_ATTEMPTS", "5")
        if not attempts.isdigit() or int(attempts) < 1:
            raise InvalidInput(f"AWS_MAX_ATTEMPTS={attempts!r}: expected a whole number >= 1")
        self._attempts = int(attempts)
        # Transient failures (throttling, 5xx, dropped connections) are retried with backoff.
        retries: dict[str, Any] = {
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "max_attempts": int(attempts),
        }
        base = dict(
            signature_version="s3v4",
            retries=retries,
            connect_timeout=10,
            read_timeout=120,
            # Pulls run many GETs at once on one client: one pooled connection each.
            max_pool_connections=max(self._pool, self._concurrency * 2),
        )
        style = os.environ.get("LORAJOBS_S3_ADDRESSING", "auto").strip().lower() or "auto"
        if style not in ("auto", "path", "virtual"):
            raise InvalidInput(
                f"LORAJOBS_S3_ADDRESSING={style!r}: expected one of path, virtual, auto"
            )
        # Guess the endpoint from the env (the common case); the client then tells the truth,
        # and a wrong guess (an endpoint set in the AWS config file) costs one rebuild.
        guess = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        custom = bool(guess) and not _aws_hosted(guess or "")
        client = self._build(session, region, base, style, custom)
        actual = not _aws_hosted(str(client.meta.endpoint_url))
        if actual != custom:
            client = self._build(session, region, base, style, actual)
        self._transfer_config = TransferConfig(
            multipart_threshold=self._threshold,
            multipart_chunksize=self._chunksize,
            max_concurrency=self._concurrency,
        )
        self._http = self._fast_pool(base["max_pool_connections"])
        return client

    @staticmethod
    def _fast_pool(size: int) -> Any:
        """The urllib3 pool of the fast GET path, or None where it must not be used."""
        if os.environ.get("LORAJOBS_S3_FAST_GET", "1").strip().lower() in ("0", "false", "no"):
            return None
        proxies = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
        if any(os.environ.get(v) for v in proxies):
            return None  # botocore knows the proxy rules (NO_PROXY, ...); keep it simple
        import urllib3
        from botocore.httpsession import get_cert_path

        return urllib3.PoolManager(
            maxsize=size,
            ca_certs=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True),
            timeout=urllib3.Timeout(connect=10, read=120),
            retries=False,
        )

    @staticmethod
    def _build(session: Any, region: str, base: dict[str, Any], style: str, custom: bool) -> Any:
        from botocore.config import Config

        if style == "auto":
            # S3-compatible servers (SeaweedFS, MinIO, ...) rarely have wildcard DNS per bucket.
            style = "path" if custom else "virtual"
        extra: dict[str, Any] = {"s3": {"addressing_style": style}}
        if custom:
            # Many S3-compatible servers reject the CRC checksums botocore now sends by default;
            # the env still wins when set (an explicit Config value would override it).
            if "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ:
                extra["request_checksum_calculation"] = "when_required"
            if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ:
                extra["response_checksum_validation"] = "when_required"
        return session.client("s3", region_name=region, config=Config(**base, **extra))

    # -- keys and errors --------------------------------------------------------------------

    def _key(self, key: str) -> str:
        k = safe_key(key) if key else ""
        if self.prefix and k:
            return f"{self.prefix}/{k}"
        return self.prefix or k

    def object_key(self, key: str) -> str:
        """The object's key in the bucket (this storage's prefix included)."""
        return self._key(key)

    def _rel(self, full: str) -> str:
        if not self.prefix:
            return full
        if full == self.prefix:
            return ""  # the root itself is one object (as FileStorage on a file)
        return full[len(self.prefix) + 1 :]

    def _where(self, full_key: str) -> str:
        return f"s3://{self.bucket}/{full_key}".rstrip("/")

    @contextmanager
    def _errors(self, full_key: str) -> Iterator[None]:
        """Turn boto errors into one-line lorajobs errors (no traceback chain, no secrets)."""
        try:
            yield
        except transport_errors() as e:
            err = self._translate(e, full_key)
            log.debug("s3 error on %s", self._where(full_key), exc_info=True)
            raise err from None

    def _translate(self, exc: BaseException, full_key: str) -> Exception:
        from botocore import exceptions as bex

        where = self._where(full_key)
        e = root_cause(exc)
        if isinstance(e, bex.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _AUTH_CODES or status == 403:
                name = "403 Forbidden" if code == "403" else code
                return StorageAuthError(
                    f"{where}: access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({name})"
                )
            if code == "NoSuchBucket":
                return ObjectNotFound(f"s3://{self.bucket}: no such bucket")
            if code in _MISSING_KEY_CODES or status == 404:
                # A HEAD says only "404": tell a missing bucket from a missing key.
                if not self._bucket_exists():
                    return ObjectNotFound(f"s3://{self.bucket}: no such bucket")
                return ObjectNotFound(f"{where}: no such object")
            msg = one_line(str(err.get("Message", "")) or str(e))
            return StorageError(f"{where}: S3 error {code or status}: {msg}")
        if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return MissingCredentials(
                f"{where}: no usable AWS credentials: set AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        endpoint = self._safe_endpoint()
        if isinstance(e, bex.ConnectTimeoutError):
            return StorageError(f"{where}: timed out connecting to the S3 endpoint {endpoint}")
        if isinstance(e, bex.ReadTimeoutError):
            return StorageError(f"{where}: the S3 endpoint {endpoint} stopped answering")
        if isinstance(e, (bex.EndpointConnectionError, bex.ConnectionClosedError)):
            return StorageError(
                f"{where}: cannot reach the S3 endpoint {endpoint} (connection refused or down)"
            )
        if isinstance(e, OSError) and not isinstance(e, bex.BotoCoreError):
            return StorageError(f"{where}: local I/O failed: {one_line(str(e))}")
        return StorageError(f"{where}: {type(e).__name__}: {one_line(str(e))}")

    def _safe_endpoint(self) -> str:
        try:
            return self.endpoint
        except Exception:
            return "(unknown endpoint)"

    def _bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except Exception as e:
            from botocore.exceptions import ClientError

            if isinstance(e, ClientError):
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                return status != 404
            return True

    # -- the Storage protocol ---------------------------------------------------------------

    def put_file(self, local: Path, key: str, *, callback: BytesCallback = None) -> None:
        """Upload a file: one PUT when small, multipart above the threshold. S3 makes an
        object visible only once its PUT (or CompleteMultipartUpload) succeeds."""
        full = self._key(key)
        with self._errors(full):
            config = self._transfer_config_()
            size = local.stat().st_size
            if size < self._threshold:
                # s3transfer costs a thread pool and a future per call: too much per small file.
                with open(local, "rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=full, Body=body)
                if callback is not None:
                    callback(size)
                return
            self.client.upload_file(str(local), self.bucket, full, Config=config, Callback=callback)

    def get_file(self, key: str, local: Path, *, callback: BytesCallback = None) -> None:
        full = self._key(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(full):
            # s3transfer writes a temp file and renames it: no half file under `local`.
            self.client.download_file(
                self.bucket, full, str(local), Config=self._transfer_config_(), Callback=callback
            )

    def put_bytes(self, data: bytes, key: str) -> None:
        full = self._key(key)
        with self._errors(full):
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)
        with self._errors(full):
            return self._read(full)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` (fewer only at the end of the object)."""
        full = self._key(key)
        if length <= 0:
            return b""
        with self._errors(full):
            return self._read(full, Range=f"bytes={start}-{start + length - 1}")

    def _read(self, full: str, **kwargs: Any) -> bytes:
        """GET an object (or a range) into memory. botocore retries the request itself; a
        connection that breaks while the body streams is retried here, with the same budget."""
        if self.client is not None and self._http is not None:
            data = self._fast_get(full, kwargs.get("Range"))
            if data is not None:
                return data
        for attempt in range(1, self._attempts + 1):
            resp = self.client.get_object(Bucket=self.bucket, Key=full, **kwargs)
            try:
                return bytes(resp["Body"].read())
            except stream_errors():
                if attempt >= self._attempts:
                    raise
                log.debug("s3 body of %s broke off; retrying", self._where(full), exc_info=True)
                time.sleep(random.uniform(0, min(5.0, 0.2 * 2**attempt)))  # full jitter
        raise AssertionError("unreachable")

    def _fast_get(self, full: str, byte_range: str | None) -> bytes | None:
        """The happy path of a GET without botocore's per-call machinery; None on anything
        unusual (the caller then asks botocore, which retries and explains errors)."""
        try:
            url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=900
            )
            headers = {"Range": byte_range} if byte_range else {}
            # decode_content=False: bytes as stored, even for objects with a Content-Encoding.
            resp = self._http.request(
                "GET",
                url,
                headers=headers,
                redirect=False,
                decode_content=False,
                preload_content=True,
            )
        except Exception:  # noqa: BLE001 - any trouble: the botocore path decides
            log.debug("fast GET of %s failed; using botocore", self._where(full), exc_info=True)
            return None
        if resp.status != (206 if byte_range else 200):
            return None
        data = bytes(resp.data)
        announced = resp.headers.get("Content-Length")
        if announced is None or not announced.isdigit() or int(announced) != len(data):
            return None
        return data

    def abort_incomplete_uploads(self, prefix: str = "") -> int:
        """Abort multipart uploads under `prefix` that never completed (their parts cost
        storage and are never visible as objects). Returns how many were aborted."""
        full = self._key(prefix.rstrip("/")) if prefix.strip("/") else self.prefix
        n = 0
        with self._errors(full):
            # `a/j/`, not `a/j`: the uploads of a sibling `a/j2` are not ours to abort.
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{full}/" if full else ""
            )
            for page in pages:
                for up in page.get("Uploads", []) or []:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                    n += 1
        return n

    def exists(self, key: str) -> bool:
        full = self._key(key)
        with self._errors(full):
            try:
                self.client.head_object(Bucket=self.bucket, Key=full)
                return True
            except Exception as e:
                from botocore.exceptions import ClientError

                if isinstance(e, ClientError):
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if status == 404:
                        return False
                raise

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects at `prefix`: the object itself if one has that exact key, else all below it."""
        full = self._key(prefix.rstrip("/")) if prefix.strip("/") else self.prefix
        exact: list[ObjectInfo] = []
        below: list[ObjectInfo] = []
        with self._errors(full):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self._page_size}
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if k.endswith("/"):  # "folder" placeholders some consoles create
                        continue
                    info = ObjectInfo(
                        key=self._rel(k),
                        size=int(obj["Size"]),
                        etag=str(obj.get("ETag", "")).strip('"'),
                        modified=obj["LastModified"].timestamp()
                        if obj.get("LastModified")
                        else 0.0,
                    )
                    if k == full and full:
                        exact.append(info)
                    elif not full or k.startswith(full + "/"):
                        below.append(info)
        return exact or sorted(below, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> int:
        objs = self.list(prefix)
        keys = [self._key(o.key) for o in objs]
        full = self._key(prefix) if prefix.strip("/") else self.prefix
        with self._errors(full):
            for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[i : i + 1000]]
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise StorageError(
                        f"{self._where(first.get('Key', full))}: delete failed: "
                        f"{first.get('Code')}: {one_line(str(first.get('Message', '')))}"
                    )
        return len(keys)

    def _transfer_config_(self) -> Any:
        _ = self.client  # creates the transfer config alongside the client
        return self._transfer_config
