"""Small raw datasets in every layout ingest accepts, built from scikit-learn's digits."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n digits as uint8 [n, 8, 8] (0..255, multiples of 8 apart: lossless in PNG) and labels."""
    from sklearn.datasets import load_digits

    b = load_digits()
    images = (b.images[:n] * 15).astype(np.uint8)  # 0..16 -> 0..240
    return images, b.target[:n].astype(np.int64)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def noise(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    """Random uint8 pixels [height, width, channels] (or [height, width] for 1): every pixel
    differs from its neighbours, so a crop off by one pixel shows."""
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def classes_files(n: int = 60) -> dict[str, bytes]:
    images, labels = digits(n)
    out = {}
    for i, (a, y) in enumerate(zip(images, labels)):
        out[f"{y}/{i:04d}.{'jpg' if i % 10 == 9 else 'png'}"] = jpeg(a) if i % 10 == 9 else png(a)
    return out


def flat_files(n: int = 30) -> dict[str, bytes]:
    images, _ = digits(n)
    return {f"img{i:04d}.png": png(a) for i, a in enumerate(images)}


def cyclegan_files(n: int = 40) -> dict[str, bytes]:
    images, _ = digits(n)
    out = {}
    for i, a in enumerate(images):
        folder = ("train" if i < n * 3 // 4 else "test") + ("A" if i % 2 == 0 else "B")
        arr = a if folder.endswith("A") else (255 - a)
        out[f"{folder}/{i:04d}.png"] = png(arr)
    return out


def npz_files(n: int = 50) -> dict[str, bytes]:
    images, labels = digits(n)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    return {"digits.npz": buf.getvalue()}


def zip_bytes(files: dict[str, bytes], wrapper: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, data in files.items():
            zf.writestr(wrapper + rel, data)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes], wrapper: str = "", link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo(wrapper + rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    return buf.getvalue()


LAYOUTS = {
    # name: (files builder, source path inside the dataset folder or "" for the folder, layout)
    "classes": (classes_files, "", "classes"),
    "flat": (flat_files, "", "flat"),
    "cyclegan": (cyclegan_files, "", "cyclegan"),
    "npz": (npz_files, "digits.npz", "npz"),
    "zip": (lambda: {"data.zip": zip_bytes(classes_files(), "data/")}, "data.zip", "classes"),
    "tar": (lambda: {"cg.tar.gz": tar_bytes(cyclegan_files())}, "cg.tar.gz", "cyclegan"),
}


def make_layout(kind: str, root: Path) -> tuple[Path, str, str]:
    """Write one layout under root; (folder written, relative source path, expected layout)."""
    build, rel, layout = LAYOUTS[kind]
    write(root, build())
    return root, rel, layout


def upload(local: Path, fs, remote: str) -> None:
    for dirpath, _, names in os.walk(local):
        for name in names:
            p = Path(dirpath) / name
            fs.pipe_file(f"{remote}/{p.relative_to(local).as_posix()}", p.read_bytes())


def snapshot_for(ref: str, cfg):
    """The dataset ref as a snapshot in the current GANFLOW_HOME's store, at cfg's image size:
    what the commands resolve before run_training / run_search, which take it resolved."""
    from flows.ingest.resolve import ensure_snapshot

    return ensure_snapshot(ref, image_size=cfg.data.image_size)


def search_request(family: str, ref: str, base, space: dict, **options):
    """A SearchRequest for ``family`` on the dataset ref, resolved as the commands resolve it
    (snapshot_for), with ``options`` as SearchRequest's keyword fields."""
    from flows.tune.search import SearchRequest

    return SearchRequest(family, snapshot_for(ref, base), base, space, **options)
