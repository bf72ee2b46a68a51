"""Readers for the project's data formats, and the collators that batch them."""

from lmdistill.data.readers import (
    StsPair,
    read_instructions,
    read_sentences,
    read_sts,
)

__all__ = ["StsPair", "read_instructions", "read_sentences", "read_sts"]
