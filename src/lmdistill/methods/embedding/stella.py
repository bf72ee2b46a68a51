"""Stella-style distillation (Zhang et al. 2024, "Jasper and Stella: distillation of SOTA
embedding models"): cosine loss to the teacher embedding (through a learnable projector, as
the dimensions differ) plus MSE between the student's and the teacher's in-batch
cosine-similarity matrices.

Kept: the cosine and the similarity-matrix terms. Left out: the triplet-based relative
similarity term and the multi-stage schedule (the same budget as every other method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from lmdistill.methods.embedding.base import EmbeddingMethod, cosine_distance, projector, similarity_matrix
from lmdistill.registry import register


@dataclass
class StellaOptions:
    """Stella-style options."""

    w_cosine: float = 1.0
    w_similarity: float = 1.0
    projector_init: str = "normal"  # N(0, 1e-3): won on STS-B dev for every projector method (xavier: the earlier default)


@register("stella", kind="embedding")
class Stella(EmbeddingMethod):
    """``w_cosine (1 - cos(P s, t)) + w_similarity MSE(R_S, R_T)``."""

    Options = StellaOptions

    def __init__(self, opts: StellaOptions, d_student: int, d_teacher: int, n_layers: int) -> None:
        super().__init__(opts, d_student, d_teacher, n_layers)
        self.proj = projector(d_student, d_teacher, opts.projector_init)

    def forward(self, layers, teacher, view2=None):
        s = layers[-1]
        cos = cosine_distance(self.proj(s), teacher)
        sim = F.mse_loss(similarity_matrix(s), similarity_matrix(teacher))
        return {"cosine": cos, "similarity": sim,
                "loss": self.opts.w_cosine * cos + self.opts.w_similarity * sim}
