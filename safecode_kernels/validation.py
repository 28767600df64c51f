"""Checks of arguments shared by the decoders and the judges: batches of requests, integers."""

from __future__ import annotations

from collections.abc import Sequence


def check_requests(images, prompts, verdicts=None) -> tuple[list, list[str]]:
    """Check a batch of (image, prompt) pairs, and their verdicts when given (only as a list
    of the right length here); return the images and prompts as lists."""
    from PIL import Image

    lists = {"images": images, "prompts": prompts}
    if verdicts is not None:
        lists["verdicts"] = verdicts
    for name, value in lists.items():
        if isinstance(value, (str, bytes, Image.Image)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list with one entry per request, got {type(value).__name__}")
    if len({len(value) for value in lists.values()}) > 1:
        counts = [f"{len(value)} {name}" for name, value in lists.items()]
        raise ValueError(f"got {', '.join(counts[:-1])} and {counts[-1]}: give one of each per request")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
    return list(images), list(prompts)


def check_int(name, value, low) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
