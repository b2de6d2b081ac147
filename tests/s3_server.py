"""A real S3 API for tests: moto's server on 127.0.0.1, reached through s3fs like real S3.

(moto's in-process ``mock_aws`` cannot intercept s3fs's async client; the server can.)
Use the ``s3`` fixture: it sets the AWS environment (dummy credentials, region, endpoint
through GANFLOW_S3_ENDPOINT_URL), creates a fresh bucket per test and yields an ``S3`` handle.
"""

from __future__ import annotations

import socket
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key-do-not-print"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    endpoint: str
    bucket: str

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True)

    def require_auth(self, on: bool) -> None:
        """Make moto check signatures (any key it does not know is then rejected) or stop."""
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0" if on else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=5).read()


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("GANFLOW_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    handle = S3(moto_endpoint, f"test-{uuid.uuid4().hex[:12]}")
    handle.fs().mkdir(handle.bucket)
    yield handle
    handle.require_auth(False)
