"""A user's own images, made here: labelled class folders (RGB or grayscale) and unpaired
trainA/trainB domains without ground truth, as PNG files of any size.

Shapes are drawn with Pillow at random positions and sizes, so every image differs; a class
is a shape with its own colour family, which a small judge learns in seconds and a short cGAN
run can reproduce (its samples are then classified as their label far above chance).
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross")
_COLOURS = {
    "circle": (220, 60, 50),
    "square": (50, 190, 70),
    "triangle": (60, 90, 230),
    "cross": (230, 200, 40),
}


def _shape(draw: ImageDraw.ImageDraw, kind: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        w = max(2, (x1 - x0) // 4)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)


def shape_image(
    kind: str, rng: random.Random, size=(32, 32), background=(20, 20, 30)
) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size, tuple(c + rng.randint(0, 15) for c in background))
    d = ImageDraw.Draw(im)
    side = rng.randint(int(0.45 * min(w, h)), int(0.8 * min(w, h)))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in _COLOURS[kind])
    _shape(d, kind, (x0, y0, x0 + side - 1, y0 + side - 1), fill)
    return im


def labelled(
    root: Path,
    per_class: int = 60,
    classes=CLASSES[:3],
    size=(32, 32),
    gray: bool = False,
    seed: int = 0,
) -> Path:
    """root/<class>/<i>.png: a labelled folder (one folder per class)."""
    rng = random.Random(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = shape_image(kind, rng, size)
            (im.convert("L") if gray else im).save(root / kind / f"{i:04d}.png")
    return root


def unpaired(root: Path, per_domain: int = 60, size=(32, 32), seed: int = 0) -> Path:
    """root/trainA, root/trainB: domain A is grey shapes on black, domain B the same kinds of
    shapes in colour on a light background. Unpaired and without ground truth."""
    rng = random.Random(seed)
    for domain in ("A", "B"):
        (root / f"train{domain}").mkdir(parents=True, exist_ok=True)
        for i in range(per_domain):
            kind = rng.choice(CLASSES)
            if domain == "A":
                im = shape_image(kind, rng, size, background=(0, 0, 0)).convert("L").convert("RGB")
            else:
                im = shape_image(kind, rng, size, background=(200, 200, 190))
            im.save(root / f"train{domain}" / f"{i:04d}.png")
    return root
