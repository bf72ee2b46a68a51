"""Alignment between two tokenizations: spans from offsets, shared vocabularies, edit-distance maps, DTW."""

from lmdistill.align.spans import Alignment, align_offsets, align_text

__all__ = ["Alignment", "align_offsets", "align_text"]
