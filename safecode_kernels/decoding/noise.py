"""The noised view of an image (docs/design.md §1): Gaussian noise in [0, 1] pixel space, clipped, uint8."""

from __future__ import annotations

import math

import numpy as np
import torch

# Modes whose pixels are 8-bit per channel; anything else is converted to RGB first.
_UINT8_MODES = ("L", "RGB", "RGBA")


def make_noised_image(image, std: float = 0.1, generator=None):
    """Return ``image`` plus Gaussian noise of standard deviation ``std`` in [0, 1] pixel space.

    The noisy pixels are clipped to [0, 1] and rounded back to uint8, as in the authors' code.
    ``generator`` is ``None`` (torch's default generator), an int seed or a ``torch.Generator``;
    the same seed gives the same image.

    Example::

        >>> from PIL import Image
        >>> import safecode_kernels as sk
        >>> img = Image.new("RGB", (32, 32), (128, 64, 200))
        >>> noised = sk.make_noised_image(img, std=0.1, generator=0)
        >>> noised.size, noised.mode
        ((32, 32), 'RGB')
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    check_noise_std(std)
    if image.mode not in _UINT8_MODES:
        image = image.convert("RGB")
    generator = _as_generator(generator)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    noisy = (pixels + std * noise).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return Image.fromarray(noisy.numpy())  # L, RGB or RGBA from the shape


def check_noise_std(std) -> None:
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")


def noised_views(images, std: float, seed: int) -> list:
    """Noised copies of ``images``, drawn in order from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [make_noised_image(image, std, generator) for image in images]


def _as_generator(generator) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
