"""The snapshot manifest as a type (flows.snapshots.manifest): JSON round trip, manifests
written before it (with family_data) still load, malformed ones fail in one line naming the
snapshot and the key, and no module of flows builds a manifest as a dict."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from flows.snapshots.manifest import (
    Domains,
    FileRecord,
    Manifest,
    Quarantined,
    Shard,
    SnapshotOutdated,
    row_bytes,
)
from flows.snapshots.store import Store

ROOT = Path(__file__).resolve().parents[1]
SID = "0123456789abcdef0123"

# A manifest.json as the code before flows.snapshots.manifest wrote it (format 3, key order
# and family_data included): stored snapshots like it must keep loading.
OLD = {
    "format": 3,
    "id": SID,
    "name": "shoes",
    "source": "/data/shoes",
    "created": "2026-11-02T10:00:00Z",
    "kind": "images",
    "layout": "classes",
    "image_size": 32,
    "channels": 3,
    "pixels": "uint8",
    "preprocessing": {"image_size": 32, "channels": "auto", "resize_mode": "crop"},
    "num_images": 3,
    "counts": {"a": 2, "b": 1},
    "split_counts": {"train": {"a": 1, "b": 1}, "val": {}, "test": {"a": 1}},
    "family_data": "labelled",
    "classes": ["a", "b"],
    "domains": None,
    "has_truth": False,
    "files": [
        {"path": "a/1.png", "sha256": "e" * 64, "bytes": 10, "group": "a"},
        {"path": "a/2.png", "sha256": "f" * 64, "bytes": 9, "group": "a", "quarantined": "bad"},
    ],
    "quarantined": [{"path": "a/2.png", "reason": "bad"}],
    "shards": [
        {
            "file": "train-00000.images.npy",
            "split": "train",
            "part": "data",
            "array": "images",
            "shard": 0,
            "count": 2,
            "dtype": "|u1",
            "bytes": 6272,
            "sha256": "a" * 64,
        }
    ],
}


def _manifest(**changes) -> Manifest:
    base = dict(
        id=SID,
        name="pairs",
        source="builtin:digits-unpaired",
        kind="unpaired",
        layout="cyclegan",
        image_size=16,
        channels=1,
        pixels="uint8",
        preprocessing={"image_size": 16, "pixels": "uint8 0..255"},
        num_images=4,
        counts={"x": 2, "y": 2},
        split_counts={"train": {"x": 1, "y": 1}, "val": {}, "test": {"x": 1, "y": 1}},
        classes=[str(c) for c in range(10)],
        domains=Domains("digits", "appearance_transform(digits)"),
        has_truth=True,
        content_sha256="c" * 64,
        files=[FileRecord("x.png", "d" * 64, 5, "x")],
        quarantined=[Quarantined("y.txt", "not an image")],
        shards=[
            Shard("train-x-00000.images.npy", "train", "x", "images", 0, 1, "|u1", 384, "b" * 64)
        ],
        created="2026-12-01T00:00:00Z",
    )
    return Manifest(**{**base, **changes})


def test_round_trip_through_json():
    m = _manifest()
    again = Manifest.from_json(m.to_json(), SID)
    assert again == m and again.to_dict() == m.to_dict()
    assert isinstance(again.classes, tuple) and isinstance(again.shards[0], Shard)
    assert again.domains == Domains("digits", "appearance_transform(digits)")
    # Crosses into Ray tasks and Prefect stages by pickling.
    assert pickle.loads(pickle.dumps(m)) == m


def test_old_manifest_with_family_data_loads_and_keeps_its_content():
    m = Manifest.from_json(json.dumps(OLD, indent=1), SID)
    assert m.facts().kind == "labelled" and m.classes == ("a", "b")
    assert m.files[1].quarantined == "bad" and m.quarantined[0].reason == "bad"
    assert m.shards[0].count == 2 and m.shards[0].sha256 == "a" * 64
    # Written again: the same JSON but for the dropped family_data, in the same key order.
    want = {k: v for k, v in OLD.items() if k != "family_data"}
    assert list(m.to_dict().items()) == list(want.items())
    assert m.to_json() == json.dumps(want, indent=1)


def test_store_reads_an_old_manifest_on_disk(tmp_path):
    (tmp_path / SID).mkdir()
    (tmp_path / SID / "manifest.json").write_text(json.dumps(OLD, indent=1))
    store = Store(str(tmp_path))
    assert store.resolve(SID).num_images == 3
    assert [m.id for m in store.list()] == [SID]


@pytest.mark.parametrize("key", ["image_size", "shards", "split_counts", "name", "pixels"])
def test_missing_key_is_one_line_naming_snapshot_and_key(key):
    broken = {k: v for k, v in OLD.items() if k != key}
    with pytest.raises(ValueError) as exc:
        Manifest.from_json(json.dumps(broken), SID)
    text = str(exc.value)
    assert "\n" not in text and SID in text and repr(key) in text, text
    assert not isinstance(exc.value, SnapshotOutdated)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image_size", "32"),
        ("image_size", True),
        ("channels", 2),
        ("kind", "video"),
        ("classes", [1]),
    ],
)
def test_wrong_value_is_one_line_naming_the_key(key, value):
    with pytest.raises(ValueError) as exc:
        Manifest.from_json(json.dumps({**OLD, key: value}), SID)
    assert "\n" not in str(exc.value) and SID in str(exc.value) and key in str(exc.value)


def test_missing_key_in_a_shard_names_the_entry():
    shard = {k: v for k, v in OLD["shards"][0].items() if k != "sha256"}
    with pytest.raises(ValueError, match=r"lacks the key 'sha256' in shards\[0\]"):
        Manifest.from_json(json.dumps({**OLD, "shards": [shard]}), SID)


def test_manifest_under_another_id_is_refused():
    with pytest.raises(ValueError, match=f"snapshot {'f' * 20}: .*'id'.*not the id it is stored"):
        Manifest.from_json(json.dumps(OLD), "f" * 20)


def test_not_json_and_other_formats():
    with pytest.raises(ValueError, match=f"snapshot {SID}: manifest.json is not JSON"):
        Manifest.from_json("{", SID)
    with pytest.raises(SnapshotOutdated, match="format 2"):
        Manifest.from_json(json.dumps({**OLD, "format": 2}), SID)


def test_facts_and_row_bytes():
    f = _manifest().facts()
    assert (f.kind, f.image_size, f.channels, f.num_classes, f.has_truth, f.name) == (
        "unpaired",
        16,
        1,
        10,
        True,
        "pairs",
    )
    assert _manifest(kind="images", classes=None, domains=None).facts().kind == "unlabelled"
    # Images and truth are pixels, labels int64: what the writers cut shards by.
    assert row_bytes(3, 32, "uint8", ["images", "labels"]) == 3 * 32 * 32 + 8
    assert row_bytes(1, 16, "float32", ["images"]) == 16 * 16 * 4
    assert _manifest().row_bytes(["images", "labels", "truth"]) == 2 * 256 + 8


# Keys only a manifest (or a shard entry) has. A dict literal in flows holding one is a
# manifest built by hand: it must be a Manifest (or Shard) built in flows/snapshots/manifest.py.
MANIFEST_ONLY = {
    "num_images",
    "split_counts",
    "family_data",
    "has_truth",
    "shards",
    "domains",
    "content_sha256",
}
SHARD_KEYS = {"file", "split", "part", "array", "shard", "sha256"}


def test_no_manifest_is_built_as_a_dict_outside_manifest_py():
    found = []
    for path in sorted((ROOT / "flows").rglob("*.py")):
        if path == ROOT / "flows" / "snapshots" / "manifest.py":
            continue
        tree = ast.parse(path.read_text())
        # A typed result's own to_dict (the ingest result's JSON shares a few of a manifest's
        # key names) serialises its fields at an edge; it builds no manifest.
        edges = [
            range(f.lineno, (f.end_lineno or f.lineno) + 1)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == "to_dict"
        ]
        for node in ast.walk(tree):
            if any(getattr(node, "lineno", -1) in r for r in edges):
                continue
            keys: set[str] = set()
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
                keys = {k.arg for k in node.keywords if k.arg}
            if keys & MANIFEST_ONLY or len(keys & SHARD_KEYS) >= 3:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(keys)}")
    assert not found, "manifest built as a dict (use flows.snapshots.manifest): " + "; ".join(found)


def test_readers_use_attributes():
    """No manifest["key"] or manifest.get("key") left in flows: a typo'd key would be None or
    a KeyError at run time, where an attribute fails in the type checker and at once. (Only
    manifest.py reads the raw JSON.)"""
    found = []
    for path in sorted((ROOT / "flows").rglob("*.py")):
        if path == ROOT / "flows" / "snapshots" / "manifest.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "manifest[" in line or "manifest.get(" in line:
                found.append(f"{path.relative_to(ROOT)}:{i}")
    assert not found, "; ".join(found)
