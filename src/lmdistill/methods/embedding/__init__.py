"""Sentence-embedding distillation methods; importing this package registers them."""

from lmdistill.methods.embedding import all_layer, embed_kd, rkd, stella, talas  # noqa: F401
from lmdistill.methods.embedding.base import EmbeddingMethod

__all__ = ["EmbeddingMethod"]
