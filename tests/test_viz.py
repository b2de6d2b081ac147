"""Image grids: pixel placement, value mapping, PNG round trip through Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gan_core.viz import grid_array, save_grid


def _constant_images(values: list[float], c: int = 1, h: int = 2, w: int = 3) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, c, h, w).clone()


def test_grid_array_places_each_image():
    # 5 images of 2x3 pixels, 3 per row, padding 1: a 2-row grid of 7 x 13 pixels.
    images = _constant_images([-1.0, -0.5, 0.0, 0.5, 1.0])
    grid = grid_array(images, nrow=3, padding=1)
    assert grid.dtype == np.uint8
    assert grid.shape == (1 + 2 * (2 + 1), 1 + 3 * (3 + 1))
    expected_pixel = [0, 64, 128, 191, 255]  # (v + 1) * 127.5, rounded
    for i, value in enumerate(expected_pixel):
        top, left = 1 + (i // 3) * 3, 1 + (i % 3) * 4
        assert (grid[top : top + 2, left : left + 3] == value).all(), i
    # Padding is mid-grey; the unused sixth cell stays padding.
    assert grid[0, :].tolist() == [128] * 13
    assert grid[:, 0].tolist() == [128] * 7
    assert (grid[4:6, 9:12] == 128).all()


def test_grid_array_single_pixel_positions_and_rgb():
    images = -torch.ones(2, 3, 4, 4)
    images[0, 0, 1, 2] = 1.0  # red channel of image 0, row 1, col 2
    images[1, 2, 3, 0] = 1.0  # blue channel of image 1, row 3, col 0
    grid = grid_array(images, nrow=2, padding=2, pad_value=-1.0)
    assert grid.shape == (2 + 4 + 2, 2 + 2 * (4 + 2), 3)
    assert grid[2 + 1, 2 + 2].tolist() == [255, 0, 0]
    assert grid[2 + 3, 2 + 6 + 0].tolist() == [0, 0, 255]
    assert int(grid.sum()) == 2 * 255


def test_save_grid_writes_a_decodable_png(tmp_path):
    images = _constant_images([float(v) for v in torch.linspace(-1, 1, 10)], h=4, w=4)
    path = save_grid(images, tmp_path / "a" / "b" / "grid.png", padding=1, scale=3)
    assert path == tmp_path / "a" / "b" / "grid.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temp file left
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.mode == "L"
        # Default nrow = ceil(sqrt(10)) = 4, so 3 rows; each side 1 + k * (4 + 1), times scale 3.
        assert png.size == (3 * (1 + 4 * 5), 3 * (1 + 3 * 5))
        pixels = np.asarray(png)
    np.testing.assert_array_equal(pixels, grid_array(images).repeat(3, 0).repeat(3, 1))
    # Image 9 (value 1.0 -> 255) sits in row 2, column 1; its top-left pixel, scaled by 3.
    assert pixels[3 * (1 + 2 * 5), 3 * (1 + 1 * 5)] == 255
    assert pixels[3 * (1 + 0 * 5), 3 * (1 + 0 * 5)] == 0


def test_save_grid_rgb(tmp_path):
    images = torch.zeros(4, 3, 2, 2)
    images[:, 1] = 1.0
    path = save_grid(images, tmp_path / "rgb.png", nrow=2, padding=0)
    with Image.open(path) as png:
        assert png.mode == "RGB"
        assert png.size == (4, 4)
        assert np.asarray(png)[0, 0].tolist() == [128, 255, 128]


def test_rejects_nan_and_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        save_grid(torch.full((1, 1, 2, 2), float("nan")), tmp_path / "nan.png")
    assert not (tmp_path / "nan.png").exists()
    with pytest.raises(ValueError, match="1 or 3"):
        grid_array(torch.zeros(1, 2, 4, 4))
