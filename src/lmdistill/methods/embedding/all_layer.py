"""All-layer KD: every student layer's pooled vector, each through its own projector, against
the teacher embedding (cosine distance), averaged over layers. The "mimic everything"
strategy that the TALAS paper argues against; the embedding output (layer 0) is not a block
and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmdistill.methods.embedding.base import EmbeddingMethod, cosine_distance, projector
from lmdistill.registry import register


@dataclass
class AllLayerOptions:
    """All-layer KD options."""

    projector_init: str = "normal"  # N(0, 1e-3): won on STS-B dev for every projector method (xavier: the earlier default)


@register("all_layer", kind="embedding")
class AllLayerKD(EmbeddingMethod):
    """Cosine KD at every block, one projector each."""

    Options = AllLayerOptions

    def __init__(self, opts: AllLayerOptions, d_student: int, d_teacher: int, n_layers: int) -> None:
        super().__init__(opts, d_student, d_teacher, n_layers)
        self.projectors = nn.ModuleList(projector(d_student, d_teacher, opts.projector_init) for _ in range(n_layers))

    def forward(self, layers, teacher, view2=None):
        blocks = layers[1:]
        term = sum(cosine_distance(q(s), teacher) for q, s in zip(self.projectors, blocks)) / len(blocks)
        return {"cosine": term, "loss": term}
