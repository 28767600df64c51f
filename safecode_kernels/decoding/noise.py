"""The noised view of an image (docs/design.md §1): Gaussian noise in [0, 1] pixel space, clipped, uint8.

Images of every PIL mode become RGB first (:func:`as_rgb`), before the noise and before the
processor, as the authors' code does (``Image.open(...).convert("RGB")``): the model sees three
channels, so the noise is drawn on those, and a grayscale image answers as its RGB copy does.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def make_noised_image(image, std: float = 0.1, generator=None):
    """Return ``image`` (as RGB, see :func:`as_rgb`) plus Gaussian noise of standard deviation
    ``std`` in [0, 1] pixel space, an RGB image of the same size.

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
    image = as_rgb(image)
    generator = _as_generator(generator)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    noisy = (pixels + std * noise).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return Image.fromarray(noisy.numpy())  # RGB from the [H, W, 3] shape


def as_rgb(image):
    """``image`` in mode RGB (the same object when it already is): ``Image.convert("RGB")``,
    what the authors' code and the Hugging Face image processors do. Alpha is dropped (not
    composited), palettes are expanded, and 16/32-bit grayscale (``I;16``, ``I``) is clipped to
    0..255 by PIL, not rescaled."""
    return image if image.mode == "RGB" else image.convert("RGB")


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
