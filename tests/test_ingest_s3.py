"""Ingest against a real S3 API (moto's server on 127.0.0.1, through s3fs): every layout,
snapshots stored on S3, and the failures users hit (missing bucket, wrong path, bad keys)."""

from __future__ import annotations

import os

import pytest
import torch
from ingest_data import make_layout, upload

from flows.ingest.layouts import IngestError
from flows.ingest.resolve import ensure_snapshot
from flows.ingest.runner import ingest
from flows.snapshots.load import list_snapshots, load_dataset
from flows.storage import StorageError
from gan_core.data import load_builtin, to_uint8, to_unit

pytest_plugins = ["s3_server"]  # the moto server fixtures: moto_endpoint, s3


@pytest.mark.parametrize("kind", ["classes", "flat", "cyclegan", "npz", "zip", "tar"])
def test_layouts_from_s3_into_s3(kind, s3, tmp_path):
    folder, rel, layout = make_layout(kind, tmp_path / "raw")
    upload(folder, s3.fs(), f"{s3.bucket}/raw")
    root = s3.url("snapshots")
    r = ingest(s3.url("raw", rel) if rel else s3.url("raw"), root=root, name=kind)
    assert r.layout == layout and not r.quarantined
    # The same bytes ingested from local disk get the same id: the id is content, not place.
    local = ingest(str(folder / rel) if rel else str(folder), root=str(tmp_path / "store"))
    assert local.id == r.id
    got = load_dataset(kind, "train", root)
    want = load_dataset(local.id, "train", str(tmp_path / "store"))
    if layout == "cyclegan":
        assert torch.equal(got.x.images, want.x.images) and torch.equal(got.y.images, want.y.images)
    else:
        assert torch.equal(got.images, want.images)
    again = ingest(s3.url("raw", rel) if rel else s3.url("raw"), root=root, name=kind)
    assert again.id == r.id and again.reused


def test_builtin_into_s3_root_equals_load_builtin(s3):
    root = s3.url("snapshots")
    sid = ensure_snapshot("builtin:digits-unpaired", root).id
    got = load_dataset(sid, "test", root)
    want = load_builtin("builtin:digits-unpaired", 16, "test")
    # Stored in 8 bits: load_builtin rounded to the nearest 8-bit value.
    assert torch.equal(got.x.images, to_unit(to_uint8(want.x.images)))
    assert torch.equal(got.x_truth, to_unit(to_uint8(want.x_truth)))
    assert [m.source for m in list_snapshots(root)] == ["builtin:digits-unpaired"]


def test_missing_bucket_and_wrong_path(s3, tmp_path):
    with pytest.raises(IngestError, match="bucket 'no-such-bucket' does not exist"):
        ingest("s3://no-such-bucket/raw", root=str(tmp_path / "store"))
    with pytest.raises(IngestError, match=f"source not found: s3://{s3.bucket}/nothing-here"):
        ingest(s3.url("nothing-here"), root=str(tmp_path / "store"))
    with pytest.raises(StorageError, match="does not exist|not found"):
        ingest("builtin:digits", root="s3://no-such-bucket/snapshots")
    assert list_snapshots(str(tmp_path / "store")) == []


def test_bad_credentials_one_line_and_masked(s3, tmp_path, monkeypatch):
    folder, _, _ = make_layout("flat", tmp_path / "raw")
    upload(folder, s3.fs(), f"{s3.bucket}/raw")
    s3.require_auth(True)  # moto now checks signatures: our dummy key is unknown to it
    with pytest.raises(StorageError) as exc:
        ingest(s3.url("raw"), root=str(tmp_path / "store"))
    msg = str(exc.value)
    assert (
        "access denied" in msg
        and "\n" not in msg
        and os.environ["AWS_SECRET_ACCESS_KEY"] not in msg
    )
    s3.require_auth(False)
    assert list_snapshots(str(tmp_path / "store")) == []


def test_interrupted_write_on_s3_leaves_no_snapshot(s3, tmp_path, monkeypatch):
    import flows.snapshots.store as snapshots

    folder, _, _ = make_layout("classes", tmp_path / "raw")
    root = s3.url("snapshots")
    real_put = snapshots._put_bytes

    def failing_put(fs, path, data):
        if path.endswith("manifest.json"):
            raise ConnectionError("connection reset while writing the manifest")
        return real_put(fs, path, data)

    monkeypatch.setattr(snapshots, "_put_bytes", failing_put)
    monkeypatch.setenv("GANFLOW_STORAGE_RETRIES", "1")
    with pytest.raises(StorageError, match="unreachable"):
        ingest(str(folder), root=root)
    assert list_snapshots(root) == []
    monkeypatch.setattr(snapshots, "_put_bytes", real_put)
    r = ingest(str(folder), root=root)
    assert [m.id for m in list_snapshots(root)] == [r.id]
