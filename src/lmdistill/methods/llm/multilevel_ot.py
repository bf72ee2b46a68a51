"""MultiLevelOT (Cui et al., AAAI 2025, arXiv 2412.14528).

Response positions aligned and truncated as in ULD. Per example, logits are divided by their
standard deviation and softmaxed at tau; vocabulary columns are reordered by total
probability mass over the sequence and cut to the top ``k`` (50), on each side separately.
``L = CE + lam [ mean |s - t| + w_seq * seq + w_ot * <P, C> ]`` with ``seq`` the
cross-entropy between the two sorted top-k distributions (the sequential log term) and
``<P, C>`` the Sinkhorn transport cost over positions (C = L1 distance between positions'
top-k vectors, entropic regularisation 0.1), weights 0.1 and 0.1 * 0.001 as in the reference.
Deviation: a fixed number of Sinkhorn iterations (50), computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmdistill.methods.llm.base import LMMethod, aligned_by_position
from lmdistill.registry import register


@dataclass
class MultiLevelOTOptions:
    """MultiLevelOT options."""

    lam: float = 1.0
    top_k: int = 50
    tau: float = 1.0
    w_seq: float = 0.1
    w_ot: float = 0.1 * 0.001
    sinkhorn_eps: float = 0.1
    sinkhorn_iters: int = 50


def sinkhorn_cost(cost: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """``<P, C>`` for the entropic optimal plan between uniform marginals."""
    n, m = cost.shape
    log_k = -cost / eps
    log_a = torch.full((n,), -torch.log(torch.tensor(float(n))), device=cost.device)
    log_b = torch.full((m,), -torch.log(torch.tensor(float(m))), device=cost.device)
    u = torch.zeros(n, device=cost.device)
    v = torch.zeros(m, device=cost.device)
    for _ in range(iters):
        u = log_a - torch.logsumexp(log_k + v[None, :], dim=1)
        v = log_b - torch.logsumexp(log_k + u[:, None], dim=0)
    plan = torch.exp(log_k + u[:, None] + v[None, :])
    return (plan * cost).sum()


def topk_by_mass(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Columns reordered by total mass over the positions, cut to the top k ``[L, k]``."""
    k = min(k, probs.size(-1))
    order = probs.sum(0).topk(k).indices
    return probs[:, order]


@register("multilevel_ot", kind="lm")
class MultiLevelOT(LMMethod):
    """Token-level, sequential and sequence-level (Sinkhorn) OT terms on top-k sorted distributions."""

    Options = MultiLevelOTOptions
    needs_teacher_logits = True
    cache_form = "token_logits"  # trains from a teacher cache of its response-position logits

    def forward(self, batch, s, t, heads):
        o = self.opts
        si, ti, lengths = aligned_by_position(s, t, batch["s_input_ids"].size(0))
        token, seq, ot = [], [], []
        start = 0
        for n in lengths:
            if n == 0:
                continue
            zs = s.logits[si[start:start + n]].float()
            with torch.no_grad():
                zt = t.logits[ti[start:start + n]].float()
                pt = topk_by_mass(F.softmax(zt / zt.std(-1, keepdim=True).clamp_min(1e-6) / o.tau, -1), o.top_k)
            ps = topk_by_mass(F.softmax(zs / zs.std(-1, keepdim=True).clamp_min(1e-6) / o.tau, -1), o.top_k)
            start += n
            token.append((ps - pt).abs().sum(-1).mean())
            seq.append(-(pt * ps.clamp_min(1e-12).log()).sum(-1).mean())
            cost = torch.cdist(ps, pt, p=1)
            ot.append(sinkhorn_cost(cost, o.sinkhorn_eps, o.sinkhorn_iters))
        zero = heads.ce * 0
        tok = torch.stack(token).mean() if token else zero
        sq = torch.stack(seq).mean() if seq else zero
        tr = torch.stack(ot).mean() if ot else zero
        distill = tok + o.w_seq * sq + o.w_ot * tr
        return {"ce": heads.ce, "token": tok, "seq": sq, "ot": tr, "loss": heads.ce + o.lam * distill}
