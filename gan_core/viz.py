"""Image grids as PNG files, with Pillow only (no torchvision).

Layout (as torchvision's make_grid): images fill rows of ``nrow`` left to right, every image
is surrounded by ``padding`` pixels of ``pad_value``, so image i's top-left pixel sits at
row ``padding + (i // nrow) * (H + padding)``, column ``padding + (i % nrow) * (W + padding)``.
Pixel values map [-1, 1] -> [0, 255] linearly, rounded, clamped.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid_array(
    images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 0.0
) -> np.ndarray:
    """Tile images [N, C, H, W] in [-1, 1] into uint8 [rows, cols] (C=1) or [rows, cols, 3] (C=3).

    nrow: images per row, default ceil(sqrt(N)). pad_value is in image units ([-1, 1]); the
    default 0 gives mid-grey, which separates tiles against both digit backgrounds (dark X,
    light Y).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("cannot make a grid of zero images")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    images = images.detach().to("cpu", torch.float32)
    # A NaN would turn into an arbitrary byte; a diverged generator should be reported, not drawn.
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol = min(nrow, n)
    nrows = math.ceil(n / nrow)

    grid = torch.full(
        (c, padding + nrows * (h + padding), padding + ncol * (w + padding)), float(pad_value)
    )
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return pixels[0] if c == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    padding: int = 1,
    scale: int = 1,
    pad_value: float = 0.0,
) -> Path:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid; returns the path.

    scale: integer nearest-neighbour upscaling of the whole grid, so 16 px digits stay
    crisp when viewed. Parent folders are created; the file is written to a temporary name
    and renamed, so a reader (an MLflow artifact upload) never sees a half-written PNG.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    pixels = grid_array(images, nrow, padding, pad_value)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    image = Image.fromarray(pixels)  # uint8 [H, W] -> "L", [H, W, 3] -> "RGB"

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
