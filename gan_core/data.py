"""Built-in datasets and the minibatch sampler.

Everything here ships with a package (scikit-learn's 1,797 labelled 8x8 digits), so nothing
is downloaded at run time. Images are float32 tensors shaped [N, C, H, W] in [-1, 1].

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

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

BUILTIN_DATASETS = ("builtin:digits", "builtin:digits-unpaired")
SPLITS = ("train", "val", "test")
NUM_DIGIT_CLASSES = 10
_HELD_OUT_FRACTION = 0.2
_VAL_FRACTION = 0.1  # of each class's images left after the test split
_SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageSet:
    """Images [N, C, H, W] float32 in [-1, 1], with optional int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> ImageSet:
        labels = None if self.labels is None else self.labels.to(device)
        return ImageSet(self.images.to(device), labels)


@dataclass(frozen=True)
class UnpairedSet:
    """CycleGAN data: two unpaired domains. ``x_truth`` is T(x) for every x (ground truth)."""

    x: ImageSet
    y: ImageSet
    x_truth: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> UnpairedSet:
        truth = None if self.x_truth is None else self.x_truth.to(device)
        return UnpairedSet(self.x.to(device), self.y.to(device), truth)


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
