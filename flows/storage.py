"""Filesystems for local paths and S3 (or any S3-compatible store), with retries.

``get_filesystem(url)`` is the one place a URL becomes an fsspec filesystem. For ``s3://``
it builds an s3fs filesystem whose credentials come from the standard AWS chain
(environment, ``~/.aws/config``, instance roles) and whose endpoint comes, in order, from
``GANFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (for MinIO,
Ceph, moto...). The region is botocore's own: ``AWS_DEFAULT_REGION`` (passing it through
``client_kwargs`` breaks bucket creation on s3fs).

Storage errors that users cause (missing bucket, bad credentials, wrong path) become one-line
:class:`StorageError` messages with secrets masked; transient ones (connection resets, 5xx,
throttling) are retried with exponential backoff by :func:`with_retries`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import fsspec

T = TypeVar("T")

ENDPOINT_VARS = ("GANFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Where an S3-compatible endpoint is read from, first set wins (the one order, everywhere)."""
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_TRANSIENT_MARKERS = (
    "slowdown",
    "serviceunavailable",
    "internalerror",
    "requesttimeout",
    "throttl",
    "connection reset",
    "connection aborted",
    "could not connect",
    "couldn't connect",  # pyarrow's S3 client (curl)
    "network_connection",
    "slow_down",
    "service_unavailable",
    "endpointconnectionerror",
    "read timeout",
    "timed out",
    " 500",
    " 502",
    " 503",
    " 504",
)
_AUTH_MARKERS = (
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "accessdenied",
    "access denied",
    "forbidden",
    "invalidtoken",
    "expiredtoken",
    "unable to locate credentials",
    "nocredentials",
)


class StorageError(ValueError):
    """A storage problem the user can fix (path, bucket, credentials, endpoint); one line."""


def s3_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """The S3-compatible endpoint URL the environment names (ENDPOINT_VARS order), or None
    for AWS S3 itself."""
    env = os.environ if env is None else env
    return next((env[v] for v in ENDPOINT_VARS if env.get(v)), None)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def get_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path, file://, s3:// or another fsspec URL."""
    if url.startswith("s3://") or url.startswith("s3a://"):
        import s3fs  # local import: aiobotocore is slow to import

        # skip_instance_cache: fsspec caches instances by arguments, and a cached one would
        # keep stale credentials and directory listings across environment changes.
        fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint(), skip_instance_cache=True)
        return fs, url.split("://", 1)[1].rstrip("/")
    if is_remote(url):
        protocol, path = url.split("://", 1)
        return fsspec.filesystem(protocol), path.rstrip("/")
    path = url[len("file://") :] if url.startswith("file://") else url
    return fsspec.filesystem("file", auto_mkdir=True), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def mask_secrets(text: str) -> str:
    """Remove credentials from a message: AWS secrets from the environment and URL userinfo."""
    for var in _SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | StorageError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError):
        text = f"{type(exc).__name__} {exc}".lower()
        return any(m in text for m in _TRANSIENT_MARKERS)
    return False


def describe(exc: BaseException, url: str) -> StorageError:
    """One line for a storage failure at ``url``, secrets masked."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    low = text.lower()
    if isinstance(exc, FileNotFoundError) and (
        "nosuchbucket" in low or (is_remote(url) and "bucket" in low)
    ):
        msg = f"bucket not found for {url}"
    elif isinstance(exc, FileNotFoundError):
        msg = f"not found: {url}"
    elif isinstance(exc, PermissionError) or any(m in low for m in _AUTH_MARKERS):
        msg = f"access denied to {url} (check AWS credentials and endpoint): {text}"
    elif is_transient(exc):
        msg = f"storage unreachable at {url} after retries: {text}"
    else:
        msg = f"storage error at {url}: {text}"
    return StorageError(mask_secrets(msg))


def with_retries(
    fn: Callable[..., T],
    *args,
    attempts: int | None = None,
    base_delay: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
    transient: Callable[[BaseException], bool] = is_transient,
    **kwargs,
) -> T:
    """Call fn, retrying transient errors with exponential backoff (0.2 s, 0.4 s...).

    attempts defaults to GANFLOW_STORAGE_RETRIES + 1 (4 in all). ``transient`` says which
    errors are worth another try (storage's by default; the registry passes MLflow's).
    Others (missing path, denied access) are raised at once: retrying them only delays the
    message.
    """
    if attempts is None:
        attempts = int(os.environ.get("GANFLOW_STORAGE_RETRIES", "3")) + 1
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not transient(exc):
                raise
            sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")
