"""Ingest on local storage, without Prefect: layouts, sizing (auto size, crop or stretch),
the train/val/test split, validation, archives, atomicity, idempotency, the built-in parity,
manifest formats, retries and the command line."""

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
    cyclegan_files,
    digits,
    make_layout,
    noise,
    png,
    tar_bytes,
    write,
    zip_bytes,
)
from PIL import Image

import flows.ingest.runner as ingest_mod
import flows.ingest.stages as stages_mod
import flows.snapshots.store as snapshots
from flows.cli import build_parser, main
from flows.ingest.layouts import IngestError
from flows.ingest.resolve import ensure_snapshot
from flows.ingest.runner import ingest
from flows.ingest.stages import IngestOptions, IngestResult, auto_image_size
from flows.snapshots.load import list_snapshots, load_dataset, resolve_snapshot
from flows.snapshots.store import SnapshotNotFound, SnapshotOutdated
from flows.storage import StorageError, get_filesystem, mask_secrets, with_retries
from gan_core.data import load_builtin, to_uint8, to_unit


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "store")


# -- built-ins: a snapshot must behave exactly like gan_core's data -----------------------------


def _same_in_8_bits(got, want):
    # Stored in 8 bits: exactly load_builtin rounded to the nearest 8-bit value, so within
    # half a step (0.5 / 127.5) of it.
    torch.testing.assert_close(got, to_unit(to_uint8(want)), rtol=0, atol=0)
    assert (got - want).abs().max() <= 0.5 / 127.5 + 1e-6


@pytest.mark.parametrize("name", ["builtin:digits", "builtin:digits-unpaired"])
@pytest.mark.parametrize("size", [16, 8])
def test_builtin_snapshot_equals_load_builtin(name, size, root):
    sid = ensure_snapshot(name, root, image_size=size).id
    for split in ("train", "val", "test"):
        got = load_dataset(sid, split, root=root, image_size=size)
        want = load_builtin(name, size, split)
        if name.endswith("unpaired"):
            _same_in_8_bits(got.x.images, want.x.images)
            _same_in_8_bits(got.y.images, want.y.images)
            _same_in_8_bits(got.x_truth, want.x_truth)
            assert torch.equal(got.x.labels, want.x.labels)
        else:
            _same_in_8_bits(got.images, want.images)
            assert torch.equal(got.labels, want.labels)
    manifests = list_snapshots(root)
    assert len(manifests) == 1 and manifests[0].source == name
    m = manifests[0]
    assert m.facts().kind == ("unpaired" if name.endswith("unpaired") else "labelled")
    assert m.classes == tuple(str(c) for c in range(10)) and m.image_size == size
    assert set(m.split_counts) == {"train", "val", "test"}
    # Same id through the name, and the ingest is a no-op the second time.
    assert resolve_snapshot(f"builtin-{name.split(':')[1]}", root).id == manifests[0].id


# -- layouts ------------------------------------------------------------------------------------


FAMILY_DATA = {"classes": "labelled", "flat": "unlabelled", "cyclegan": "unpaired"}


@pytest.mark.parametrize("kind", ["classes", "flat", "cyclegan", "npz", "zip", "tar"])
def test_layouts_local(kind, tmp_path, root):
    folder, rel, layout = make_layout(kind, tmp_path / "raw")
    r = ingest(str(folder / rel) if rel else str(folder), root=root, name=kind)
    assert isinstance(r, IngestResult)  # a value with attributes, not a dict of keys
    assert r.layout == layout and not r.quarantined and not r.reused
    assert r.image_size == 8  # the digits' own resolution
    splits = {s: load_dataset(kind, s, root) for s in ("train", "val", "test")}
    if layout == "cyclegan":
        assert sum(len(d.x) + len(d.y) for d in splits.values()) == r.num_images
        assert splits["train"].x_truth is None and set(r.counts) == {"x", "y"}
        assert all(len(d.x) > 0 and len(d.y) > 0 for d in splits.values())
    else:
        assert sum(len(d) for d in splits.values()) == r.num_images
        assert (splits["train"].labels is None) == (layout == "flat")
        assert abs(len(splits["test"]) / r.num_images - 0.2) < 0.1
        assert abs(len(splits["val"]) / r.num_images - 0.1) < 0.1
    m = resolve_snapshot(r.id, root)
    assert m.num_images == r.num_images
    assert m.facts().kind == FAMILY_DATA.get(layout, "labelled")  # npz: with labels


def test_class_folders_pixels_labels_and_split(tmp_path, root):
    images, labels = digits(60)
    files = {f"{y}/{i:04d}.png": png(a) for i, (a, y) in enumerate(zip(images, labels))}
    r = ingest(str(write(tmp_path / "raw", files)), root=root)
    m = resolve_snapshot(r.id, root)
    assert m.channels == 1 and m.classes == tuple(str(c) for c in range(10))
    assert m.image_size == 8 and m.facts().kind == "labelled"
    # Stratified: 20% of every class is test, the next 10% val (rounded cumulatively).
    for c, n in m.counts.items():
        assert m.split_counts["test"][c] == round(n * 0.2)
        assert m.split_counts["val"].get(c, 0) == round(n * 0.3) - round(n * 0.2)
    got = {}
    for split in ("train", "val", "test"):
        ds = load_dataset(r.id, split, root)
        for img, y in zip(ds.images, ds.labels):
            got.setdefault(int(y), []).append(img)
    # At the source size (the default) no resize happens: pixels are exactly x / 127.5 - 1.
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
    m = resolve_snapshot(r.id, root)
    assert m.layout == "npz" and m.channels == 1 and m.num_images == 40


def test_channels_and_size_override(tmp_path, root):
    src = write(tmp_path / "raw", classes_files(20))
    r = ingest(str(src), root=root, options=IngestOptions(image_size=12, channels=3))
    ds = load_dataset(r.id, "train", root)
    assert ds.images.shape[1:] == (3, 12, 12)
    assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_shrinking_is_antialiased(tmp_path, root):
    """Stripes 2 on / 2 off at 64 px average to mid-gray at 16 px. Plain bilinear samples
    between source pixels 4x+1 and 4x+2, both "on" here, and would store a white image."""
    stripes = np.where((np.arange(64) % 4 == 1) | (np.arange(64) % 4 == 2), 255, 0)
    arr = np.broadcast_to(stripes, (64, 64)).astype(np.uint8)
    src = write(tmp_path / "raw", {f"{i}.png": png(arr) for i in range(5)})
    options = IngestOptions(image_size=16, test_fraction=0.0, val_fraction=0.0)
    r = ingest(str(src), root=root, options=options)
    images = load_dataset(r.id, "train", root).images
    assert images.shape == (5, 1, 16, 16)
    # Mid-gray everywhere (the filter is cut at the borders, so those are a little off).
    assert images[..., 1:-1].abs().max() < 0.01, images[0, 0, 0]
    assert images.abs().max() < 0.1, images[0, 0, 0]


# -- sizing: the source's resolution, center crop or stretch -----------------------------------


def _stored(sid: str, root) -> np.ndarray:
    """All stored images of a one-split snapshot as [n, h, w, c] in [-1, 1]."""
    return load_dataset(sid, "train", root).images.permute(0, 2, 3, 1).numpy()


def _reference(arr: np.ndarray, box=None, size=None) -> np.ndarray:
    """Pillow's crop (box) and bilinear resize, as [h, w, c] in [-1, 1]."""
    img = Image.fromarray(arr)
    img = img.crop(box) if box else img
    img = img.resize((size, size), Image.Resampling.BILINEAR) if size else img
    return np.asarray(img).astype(np.float32) / 127.5 - 1


ALL_TRAIN = {"test_fraction": 0.0, "val_fraction": 0.0}


def test_non_square_rgb_is_center_cropped_at_its_native_size(tmp_path, root):
    """48x32 landscape and 32x48 portrait RGB images: the shorter side, 32, is the default
    size; each is stored as its centered 32x32 square, pixel for pixel (no resize at all)."""
    wide = [noise(32, 48, seed=i) for i in range(3)]
    tall = [noise(48, 32, seed=10 + i) for i in range(2)]
    files = {f"w{i}.png": png(a) for i, a in enumerate(wide)}
    files.update({f"x{i}.png": png(a) for i, a in enumerate(tall)})
    src = str(write(tmp_path / "raw", files))
    r = ingest(src, root=root, options=IngestOptions(**ALL_TRAIN))
    m = resolve_snapshot(r.id, root)
    assert m.image_size == 32 and m.channels == 3 and m.facts().kind == "unlabelled"
    assert m.preprocessing["resize_mode"] == "crop"
    got = _stored(r.id, root)  # in path order: w0..w2, x0, x1
    want = [_reference(a, (8, 0, 40, 32)) for a in wide]  # (left, top, right, bottom)
    want += [_reference(a, (0, 8, 32, 40)) for a in tall]
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=1e-6)
    # Crop then shrink: Pillow's bilinear (antialiased too) within one gray level.
    small = ingest(src, root=root, options=IngestOptions(image_size=16, **ALL_TRAIN))
    want16 = [_reference(a, (8, 0, 40, 32), 16) for a in wide]
    np.testing.assert_allclose(_stored(small.id, root)[:3], np.stack(want16), atol=1.01 / 127.5)


def test_stretch_keeps_the_whole_image_and_is_another_snapshot(tmp_path, root, capsys):
    wide = [noise(32, 48, seed=i) for i in range(3)]
    src = str(write(tmp_path / "raw", {f"w{i}.png": png(a) for i, a in enumerate(wide)}))
    crop = ingest(src, root=root, options=IngestOptions(**ALL_TRAIN))
    argv = ["ingest", src, "--root", root, "--no-prefect", "--json", "--resize", "stretch"]
    assert main([*argv, "--test-fraction", "0", "--val-fraction", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["id"] != crop.id and out["image_size"] == 32
    stretched = _stored(out["id"], root)
    assert np.abs(stretched - _stored(crop.id, root)).mean() > 0.1
    want = np.stack([_reference(a, size=32) for a in wide])  # 48 -> 32 across, 32 kept down
    np.testing.assert_allclose(stretched, want, atol=1.01 / 127.5)
    assert resolve_snapshot(out["id"], root).preprocessing["resize_mode"] == "stretch"


def test_auto_size_rule():
    one = lambda h, w, n=1: (n, h, w)  # noqa: E731 (header dims: images, height, width)
    assert auto_image_size([one(24, 24)] * 3 + [one(20, 40)] * 2) == 24  # most common
    assert auto_image_size([one(24, 24)] * 2 + [one(40, 20)] * 2) == 20  # tie: the smaller
    assert auto_image_size([one(64, 64)] * 2 + [one(32, 32, n=5)]) == 32  # npz: per image
    assert auto_image_size([one(300, 300), one(300, 400), None]) == 256  # capped; None skipped
    assert auto_image_size([one(4, 4)]) == 8  # training's smallest size
    assert auto_image_size([None]) == 16


def test_mixed_sizes_follow_the_rule(tmp_path, root):
    """Three 24x24 images and two 20x40: stored at 24; the 20x40 ones are cropped to their
    centered 20x20 and enlarged."""
    files = {f"a{i}.png": png(noise(24, 24, seed=i, channels=1)) for i in range(3)}
    files.update({f"b{i}.png": png(noise(20, 40, seed=9 + i, channels=1)) for i in range(2)})
    r = ingest(str(write(tmp_path / "raw", files)), root=root, options=IngestOptions(**ALL_TRAIN))
    assert r.image_size == 24 and r.channels == 1
    got = _stored(r.id, root)
    np.testing.assert_allclose(
        got[:3, :, :, 0], np.stack([noise(24, 24, i, 1) / 127.5 - 1 for i in range(3)]), atol=1e-6
    )
    crop = torch.from_numpy(noise(20, 40, 9, 1)[:, 10:30] / 127.5 - 1).float()[None, None]
    from gan_core.data import resize

    # Resized pixels are stored rounded to the nearest 8-bit value.
    np.testing.assert_allclose(
        got[3, :, :, 0], resize(crop, 24)[0, 0].numpy(), atol=0.5 / 127.5 + 1e-6
    )


def test_large_images_are_capped_at_256_unless_asked(tmp_path, root):
    files = {f"{i}.png": png(noise(300, 300, seed=i)) for i in range(2)}
    src = str(write(tmp_path / "raw", files))
    r = ingest(src, root=root, options=IngestOptions(**ALL_TRAIN))
    assert r.image_size == 256 and _stored(r.id, root).shape == (2, 256, 256, 3)
    explicit = ingest(src, root=root, options=IngestOptions(image_size=300, **ALL_TRAIN))
    assert explicit.image_size == 300 and explicit.id != r.id


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"image_size": 4}, "image_size: must be an integer in 8..512"),
        ({"image_size": 1024}, "image_size: must be an integer in 8..512"),
        ({"resize_mode": "pad"}, "resize_mode: must be one of crop, stretch"),
        ({"test_fraction": 0.6, "val_fraction": 0.4}, "test_fraction \\+ val_fraction < 1"),
        ({"val_fraction": -0.1}, "val_fraction: must be in"),
    ],
)
def test_options_are_checked(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        IngestOptions(**kwargs)


def test_cli_image_size_range(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "x", "--image-size", "4"])
    assert "must be auto or an integer in 8..512" in capsys.readouterr().err
    args = build_parser().parse_args(["ingest", "x", "--image-size", "auto"])
    assert args.image_size is None and args.resize == "crop" and args.val_fraction == 0.1


# -- the val split ------------------------------------------------------------------------------


def _keys(images: torch.Tensor) -> set[tuple]:
    return {tuple(t.flatten().tolist()) for t in images}


def test_val_split_is_disjoint_stratified_and_stable(tmp_path, root):
    images, labels = digits(200)
    files = {f"{y}/{i:04d}.png": png(a) for i, (a, y) in enumerate(zip(images, labels))}
    r = ingest(str(write(tmp_path / "raw", files)), root=root)
    sets = {s: load_dataset(r.id, s, root) for s in ("train", "val", "test")}
    keys = {s: _keys(d.images) for s, d in sets.items()}
    assert sum(map(len, keys.values())) == 200  # the 200 digits are distinct images
    assert not keys["val"] & keys["train"] and not keys["val"] & keys["test"]
    assert not keys["train"] & keys["test"]
    m = resolve_snapshot(r.id, root)
    for c, n in m.counts.items():  # every class of ~20 gives its ~2 val images
        assert m.split_counts["val"][c] == round(n * 0.3) - round(n * 0.2) >= 1
    assert torch.bincount(sets["val"].labels, minlength=10).min() >= 1
    # Stable: renamed files in another order, another store: the same images in every split.
    renamed = {
        f"{k.split('/')[0]}/z{len(files) - i}.png": v for i, (k, v) in enumerate(files.items())
    }
    other = str(tmp_path / "other")
    again = ingest(str(write(tmp_path / "renamed", renamed)), root=other)
    assert again.id == r.id
    for s in ("train", "val", "test"):
        assert _keys(load_dataset(again.id, s, other).images) == keys[s]
    # Test does not move with val_fraction; val grows from the same start of the hash order.
    more = ingest(str(tmp_path / "raw"), root=root, options=IngestOptions(val_fraction=0.2))
    assert _keys(load_dataset(more.id, "test", root).images) == keys["test"]
    assert keys["val"] < _keys(load_dataset(more.id, "val", root).images)
    none = ingest(str(tmp_path / "raw"), root=root, options=IngestOptions(val_fraction=0.0))
    assert len(load_dataset(none.id, "val", root)) == 0
    assert resolve_snapshot(none.id, root).split_counts["val"] == {}


def test_cyclegan_val_comes_out_of_train_folders(tmp_path, root):
    """trainA/trainB hold 15 images each, testA/testB 5: test stays the given 5, val is
    round(15 * 0.1) = 2 of each domain's train images."""
    r = ingest(str(write(tmp_path / "raw", cyclegan_files(40))), root=root)
    assert r.split_counts == {
        "train": {"x": 13, "y": 13},
        "val": {"x": 2, "y": 2},
        "test": {"x": 5, "y": 5},
    }
    train, val = load_dataset(r.id, "train", root), load_dataset(r.id, "val", root)
    assert len(val.x) == len(val.y) == 2
    assert not _keys(val.x.images) & _keys(train.x.images)
    shards = {s.split for s in resolve_snapshot(r.id, root).shards}
    assert shards == {"train", "val", "test"}


# -- manifest formats ---------------------------------------------------------------------------


def test_older_format_is_refused_in_one_line(tmp_path, root):
    src = str(write(tmp_path / "raw", classes_files(20)))
    r = ingest(src, root=root, name="old")
    path = Path(root) / r.id / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format": 1}))
    want = (
        f"snapshot {r.id} (old) was written by an older ganflow (format 1); "
        f"re-ingest its source: ganflow ingest {src} --name old"
    )
    for call in (
        lambda: resolve_snapshot(r.id, root),
        lambda: resolve_snapshot("old", root),
        lambda: load_dataset("old", "train", root),
    ):
        with pytest.raises(SnapshotOutdated) as exc:
            call()
        assert str(exc.value) == want
    assert isinstance(exc.value, ValueError)


def test_parallel_decode_shrinks_each_chunk_as_it_arrives(tmp_path):
    """With a finish step, results come back at the stored size in plan order whatever the
    number of workers, and quarantine reasons pass through untouched."""
    from flows.ingest.layouts import decode_files
    from flows.ingest.stages import shrink

    big = [np.full((40, 30), i % 256, dtype=np.uint8) for i in range(300)]
    files = [(f"{i}.png", png(a)) for i, a in enumerate(big)] + [("bad.png", b"not a png")]
    for workers in (1, 2):
        out = decode_files(files, workers=workers, chunk_size=16, finish=lambda d: shrink(d, 8))
        assert isinstance(out[-1], str) and "not an image" in out[-1]
        for i, d in enumerate(out[:-1]):
            # 8-bit in, 8-bit out: a flat image stays its exact value at any size.
            assert d.images[0].shape == (8, 8, 1) and d.images[0].dtype == np.uint8
            assert (d.images[0] == i % 256).all()


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
    assert r.to_dict()["quarantined"] == [
        {"path": rel, "reason": f"{rel}: changed while being ingested"}
    ]
    assert r.num_images == 29
    monkeypatch.setattr(ingest_mod, "decode_plan", original)
    archive = tmp_path / "digits.zip"
    archive.write_bytes(zip_bytes(classes_files(20)))
    assert ingest(str(archive), root=root).num_images == 20
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
    reasons = {q.path: q.reason for q in r.quarantined}
    assert set(reasons) == {"1/truncated.png", "2/garbage.png", "3/notes.txt", "4/anim.gif"}
    assert "truncated" in reasons["1/truncated.png"] or "unreadable" in reasons["1/truncated.png"]
    assert "GIF" in reasons["4/anim.gif"]
    assert r.num_images == 60
    assert resolve_snapshot(r.id, root).quarantined == r.quarantined


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
    assert r.layout == "flat" and r.num_images == 21


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
    assert any(p.endswith(".npy") for p in calls)
    _no_snapshot(root)
    with pytest.raises(SnapshotNotFound):
        resolve_snapshot(clean.id, root)
    with pytest.raises(SnapshotNotFound):
        resolve_snapshot("raw", root)
    monkeypatch.setattr(snapshots, "_put_bytes", real_put)
    again = ingest(src, root=root)
    assert again.id == clean.id and not again.reused
    assert len(load_dataset("raw", "train", root)) == len(
        load_dataset(clean.id, "train", str(tmp_path / "clean"))
    )


def test_reingest_is_a_noop_with_the_same_id(tmp_path, root, monkeypatch):
    src = write(tmp_path / "raw", classes_files(40))
    first = ingest(str(src), root=root)

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(stages_mod, "decode_files", no_decoding)
    monkeypatch.setattr(ingest_mod, "fetch_source", no_decoding)
    second = ingest(str(src), root=root)
    assert second.id == first.id and second.reused
    # Touched files (new mtimes): read and hashed again, still no decoding, same id.
    monkeypatch.undo()
    monkeypatch.setattr(stages_mod, "decode_files", no_decoding)
    later = time.time() + 10
    for p in src.rglob("*.png"):
        os.utime(p, (later, later))
    third = ingest(str(src), root=root)
    assert third.id == first.id and third.reused
    assert len(list_snapshots(root)) == 1


def test_id_ignores_names_and_paths(tmp_path, root):
    a = ingest(str(write(tmp_path / "a", classes_files(30))), root=root, name="first")
    renamed = {k.replace("/", "/renamed-"): v for k, v in classes_files(30).items()}
    b = ingest(str(write(tmp_path / "b", renamed)), root=root, name="second")
    assert a.id == b.id and b.reused
    c = ingest(str(tmp_path / "a"), root=root, options=IngestOptions(image_size=12))
    assert c.id != a.id
    # Auto resolved to the digits' 8 px is the same data, hence the same id, as an explicit 8.
    d = ingest(str(tmp_path / "a"), root=root, options=IngestOptions(image_size=8))
    assert d.id == a.id and d.reused


def test_name_resolves_to_latest(tmp_path, root):
    one = ingest(str(write(tmp_path / "v1", classes_files(20))), root=root, name="digits")
    two = ingest(str(write(tmp_path / "v2", classes_files(30))), root=root, name="digits")
    assert one.id != two.id
    assert resolve_snapshot("digits", root).id == two.id
    assert resolve_snapshot(one.id, root).num_images == 20


def test_snapshot_not_found_is_one_line(root):
    with pytest.raises(SnapshotNotFound) as exc:
        resolve_snapshot("nope", root)
    assert "'nope'" in str(exc.value) and root in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_tampered_shard_is_detected(tmp_path, root):
    r = ingest(str(write(tmp_path / "raw", classes_files(20))), root=root)
    shard = next((tmp_path / "store" / r.id).glob("train-*.images.npy"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="does not match its manifest hash"):
        load_dataset(r.id, "train", root)


def test_parallel_decode_matches_serial(tmp_path):
    files = [(f"{i}.png", png(a)) for i, a in enumerate(digits(300)[0])]
    from flows.ingest.layouts import decode_files

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
    assert {"--resize", "--val-fraction", "--test-fraction"} <= opts
    assert "datasets" in sub.choices
