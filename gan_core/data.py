"""Built-in datasets and the minibatch sampler.

Everything here ships with a package (scikit-learn's 1,797 labelled 8x8 digits), so nothing
is downloaded at run time. Images are float32 tensors shaped [N, C, H, W] in [-1, 1], or
rows stored on disk (:class:`StoredRows`, uint8 for 8-bit sources) that training reads by
index, a minibatch at a time; pixels become [-1, 1] per batch (:func:`to_unit`), on the
device the batch is for.

Resize rule (documented once, used everywhere): bilinear interpolation with
``align_corners=False`` from the source grid to ``image_size`` x ``image_size``.

Splits (``train``, ``val``, ``test``): stratified and fixed; test is 20% of every class, val
10% of the rest.

CycleGAN's built-in pair (``builtin:digits-unpaired``): each split's digits are divided into
two disjoint halves; domain X is the first half as-is, domain Y is the second half passed
through :func:`appearance_transform` (strokes thickened, then inverted). Because Y = T(X)
for a known T, translation quality is measurable against the truth on held-out digits.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf

BUILTIN_DATASETS = ("builtin:digits", "builtin:digits-unpaired")
SPLITS = ("train", "val", "test")
NUM_DIGIT_CLASSES = 10
_HELD_OUT_FRACTION = 0.2
_VAL_FRACTION = 0.1  # of each class's images left after the test split
_SPLIT_SEED = 0


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Stored pixels as float32 in [-1, 1]: uint8 x becomes x / 127.5 - 1 (the one pixel rule,
    the same expression ingest used when it stored floats); float pixels pass unchanged."""
    if pixels.dtype == torch.uint8:
        # In place on the new float copy: the same two float32 operations, one buffer.
        return pixels.float().div_(127.5).sub_(1.0)
    return pixels.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float pixels in [-1, 1] -> uint8, the inverse of :func:`to_unit` rounded to nearest:
    exact for pixels that came from 8-bit values (|error| < 1e-4 before rounding)."""
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


class StoredRows:
    """The rows [N, ...] of one array kept in ``.npy`` files (a split's shards, in order),
    read by index: the array is never loaded whole.

    Positional reads (``os.preadv`` straight into the batch), not a memory map: a mapped file
    counts in the process's resident memory as it is touched (an epoch of random minibatches
    touches all of it), while reads leave only the batch resident and the hot rows in the
    kernel's page cache, shared by every worker on the node. Thread-safe: a prefetch thread
    may read while the caller trains."""

    def __init__(self, paths: list[str]):
        if not paths:
            raise ValueError("StoredRows needs at least one .npy file")
        self.paths = list(paths)
        self._offsets: list[int] = []
        counts: list[int] = []
        row_shape = dtype = None
        for p in self.paths:
            with open(p, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dt = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dt = np.lib.format.read_array_header_2_0(f)
                offset = f.tell()
            if fortran or dt.hasobject or len(shape) < 1:
                raise ValueError(f"{p}: not a C-ordered numeric array")
            if row_shape is None:
                row_shape, dtype = tuple(shape[1:]), dt
            elif tuple(shape[1:]) != row_shape or dt != dtype:
                raise ValueError(f"{p}: rows {shape[1:]} {dt} differ from the first shard's")
            size = os.path.getsize(p)
            need = offset + int(np.prod(shape)) * dt.itemsize
            if size < need:
                raise ValueError(f"{p}: truncated ({size} of {need} bytes)")
            self._offsets.append(offset)
            counts.append(int(shape[0]))
        self.row_shape: tuple[int, ...] = row_shape
        self.np_dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.np_dtype.itemsize
        self._ends = np.cumsum(counts)
        self.shape = torch.Size((int(self._ends[-1]), *row_shape))
        self._fds: list[int] | None = None
        self._lock = threading.Lock()

    @property
    def dtype(self) -> torch.dtype:
        return torch.from_numpy(np.empty(0, self.np_dtype)).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self) -> list[int]:
        with self._lock:
            if self._fds is None:
                self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
            return self._fds

    def take(self, idx) -> torch.Tensor:
        """Rows idx (any int sequence or tensor, any order, repeats allowed) as a CPU tensor
        of the stored dtype."""
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} stored rows")
        out = np.empty((idx.size, *self.row_shape), dtype=self.np_dtype)
        if idx.size == 0:
            return torch.from_numpy(out)
        fds = self._open()
        shard = np.searchsorted(self._ends, idx, side="right")
        starts = np.concatenate([[0], self._ends[:-1]])
        flat = out.reshape(idx.size, -1).view(np.uint8)
        for j in range(idx.size):
            s = shard[j]
            pos = self._offsets[s] + (int(idx[j]) - int(starts[s])) * self.row_bytes
            got = os.preadv(fds[s], [flat[j]], pos)
            if got != self.row_bytes:
                raise ValueError(f"{self.paths[s]}: short read (file changed while in use?)")
        return torch.from_numpy(out)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            return self.take(range(*key.indices(len(self))))
        if isinstance(key, int):
            return self.take([key])[0]
        return self.take(key)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, None
        for fd in fds or ():
            os.close(fd)

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: os may be gone
            self.close()

    def __getstate__(self):
        # File descriptors do not travel: a copy reopens the files where it is used.
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])


Pixels = torch.Tensor | StoredRows


@dataclass(frozen=True)
class ImageSet:
    """Images [N, C, H, W] with optional int64 labels [N]. ``images`` is a tensor (float32 in
    [-1, 1], or uint8 read through :func:`to_unit`) or :class:`StoredRows` on the host, read a
    minibatch at a time."""

    images: Pixels
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def stored(self) -> bool:
        return isinstance(self.images, StoredRows)

    def to(self, device: torch.device | str) -> ImageSet:
        """Moved to device; stored rows stay on the host (training moves minibatches)."""
        labels = None if self.labels is None else self.labels.to(device)
        images = self.images if self.stored else self.images.to(device)
        return ImageSet(images, labels)


@dataclass(frozen=True)
class UnpairedSet:
    """CycleGAN data: two unpaired domains. ``x_truth`` is T(x) for every x (ground truth)."""

    x: ImageSet
    y: ImageSet
    x_truth: torch.Tensor | None = None

    @property
    def stored(self) -> bool:
        return self.x.stored or self.y.stored

    def to(self, device: torch.device | str) -> UnpairedSet:
        truth = self.x_truth
        if truth is not None and not isinstance(truth, StoredRows):
            truth = truth.to(device)
        return UnpairedSet(self.x.to(device), self.y.to(device), truth)


def spread(n: int, limit: int | None) -> torch.Tensor:
    """limit row indices spaced evenly over n rows (all of them when limit is None or >= n):
    a deterministic subset that spans every class of a split stored in class order."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.arange(limit, dtype=torch.int64) * n // limit


def _rows(images: Pixels, idx: torch.Tensor) -> torch.Tensor:
    if isinstance(images, StoredRows):
        return to_unit(images.take(idx))
    return to_unit(images[idx.to(images.device)])


def in_memory(data: ImageSet | UnpairedSet, limit: int | None = None) -> ImageSet | UnpairedSet:
    """float32 [-1, 1] tensors in memory, at most ``limit`` evenly spaced rows per set (per
    domain for CycleGAN, the truth following x): what evaluation and the judge work on."""
    if isinstance(data, UnpairedSet):
        ix = spread(len(data.x), limit)
        truth = None if data.x_truth is None else _rows(data.x_truth, ix)
        x = ImageSet(_rows(data.x.images, ix), _take_labels(data.x.labels, ix))
        return UnpairedSet(x, in_memory(data.y, limit), truth)
    idx = spread(len(data), limit)
    return ImageSet(_rows(data.images, idx), _take_labels(data.labels, idx))


def _take_labels(labels: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if labels is None else labels[idx.to(labels.device)]


def resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """The one resize rule: bilinear, align_corners=False, antialiased (when shrinking, the
    filter widens with the scale so every source pixel counts: plain bilinear would sample a
    2x2 patch per output pixel and alias; when enlarging it is plain bilinear).
    images: [N, C, h, w]."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    return nnf.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
    )


def appearance_transform(images: torch.Tensor) -> torch.Tensor:
    """Ground-truth X -> Y map: thicken strokes (3x3 max filter), then invert. [-1,1] in and out."""
    # At 8x8 a 3x3 max filter would swallow the digit, so the stroke is kept as is there.
    thick = (
        nnf.max_pool2d(images, kernel_size=3, stride=1, padding=1)
        if images.shape[-1] >= 12
        else images
    )
    return -thick


def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # [1797, 1, 8, 8], 0..16
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    return images / 8.0 - 1.0, labels


def _split_indices(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Deterministic stratified split, as sorted indices per split: in each class's seeded
    permutation, the first round(20% of n) are test, the next round(10% of the rest) val, the
    remainder train. Val takes no extra random draws, so test is the same as before val
    existed."""
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    out: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    for c in range(NUM_DIGIT_CLASSES):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * _HELD_OUT_FRACTION)
        n_val = round((len(idx) - n_test) * _VAL_FRACTION)
        out["test"].append(idx[:n_test])
        out["val"].append(idx[n_test : n_test + n_val])
        out["train"].append(idx[n_test + n_val :])
    return {s: torch.cat(parts).sort().values for s, parts in out.items()}


def load_digits(image_size: int = 16, split: str = "train") -> ImageSet:
    """scikit-learn's digits, resized to image_size, one channel. split: 'train', 'val' or
    'test' (disjoint, stratified: test 20% of each class, val 10% of the rest)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    images, labels = _digits_tensors()
    idx = _split_indices(labels)[split]
    return ImageSet(resize(images[idx], image_size).clamp(-1, 1).contiguous(), labels[idx])


def load_digits_unpaired(image_size: int = 16, split: str = "train") -> UnpairedSet:
    """Two disjoint halves of a digits split ('train', 'val' or 'test'): X as-is,
    Y = appearance_transform(other half)."""
    base = load_digits(image_size, split)
    n = len(base)
    # Alternate by position so both halves keep the class balance of the stratified split.
    x_idx = torch.arange(0, n, 2)
    y_idx = torch.arange(1, n, 2)
    x = ImageSet(base.images[x_idx], base.labels[x_idx])
    y = ImageSet(appearance_transform(base.images[y_idx]), base.labels[y_idx])
    return UnpairedSet(x, y, appearance_transform(x.images))


def load_builtin(name: str, image_size: int = 16, split: str = "train") -> ImageSet | UnpairedSet:
    """A built-in dataset's split ('train', 'val' or 'test') at image_size."""
    if name == "builtin:digits":
        return load_digits(image_size, split)
    if name == "builtin:digits-unpaired":
        return load_digits_unpaired(image_size, split)
    raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")


class MinibatchSampler:
    """Endless shuffled minibatches of m rows, each draw a fresh minibatch (Algorithm 1).

    Randomness comes only from its own torch.Generator, so its state (generator, current
    permutation, position) is checkpointed and a resumed run draws the same batches.
    ``rank``/``world_size`` shard each epoch's permutation for data-parallel training.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size > n // world_size:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {n // world_size} rows per worker"
            )
        self.n, self.batch_size = n, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    def _new_epoch(self) -> None:
        perm = torch.randperm(self.n, generator=self.generator)
        usable = (self.n // self.world_size) * self.world_size
        self._perm = perm[:usable][self.rank :: self.world_size]
        self._pos = 0

    def next_indices(self) -> torch.Tensor:
        if self._pos + self.batch_size > len(self._perm):
            self._new_epoch()
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "perm": self._perm.clone(),
            "pos": self._pos,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._perm = state["perm"].clone()
        self._pos = int(state["pos"])
