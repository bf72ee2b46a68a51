"""RKD (Park et al., CVPR 2019, "Relational Knowledge Distillation") on the final embeddings.

Distance-wise: in-batch pairwise Euclidean distances, each side divided by its mean distance,
Huber (smooth L1) loss. Angle-wise: cosines of the angles of all in-batch triplets, Huber
loss. Weights 25 and 50 as in common reimplementations. Relations are dimension-free, so no
projector is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmdistill.methods.embedding.base import EmbeddingMethod
from lmdistill.registry import register


@dataclass
class RKDOptions:
    """RKD options."""

    w_distance: float = 25.0
    w_angle: float = 50.0


def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x)  # [B, B]
    off = ~torch.eye(x.size(0), dtype=torch.bool, device=x.device)
    return d / d[off].mean().clamp_min(1e-12)


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between mean-normalised pairwise distance matrices."""
    with torch.no_grad():
        t = _normalised_distances(teacher)
    return F.smooth_l1_loss(_normalised_distances(student), t)


def _angles(x: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # [B, B, d]: e_ij = (x_j - x_i) / |.|
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # cos of angle j-i-k


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between the cosines of all triplet angles."""
    with torch.no_grad():
        t = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), t)


@register("rkd", kind="embedding")
class RKD(EmbeddingMethod):
    """``w_distance * L_dist + w_angle * L_angle`` on the final embeddings."""

    Options = RKDOptions

    def forward(self, layers, teacher, view2=None):
        dist = rkd_distance(layers[-1], teacher)
        angle = rkd_angle(layers[-1], teacher)
        return {"distance": dist, "angle": angle,
                "loss": self.opts.w_distance * dist + self.opts.w_angle * angle}
