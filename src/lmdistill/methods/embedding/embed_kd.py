"""Embedding KD (Reimers & Gurevych 2020, "Making monolingual sentence embeddings multilingual
using knowledge distillation"): the student's final sentence embedding against the cached
teacher embedding.

``loss = mse``: MSE, as sentence-transformers' MSELoss. Deviation: when the two dimensions
differ (384 vs 768 here), the paper's MSE is undefined; a learnable linear projector maps the
student into the teacher space (training-only; the saved student is unchanged).
``loss = cosine``: cosine distance through the projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from lmdistill.errors import LmdistillError
from lmdistill.methods.embedding.base import EmbeddingMethod, cosine_distance, projector
from lmdistill.registry import register


@dataclass
class EmbedKDOptions:
    """Embedding-KD options."""

    loss: str = "mse"  # mse | cosine
    projector_init: str = "normal"  # N(0, 1e-3): won on STS-B dev for every projector method (xavier: the earlier default)


@register("embed_kd", kind="embedding")
class EmbedKD(EmbeddingMethod):
    """Final-embedding distillation (MSE or cosine)."""

    Options = EmbedKDOptions

    def __init__(self, opts: EmbedKDOptions, d_student: int, d_teacher: int, n_layers: int) -> None:
        super().__init__(opts, d_student, d_teacher, n_layers)
        if opts.loss not in ("mse", "cosine"):
            raise LmdistillError(f"embed_kd loss must be mse or cosine, got {opts.loss!r}")
        self.proj = None
        if d_student != d_teacher or opts.loss == "cosine":
            self.proj = projector(d_student, d_teacher, opts.projector_init)

    def forward(self, layers, teacher, view2=None):
        s = layers[-1] if self.proj is None else self.proj(layers[-1])
        term = F.mse_loss(s, teacher) if self.opts.loss == "mse" else cosine_distance(s, teacher)
        return {self.opts.loss: term, "loss": term}
