"""A small digits classifier that ganflow trains itself.

It is the feature space of the Fréchet distance in :mod:`gan_core.metrics` and the judge of
label checks (cGAN class accuracy, CycleGAN label preservation). Training it here, instead of
downloading Inception weights, keeps evaluation offline and matched to the 8-32 px digits.

It is trained on both appearances of the train split (domain X digits and their
``appearance_transform``), so the same network scores CycleGAN's domain Y and G(x).
Weights are cached as safetensors, never as pickles.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file, save_file
from torch import nn

from gan_core.data import NUM_DIGIT_CLASSES, appearance_transform, load_digits

FEATURE_DIM = 64
# Bump when the architecture or training recipe changes, so stale caches are not reused.
_CACHE_VERSION = 2
_EPOCHS = 10
_BATCH_SIZE = 64
_LEARNING_RATE = 2e-3
_MAX_SHIFT_PX = 1


class DigitClassifier(nn.Module):
    """CNN for [N, C, S, S] images in [-1, 1], any S >= 8 (digits by default: C = 1, 10 classes;
    :mod:`gan_core.judge` trains it on any snapshot).

    No BatchNorm or dropout, so train() and eval() compute the same function and the
    metrics do not depend on the module's mode.
    """

    def __init__(
        self,
        feature_dim: int = FEATURE_DIM,
        num_classes: int = NUM_DIGIT_CLASSES,
        channels: int = 1,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim]: the Fréchet-distance feature space."""
        # Pooling to fixed 8x8 then 4x4 grids lets one architecture serve every image_size,
        # and keeps the 16->32 conv at 8x8 (at 32 px it would otherwise cost 16x more).
        h = nnf.adaptive_max_pool2d(nnf.relu(self.conv1(x)), 8)  # [N, 16, 8, 8]
        h = nnf.adaptive_max_pool2d(nnf.relu(self.conv2(h)), 4)  # [N, 32, 4, 4]
        h = nnf.relu(self.conv3(h))  # [N, 64, 4, 4]
        return nnf.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(x))


def _random_shift(images: torch.Tensor, max_px: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer number of pixels in [-max_px, max_px] per axis.

    Border padding repeats the edge, which is background in both appearances (dark for X,
    light for Y), so a shift never paints a wrong-coloured frame.
    """
    n, _, h, w = images.shape
    shifts = torch.randint(-max_px, max_px + 1, (n, 2), generator=generator).to(images.dtype)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    # affine_grid works in [-1, 1] coordinates, where one pixel is 2 / size.
    theta[:, 0, 2] = shifts[:, 0] * 2.0 / w
    theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
    grid = nnf.affine_grid(theta, list(images.shape), align_corners=False)
    return nnf.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)


def _both_appearances(
    images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([images, appearance_transform(images)]), torch.cat([labels, labels])


def train_digit_classifier(image_size: int, seed: int = 0) -> DigitClassifier:
    """Train on the train split in both appearances; deterministic for a given seed.

    Bit-identical reruns need the same torch build and thread count (float summation order
    differs between them); load_or_train_classifier caches the result for that reason too.
    Runs on CPU: a few seconds on one core at 16 px. The global RNG is forked, so calling this does
    not change the random stream of the caller. Returns the model in eval mode.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    data = load_digits(image_size, "train")
    images, labels = _both_appearances(data.images, data.labels)
    n = images.shape[0]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter init draws from the (forked) global RNG
        model = DigitClassifier()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=_LEARNING_RATE)
        steps_per_epoch = (n + _BATCH_SIZE - 1) // _BATCH_SIZE
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=_LEARNING_RATE, total_steps=_EPOCHS * steps_per_epoch
        )
        model.train()
        for _ in range(_EPOCHS):
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, _BATCH_SIZE):
                idx = perm[start : start + _BATCH_SIZE]
                batch = _random_shift(images[idx], _MAX_SHIFT_PX, generator)
                loss = nnf.cross_entropy(model(batch), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def classifier_cache_path(image_size: int, cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    return (
        Path(cache_dir) / f"digit_classifier_s{image_size}_seed{seed}_v{_CACHE_VERSION}.safetensors"
    )


def load_or_train_classifier(
    image_size: int, cache_dir: str | os.PathLike, seed: int = 0
) -> DigitClassifier:
    """Load cached weights for (image_size, seed), or train and cache them. Eval mode, CPU."""
    path = classifier_cache_path(image_size, cache_dir, seed)
    if path.exists():
        model = DigitClassifier()
        # safetensors holds only tensors: loading cannot execute code, unlike torch.load.
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except (RuntimeError, OSError, ValueError):
            pass  # a stale or damaged cache file is retrained and replaced, not trusted

    model = train_digit_classifier(image_size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target then rename: concurrent workers (Ray trials) sharing a cache
    # see either no file or a complete one, never a half-written one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer; CPU for a stateless module."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def predict(clf: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes [N] (int64, on CPU), batched to bound memory."""
    device = module_device(clf)
    preds = [
        clf(images[i : i + batch_size].to(device)).argmax(dim=1)
        for i in range(0, images.shape[0], batch_size)
    ]
    if not preds:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(preds).cpu()  # the one device sync, after all batches are queued


def classifier_accuracy(clf: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose predicted class equals labels."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"need matching, non-empty images and labels, got {images.shape[0]} and {labels.shape[0]}"
        )
    return (predict(clf, images) == labels.cpu()).double().mean().item()
