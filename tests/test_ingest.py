"""Ingest on local storage, without Prefect: layouts, validation, archives, atomicity,
idempotency, the built-in parity, retries and the command line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ingest_data import (
    classes_files,
    digits,
    make_layout,
    png,
    tar_bytes,
    write,
    zip_bytes,
)

import flows.ingest as ingest_mod
import flows.snapshots as snapshots
from flows.cli import build_parser, main
from flows.ingest import IngestOptions, ingest
from flows.layouts import IngestError
from flows.snapshots import SnapshotNotFound, list_snapshots, load_dataset, resolve_snapshot
from flows.storage import StorageError, get_filesystem, mask_secrets, with_retries
from gan_core.data import load_builtin


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "store")


# -- built-ins: a snapshot must behave exactly like gan_core's data -----------------------------


@pytest.mark.parametrize("name", ["builtin:digits", "builtin:digits-unpaired"])
@pytest.mark.parametrize("size", [16, 8])
def test_builtin_snapshot_equals_load_builtin(name, size, root):
    for split in ("train", "test"):
        got = load_dataset(name, split, root=root, image_size=size)
        want = load_builtin(name, size, split)
        if name.endswith("unpaired"):
            torch.testing.assert_close(got.x.images, want.x.images, rtol=0, atol=0)
            torch.testing.assert_close(got.y.images, want.y.images, rtol=0, atol=0)
            torch.testing.assert_close(got.x_truth, want.x_truth, rtol=0, atol=0)
            assert torch.equal(got.x.labels, want.x.labels)
        else:
            torch.testing.assert_close(got.images, want.images, rtol=0, atol=0)
            assert torch.equal(got.labels, want.labels)
    manifests = list_snapshots(root)
    assert len(manifests) == 1 and manifests[0]["source"] == name
    # Same id through the name, and the ingest is a no-op the second time.
    assert resolve_snapshot(f"builtin-{name.split(':')[1]}", root)["id"] == manifests[0]["id"]


# -- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["classes", "flat", "cyclegan", "npz", "zip", "tar"])
def test_layouts_local(kind, tmp_path, root):
    folder, rel, layout = make_layout(kind, tmp_path / "raw")
    r = ingest(str(folder / rel) if rel else str(folder), root=root, name=kind)
    assert r["layout"] == layout and not r["quarantined"] and not r["reused"]
    train, test = load_dataset(kind, "train", root), load_dataset(kind, "test", root)
    if layout == "cyclegan":
        assert len(train.x) + len(train.y) + len(test.x) + len(test.y) == r["num_images"]
        assert train.x_truth is None and set(r["counts"]) == {"x", "y"}
        assert len(test.x) > 0 and len(test.y) > 0
    else:
        assert len(train) + len(test) == r["num_images"]
        assert (train.labels is None) == (layout == "flat")
        assert abs(len(test) / r["num_images"] - 0.2) < 0.1
    assert resolve_snapshot(r["id"], root)["num_images"] == r["num_images"]


def test_class_folders_pixels_labels_and_split(tmp_path, root):
    images, labels = digits(60)
    files = {f"{y}/{i:04d}.png": png(a) for i, (a, y) in enumerate(zip(images, labels))}
    r = ingest(str(write(tmp_path / "raw", files)), root=root, options=IngestOptions(image_size=8))
    m = resolve_snapshot(r["id"], root)
    assert m["channels"] == 1 and m["classes"] == [str(c) for c in range(10)]
    # Stratified: 20% of every class held out (rounded).
    for c, n in m["counts"].items():
        assert m["split_counts"]["test"][c] == round(n * 0.2)
    got = {}
    for split in ("train", "test"):
        ds = load_dataset(r["id"], split, root)
        for img, y in zip(ds.images, ds.labels):
            got.setdefault(int(y), []).append(img)
    # At the source size no resize happens: pixels are exactly x / 127.5 - 1.
    for c in range(10):
        want = torch.from_numpy(images[labels == c]).float().unsqueeze(1) / 127.5 - 1
        have = torch.stack(got[c])
        key = lambda t: tuple(t.flatten().tolist())  # noqa: E731
        assert sorted(map(key, have)) == sorted(map(key, want))


def test_npz_float_and_channels_first(tmp_path, root):
    images, labels = digits(40)
    x = (images[:, None].astype(np.float32) / 255.0).repeat(3, axis=1)  # [N, 3, 8, 8] in [0, 1]
    import io

    buf = io.BytesIO()
    np.savez(buf, images=x, labels=labels)
    r = ingest(str(write(tmp_path / "raw", {"a.npz": buf.getvalue()}) / "a.npz"), root=root)
    m = resolve_snapshot(r["id"], root)
    assert m["layout"] == "npz" and m["channels"] == 1 and m["num_images"] == 40


def test_channels_and_size_override(tmp_path, root):
    src = write(tmp_path / "raw", classes_files(20))
    r = ingest(str(src), root=root, options=IngestOptions(image_size=12, channels=3))
    ds = load_dataset(r["id"], "train", root)
    assert ds.images.shape[1:] == (3, 12, 12)
    assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_shrinking_is_antialiased(tmp_path, root):
    """Stripes 2 on / 2 off at 64 px average to mid-gray at 16 px. Plain bilinear samples
    between source pixels 4x+1 and 4x+2, both "on" here, and would store a white image."""
    stripes = np.where((np.arange(64) % 4 == 1) | (np.arange(64) % 4 == 2), 255, 0)
    arr = np.broadcast_to(stripes, (64, 64)).astype(np.uint8)
    src = write(tmp_path / "raw", {f"{i}.png": png(arr) for i in range(5)})
    r = ingest(str(src), root=root, options=IngestOptions(image_size=16, test_fraction=0.0))
    images = load_dataset(r["id"], "train", root).images
    assert images.shape == (5, 1, 16, 16)
    # Mid-gray everywhere (the filter is cut at the borders, so those are a little off).
    assert images[..., 1:-1].abs().max() < 0.01, images[0, 0, 0]
    assert images.abs().max() < 0.1, images[0, 0, 0]


def test_parallel_decode_shrinks_each_chunk_as_it_arrives(tmp_path):
    """With a finish step, results come back at the stored size in plan order whatever the
    number of workers, and quarantine reasons pass through untouched."""
    from flows.ingest import shrink
    from flows.layouts import decode_files

    big = [np.full((40, 30), i % 256, dtype=np.uint8) for i in range(300)]
    files = [(f"{i}.png", png(a)) for i, a in enumerate(big)] + [("bad.png", b"not a png")]
    for workers in (1, 2):
        out = decode_files(files, workers=workers, chunk_size=16, finish=lambda d: shrink(d, 8))
        assert isinstance(out[-1], str) and "not an image" in out[-1]
        for i, d in enumerate(out[:-1]):
            assert d.images[0].shape == (8, 8, 1) and d.images[0].dtype == np.float32
            np.testing.assert_allclose(d.images[0], i % 256 / 127.5 - 1, atol=1e-5)


def test_a_file_changed_mid_ingest_is_quarantined_and_the_spool_is_removed(
    tmp_path, root, monkeypatch
):
    """Bytes are hashed when read and re-read when decoded: a file that changed in between
    is quarantined (its hash is in the id), not silently decoded as different data. Archive
    members wait in a spool folder under GANFLOW_HOME/tmp that is gone afterwards."""
    src = write(tmp_path / "raw", classes_files(30))
    victim = sorted(src.rglob("*.png"))[0]
    original = ingest_mod.decode_plan

    def edit_then_decode(plan, *args):
        victim.write_bytes(png(np.zeros((8, 8), np.uint8)))
        return original(plan, *args)

    monkeypatch.setattr(ingest_mod, "decode_plan", edit_then_decode)
    r = ingest(str(src), root=root)
    rel = victim.relative_to(src).as_posix()
    assert r["quarantined"] == [{"path": rel, "reason": f"{rel}: changed while being ingested"}]
    assert r["num_images"] == 29
    monkeypatch.setattr(ingest_mod, "decode_plan", original)
    archive = tmp_path / "digits.zip"
    archive.write_bytes(zip_bytes(classes_files(20)))
    assert ingest(str(archive), root=root)["num_images"] == 20
    spool = Path(os.environ["GANFLOW_HOME"]) / "tmp"
    assert spool.is_dir() and list(spool.iterdir()) == []


# -- validation ---------------------------------------------------------------------------------


def test_corrupt_truncated_and_wrong_type_are_quarantined(tmp_path, root):
    files = classes_files(60)
    good = files["0/0000.png"]
    files["1/truncated.png"] = good[: len(good) // 2]
    files["2/garbage.png"] = b"\x89PNG not really"
    files["3/notes.txt"] = b"hello"
    gif = __import__("io").BytesIO()
    from PIL import Image

    Image.new("L", (8, 8)).save(gif, format="GIF")
    files["4/anim.gif"] = gif.getvalue()
    files[".DS_Store"] = b"ignored"
    src = write(tmp_path / "raw", files)
    r = ingest(str(src), root=root, options=IngestOptions(max_bad_fraction=0.2))
    reasons = {q["path"]: q["reason"] for q in r["quarantined"]}
    assert set(reasons) == {"1/truncated.png", "2/garbage.png", "3/notes.txt", "4/anim.gif"}
    assert "truncated" in reasons["1/truncated.png"] or "unreadable" in reasons["1/truncated.png"]
    assert "GIF" in reasons["4/anim.gif"]
    assert r["num_images"] == 60
    assert resolve_snapshot(r["id"], root)["quarantined"] == r["quarantined"]


def _no_snapshot(root):
    assert list_snapshots(root) == []


def test_bad_share_over_limit_fails_without_snapshot(tmp_path, root):
    files = {f"{i}.png": b"junk" for i in range(5)}
    files.update({f"ok{i}.png": png(a) for i, a in enumerate(digits(10)[0])})
    src = write(tmp_path / "raw", files)
    with pytest.raises(IngestError, match=r"5 of 15 files .* limit 10%"):
        ingest(str(src), root=root)
    _no_snapshot(root)


def test_nothing_usable_and_empty_source(tmp_path, root):
    src = write(tmp_path / "bad", {"a.png": b"x", "b.png": b"y"})
    with pytest.raises(IngestError, match="nothing usable"):
        ingest(str(src), root=root, options=IngestOptions(max_bad_fraction=1.0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="source is empty"):
        ingest(str(tmp_path / "empty"), root=root)
    with pytest.raises(IngestError, match="source not found"):
        ingest(str(tmp_path / "nope"), root=root)
    _no_snapshot(root)


def test_ambiguous_layout_is_an_error(tmp_path, root):
    files = classes_files(20)
    files["loose.png"] = files["0/0000.png"]
    src = write(tmp_path / "raw", files)
    with pytest.raises(IngestError, match="ambiguous layout.*--layout flat"):
        ingest(str(src), root=root)
    r = ingest(str(src), root=root, options=IngestOptions(layout="flat"))
    assert r["layout"] == "flat" and r["num_images"] == 21


@pytest.mark.parametrize(
    "archive",
    [
        ("slip.zip", lambda f: zip_bytes({**f, "../../evil.png": f["0/0000.png"]})),
        ("abs.zip", lambda f: zip_bytes({**f, "/tmp/evil.png": f["0/0000.png"]})),
        ("slip.tar.gz", lambda f: tar_bytes({**f, "a/../../evil.png": f["0/0000.png"]})),
        ("link.tar.gz", lambda f: tar_bytes(f, link="0/passwd.png")),
    ],
    ids=["zip-dotdot", "zip-absolute", "tar-dotdot", "tar-symlink"],
)
def test_archive_escapes_are_refused(archive, tmp_path, root):
    name, build = archive
    src = write(tmp_path / "raw", {name: build(classes_files(20))})
    with pytest.raises(IngestError, match="refused"):
        ingest(str(src / name), root=root)
    _no_snapshot(root)
    assert not (tmp_path / "evil.png").exists()


# -- atomicity and idempotency ------------------------------------------------------------------


def test_interrupted_write_leaves_no_snapshot_and_rerun_matches(tmp_path, monkeypatch):
    src = str(write(tmp_path / "raw", classes_files(60)))
    clean = ingest(src, root=str(tmp_path / "clean"))
    root = str(tmp_path / "store")
    real_put, calls = snapshots._put_bytes, []

    def failing_put(fs, path, data):
        calls.append(path)
        if len(calls) == 2:  # after the first shard: mid-write
            raise KeyboardInterrupt
        return real_put(fs, path, data)

    monkeypatch.setattr(snapshots, "_put_bytes", failing_put)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, root=root)
    assert any(p.endswith(".npz") for p in calls)
    _no_snapshot(root)
    with pytest.raises(SnapshotNotFound):
        resolve_snapshot(clean["id"], root)
    with pytest.raises(SnapshotNotFound):
        resolve_snapshot("raw", root)
    monkeypatch.setattr(snapshots, "_put_bytes", real_put)
    again = ingest(src, root=root)
    assert again["id"] == clean["id"] and not again["reused"]
    assert len(load_dataset("raw", "train", root)) == len(
        load_dataset(clean["id"], "train", str(tmp_path / "clean"))
    )


def test_reingest_is_a_noop_with_the_same_id(tmp_path, root, monkeypatch):
    src = write(tmp_path / "raw", classes_files(40))
    first = ingest(str(src), root=root)

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(ingest_mod, "decode_files", no_decoding)
    monkeypatch.setattr(ingest_mod, "fetch_source", no_decoding)
    second = ingest(str(src), root=root)
    assert second["id"] == first["id"] and second["reused"]
    # Touched files (new mtimes): read and hashed again, still no decoding, same id.
    monkeypatch.undo()
    monkeypatch.setattr(ingest_mod, "decode_files", no_decoding)
    later = time.time() + 10
    for p in src.rglob("*.png"):
        os.utime(p, (later, later))
    third = ingest(str(src), root=root)
    assert third["id"] == first["id"] and third["reused"]
    assert len(list_snapshots(root)) == 1


def test_id_ignores_names_and_paths(tmp_path, root):
    a = ingest(str(write(tmp_path / "a", classes_files(30))), root=root, name="first")
    renamed = {k.replace("/", "/renamed-"): v for k, v in classes_files(30).items()}
    b = ingest(str(write(tmp_path / "b", renamed)), root=root, name="second")
    assert a["id"] == b["id"] and b["reused"]
    c = ingest(str(tmp_path / "a"), root=root, options=IngestOptions(image_size=12))
    assert c["id"] != a["id"]


def test_name_resolves_to_latest(tmp_path, root):
    one = ingest(str(write(tmp_path / "v1", classes_files(20))), root=root, name="digits")
    two = ingest(str(write(tmp_path / "v2", classes_files(30))), root=root, name="digits")
    assert one["id"] != two["id"]
    assert resolve_snapshot("digits", root)["id"] == two["id"]
    assert resolve_snapshot(one["id"], root)["num_images"] == 20


def test_snapshot_not_found_is_one_line(root):
    with pytest.raises(SnapshotNotFound) as exc:
        resolve_snapshot("nope", root)
    assert "'nope'" in str(exc.value) and root in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_tampered_shard_is_detected(tmp_path, root):
    r = ingest(str(write(tmp_path / "raw", classes_files(20))), root=root)
    shard = next((tmp_path / "store" / r["id"]).glob("train-*.npz"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="does not match its manifest hash"):
        load_dataset(r["id"], "train", root)


def test_parallel_decode_matches_serial(tmp_path):
    files = [(f"{i}.png", png(a)) for i, a in enumerate(digits(300)[0])]
    from flows.layouts import decode_files

    serial = decode_files(files, workers=1)
    parallel = decode_files(files, workers=2)
    assert all(np.array_equal(s.images[0], p.images[0]) for s, p in zip(serial, parallel))


# -- storage ------------------------------------------------------------------------------------


def test_retries_transient_errors_with_backoff():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    assert with_retries(flaky, attempts=4, sleep=sleeps.append) == "ok"
    assert sleeps == [0.2, 0.4]

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, attempts=4, sleep=sleeps.append)
    assert len(calls) == 1  # not retried: it will not get better
    calls.clear()
    with pytest.raises(OSError):
        with_retries(
            lambda: (_ for _ in ()).throw(OSError("503 SlowDown")), attempts=3, sleep=lambda s: None
        )


def test_endpoint_precedence_and_secret_masking(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3specific:2")
    fs, path = get_filesystem("s3://bucket/prefix/")
    assert path == "bucket/prefix" and fs.endpoint_url == "http://s3specific:2"
    monkeypatch.setenv("GANFLOW_S3_ENDPOINT_URL", "http://explicit:3")
    assert get_filesystem("s3://b")[0].endpoint_url == "http://explicit:3"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sup3rs3cret")
    assert mask_secrets("key sup3rs3cret at s3://user:pw@host/x") == "key *** at s3://***@host/x"
    assert issubclass(StorageError, ValueError)


# -- command line -------------------------------------------------------------------------------


def test_cli_ingest_and_datasets_json(tmp_path, root, capsys):
    src = write(tmp_path / "raw", classes_files(30))
    assert main(["ingest", str(src), "--root", root, "--no-prefect", "--json", "--name", "d"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"id", "name", "num_images", "counts", "quarantined"} <= set(out)
    assert out["name"] == "d" and out["num_images"] == 30
    assert main(["datasets", "--root", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["id"] for s in listed["snapshots"]] == [out["id"]]
    assert listed["snapshots"][0]["source"] == str(src)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["ingest", "/definitely/not/here", "--no-prefect"], "source not found"),
        (["ingest", "builtin:nope", "--no-prefect"], "unknown built-in dataset"),
        (["ingest", "builtin:digits", "--no-prefect", "--name", "bad/name"], "snapshot name"),
    ],
)
def test_cli_errors_are_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err


def test_cli_surface():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    opts = {o for a in sub.choices["ingest"]._actions for o in a.option_strings}
    assert {"--name", "--layout", "--image-size", "--channels", "--json", "--root"} <= opts
    assert "datasets" in sub.choices
