"""Optimizers: SAM and ASAM as wrappers over any torch optimizer."""

from lmdistill.optim.asam import ASAM, SAM

__all__ = ["ASAM", "SAM"]
