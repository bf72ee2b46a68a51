"""ULD: Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030).

Response positions of the two models are aligned by index from the first response token and
truncated to the shorter side. At each aligned position both softmax distributions are
sorted in descending order, the smaller vocabulary zero-padded, and the L1 distance taken
(a closed-form Wasserstein-1 under uniform cost); averaged over positions.
``L = w_ce CE + w_uld L_uld``, reference defaults 1 and 1.5. No deviation, except that the
student's CE is computed on the same response tokens as every method here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmdistill.methods.llm.base import LMMethod, aligned_by_position
from lmdistill.registry import register


@dataclass
class ULDOptions:
    """ULD options."""

    w_ce: float = 1.0
    w_uld: float = 1.5
    tau_student: float = 1.0
    tau_teacher: float = 1.0


def sorted_l1(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """Per row: L1 between the descending-sorted non-negative vectors, the shorter zero-padded ``[N]``.

    Only the ``v = min(V_S, V_T)`` largest entries of the longer side meet a non-zero partner;
    its other entries meet the padding and add their sum. So the longer side takes its top
    ``v`` (``topk``: about 4x cheaper than sorting Gemma's 262k entries) and its remainder
    ``sum - sum(top v)``: the same value and the same gradient as sorting everything."""
    v = min(p_s.size(-1), p_t.size(-1))

    def top(p):
        return p.sort(dim=-1, descending=True).values if p.size(-1) == v else p.topk(v, dim=-1).values

    s, t = top(p_s), top(p_t)
    rest = (p_s.sum(-1) - s.sum(-1)) + (p_t.sum(-1) - t.sum(-1))  # the entries that meet zero padding
    return (s - t).abs().sum(-1) + rest


@register("uld", kind="lm")
class ULD(LMMethod):
    """``w_ce CE + w_uld mean_pos |sort(p_S) - sort(p_T)|_1``."""

    Options = ULDOptions
    needs_teacher_logits = True
    cache_form = "token_logits"  # trains from a teacher cache of its response-position logits

    def forward(self, batch, s, t, heads):
        o = self.opts
        si, ti, _ = aligned_by_position(s, t, batch["s_input_ids"].size(0))
        p_s = F.softmax(s.logits[si].float() / o.tau_student, dim=-1)
        with torch.no_grad():
            p_t = F.softmax(t.logits[ti].float() / o.tau_teacher, dim=-1)
        uld = sorted_l1(p_s, p_t).mean() if len(si) else heads.ce * 0
        return {"ce": heads.ce, "uld": uld, "loss": o.w_ce * heads.ce + o.w_uld * uld}
