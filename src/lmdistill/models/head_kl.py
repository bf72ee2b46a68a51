"""``KL(p || softmax(head(x)[ids] / tau))`` per row, with the LM head's matmul, the column
selection, the softmax and the KL fused into one autograd step.

Written with plain autograd, this term (SRA's span logit KL: ~400 spans a batch against 46k
shared ids of SmolLM2's 49k) keeps half a dozen ``[N, V]`` intermediates and runs as many
elementwise passes over them, forward and backward. Here the forward keeps two (the student's
log-probabilities over the ids and ``p``) and the backward reuses the first in place:
``d z = g (sum(p) softmax(z / tau) - p) / tau`` at the ``ids`` columns, zero elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmdistill.models import lm_head_logits


class _HeadKL(torch.autograd.Function):
    """Row-wise KL of ``softmax(x W^T [:, ids] / tau)`` from ``p = exp(logp)``; ``ids`` None: every column."""

    @staticmethod
    def forward(ctx, x, w, ids, logp, tau):
        z = F.linear(x, w)
        zs = (z if ids is None else z[:, ids]).float()
        del z
        zs = zs.div_(tau)  # a fresh tensor either way (the linear's output or its float copy)
        log_s = zs.sub_(torch.logsumexp(zs, dim=-1)[:, None])  # log softmax(z / tau), in place
        logp = logp.float()
        p = logp.exp()
        # sum p (log p - log s), the difference taken per entry: summing p log p and p log s apart
        # would leave a small KL as the difference of two large sums (float32 cancellation)
        kl = torch.einsum("nv,nv->n", p, logp - log_s)
        ctx.save_for_backward(x, w, ids if ids is not None else torch.empty(0, dtype=torch.long), p, log_s)
        ctx.tau, ctx.select, ctx.spent = tau, ids is not None, False
        return kl

    @staticmethod
    def backward(ctx, g):
        if ctx.spent:
            raise RuntimeError("lm_head_kl's backward reuses its saved logits in place and runs once per forward")
        ctx.spent = True
        x, w, ids, p, log_s = ctx.saved_tensors
        q = log_s.exp_()  # softmax(z / tau), in the saved tensor's memory
        q = q.mul_(p.sum(-1, keepdim=True)).sub_(p).mul_((g.float() / ctx.tau)[:, None])
        if ctx.select:
            dz = q.new_zeros(q.size(0), w.size(0))
            dz[:, ids] = q
        else:
            dz = q
        dz = dz.to(w.dtype)
        dx = dz @ w if ctx.needs_input_grad[0] else None
        dw = dz.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None


def lm_head_kl(head, softcap, x: torch.Tensor, ids: torch.Tensor | None, logp: torch.Tensor,
               tau: float) -> torch.Tensor:
    """``[N]``: ``KL(exp(logp) || softmax(lm_head_logits(head, softcap, x, ids) / tau))`` per row of ``x``
    (``logp [N, len(ids)]``, log-probabilities over the same ids). Fused (see the module docstring)
    for a head without bias or soft-capping; otherwise through :func:`lm_head_logits` and autograd.
    Equal to the plain computation up to float rounding, loss and gradients alike."""
    w, b = head.weight, getattr(head, "bias", None)
    if softcap or b is not None:
        log_s = F.log_softmax(lm_head_logits(head, softcap, x, ids).float() / tau, dim=-1)
        logp = logp.float()
        return (logp.exp() * (logp - log_s)).sum(-1)
    if ids is not None and 2 * ids.numel() < w.shape[0]:  # few ids: gather their rows first (lm_head_logits' rule)
        w, ids = w[ids], None
    return _HeadKL.apply(x.to(w.dtype), w, ids, logp, float(tau))
