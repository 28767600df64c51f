"""make_noised_image: Gaussian noise in [0, 1] pixel space, clipped, uint8, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from safecode_kernels.decoding import make_noised_image
from safecode_kernels.decoding.noise import noised_views


def gray(size=64, value=128, mode="RGB"):
    return Image.new(mode, (size, size), value if mode == "L" else (value,) * len(mode))


def test_reproducible_from_a_seed():
    image = gray()
    a = np.asarray(make_noised_image(image, 0.1, generator=3))
    b = np.asarray(make_noised_image(image, 0.1, generator=torch.Generator().manual_seed(3)))
    c = np.asarray(make_noised_image(image, 0.1, generator=4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_noise_statistics():
    pixels = np.asarray(make_noised_image(gray(128), 0.1, generator=0), dtype=np.float64) / 255.0
    noise = pixels - 128 / 255
    assert abs(noise.mean()) < 0.005
    assert noise.std() == pytest.approx(0.1, rel=0.05)


def test_clipped_and_rounded():
    out = make_noised_image(gray(value=250), 0.5, generator=0)
    pixels = np.asarray(out)
    assert out.mode == "RGB" and out.size == (64, 64) and pixels.dtype == np.uint8
    assert (pixels == 255).mean() > 0.3  # clipped at 1.0, not wrapped around
    assert np.array_equal(np.asarray(make_noised_image(gray(), 0.0, generator=0)), np.asarray(gray()))


MODES = ["L", "LA", "P", "RGBA", "CMYK", "I;16"]


def picture(mode: str) -> Image.Image:
    """A random RGB picture in ``mode`` (I;16 from the grayscale values, as 16-bit files hold them)."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16)).convert("I;16")
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_noise_drawn_on_the_rgb_image(mode):
    """Every mode is noised as its RGB conversion is (three channels, the model's view), and
    the noised view is RGB."""
    image = picture(mode)
    noised = make_noised_image(image, 0.1, generator=0)
    want = make_noised_image(image.convert("RGB"), 0.1, generator=0)
    assert noised.mode == "RGB" and noised.size == image.size
    assert np.array_equal(np.asarray(noised), np.asarray(want))


def test_views_in_order():
    images = [gray(value=v) for v in (10, 100, 200)]
    first, second = noised_views(images, 0.1, seed=5), noised_views(images, 0.1, seed=5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))


def test_bad_inputs():
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        make_noised_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="std"):
        make_noised_image(gray(), -1.0)
    with pytest.raises(ValueError, match="std"):
        make_noised_image(gray(), float("nan"))
    with pytest.raises(TypeError, match="generator"):
        make_noised_image(gray(), 0.1, generator="seed")
