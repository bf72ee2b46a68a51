"""What every sentence-embedding method receives and returns, and the shared pieces.

A method gets the pooled sentence vector of every student layer (``layers[0]`` is the
embedding output, ``layers[-1]`` the last block; each ``[B, d_S]``), the cached teacher
sentence embedding ``[B, d_T]`` (L2-normalised), and, when ``needs_second_view`` is set, the
last layer's vector from a second forward pass with other dropout masks. It returns a dict
of named loss terms; ``loss`` is the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmdistill.errors import LmdistillError


@dataclass
class NoOptions:
    """A method without options."""


class EmbeddingMethod(nn.Module):
    """Base class: holds the method's trainable extras (projectors), computes the loss terms."""

    Options = NoOptions
    needs_second_view = False

    def __init__(self, opts, d_student: int, d_teacher: int, n_layers: int) -> None:
        super().__init__()
        self.opts = opts
        self.d_student, self.d_teacher, self.n_layers = d_student, d_teacher, n_layers

    def forward(self, layers: list[torch.Tensor], teacher: torch.Tensor,
                view2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def projector(d_in: int, d_out: int, init: str = "xavier", std: float = 1e-3) -> nn.Linear:
    """A bias-free linear map ``d_in -> d_out`` (init: xavier, normal with ``std``, orthogonal)."""
    lin = nn.Linear(d_in, d_out, bias=False)
    if init == "normal":
        nn.init.normal_(lin.weight, std=std)
    elif init == "orthogonal":
        nn.init.orthogonal_(lin.weight)
    elif init == "xavier":
        nn.init.xavier_uniform_(lin.weight)
    else:
        raise LmdistillError(f"unknown projector init {init!r}: use xavier, normal or orthogonal")
    return lin


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_b (1 - cos(a_b, b_b))``."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """In-batch cosine similarities ``[B, B]``."""
    x = F.normalize(x, dim=-1)
    return x @ x.T


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence vectors ``[B, d]`` from token states ``[B, T, d]`` (mean, cls, max, lasttoken)."""
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).max(1).values
    if mode == "lasttoken":
        last = mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise LmdistillError(f"unknown pooling {mode!r}: use mean, cls, max or lasttoken")
