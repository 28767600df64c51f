"""The package's ops, one per file; each backend of an op sits beside it."""

from .step import StepOutput, safecode_step

__all__ = ["StepOutput", "safecode_step"]
