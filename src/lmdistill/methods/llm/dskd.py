"""DSKD with cross-model attention (Zhang et al., EMNLP 2024, arXiv 2406.17328).

Cross-model attention aligns teacher response positions to student response positions:

* query = Linear(2 d_S -> 2 d_T)[student input-token embedding ; student target-token
  embedding] (embeddings detached);
* key = [teacher input embedding ; teacher target embedding] / std;
* value (teacher -> student) = Linear(d_T -> d_S)(teacher last hidden / std + teacher target
  embedding / std), each std that of the tensor it divides, so the teacher's inputs have unit
  scale whatever its embedding module multiplies the table's rows by (Gemma's: sqrt(d), 25 at
  d = 640; dividing by the table's std instead left them 25 times too large);
* ``A = softmax(Q K^T / sqrt(2 d_T))`` over the teacher positions of the same example;
  ``h_t2s = A V``; the reverse direction uses ``softmax(A^T)`` over student positions on
  Linear(d_S -> d_T)(student last hidden).

``L = (1 - alpha) CE + alpha [ CE(h_t2s W_S^T, y) + sum_pos KL(sg(p_t2s) || p_S) 1[argmax = y]
+ sum_pos KL(p_T || p_s2t) ]`` with the LM heads detached for the projected terms; alpha 0.5,
temperature 2 as in the reference scripts, forward KL (the reference's default divergence).
Deviations: each std is taken over the batch's response positions (the reference takes it
over the padded batch); KD sums are averaged over positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmdistill.methods.llm.base import LMMethod, kl_div
from lmdistill.registry import register


@dataclass
class DSKDOptions:
    """DSKD-CMA options."""

    alpha: float = 0.5
    tau: float = 2.0


def cross_model_attention(q: torch.Tensor, k: torch.Tensor, example_q: torch.Tensor, example_k: torch.Tensor):
    """``softmax(q k^T / sqrt(d))`` over the key positions of the query's own example only;
    returns the attention ``[Nq, Nk]`` and the masked scores (``-inf`` across examples)."""
    scores = q @ k.T / math.sqrt(q.size(-1))
    same = example_q.unsqueeze(1) == example_k.unsqueeze(0)
    scores = scores.masked_fill(~same, float("-inf"))
    return scores.softmax(-1).nan_to_num(0.0), scores


def unit_std(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its own standard deviation (over all its entries)."""
    return x / x.std().clamp_min(1e-6)


def gated_kl(z_t2s: torch.Tensor, z_s: torch.Tensor, target: torch.Tensor, tau: float):
    """``sum_pos KL(sg(p_t2s) || p_S) 1[argmax p_t2s = y] / N``: the projected teacher teaches only
    where it predicts the right token. Returns the term and the gate ``[N]``."""
    right = (z_t2s.argmax(-1) == target).float()
    return (kl_div(z_t2s.detach(), z_s, tau) * right).sum() / max(len(right), 1), right


@register("dskd", kind="lm")
class DSKD(LMMethod):
    """Dual-space KD with cross-model attention."""

    Options = DSKDOptions
    needs_teacher_logits = True
    no_cache_reason = ("its loss projects the teacher's token-level hidden states and embeddings through modules "
                       "trained in the loop, so every step needs the teacher's forward pass: train it online "
                       "(drop data.teacher_cache)")

    def __init__(self, opts, student, teacher, student_tokenizer, teacher_tokenizer, cache_dir=None):
        super().__init__(opts, student, teacher, student_tokenizer, teacher_tokenizer, cache_dir)
        d_s = student.get_input_embeddings().embedding_dim
        d_t = teacher.get_input_embeddings().embedding_dim
        self.query = nn.Linear(2 * d_s, 2 * d_t)
        self.t2s = nn.Linear(d_t, d_s)
        self.s2t = nn.Linear(d_s, d_t)
        self.d_t = d_t
        self._s_emb = student.get_input_embeddings()
        self._t_emb = teacher.get_input_embeddings()

    def forward(self, batch, s, t, heads):
        o = self.opts
        s_ids, t_ids = s.input_ids, t.input_ids
        # embeddings of the input token and of the target token at each response position
        with torch.no_grad():
            s_in = self._s_emb(s_ids[s.resp.b, s.resp.t]).float()
            s_tg = self._s_emb(s.resp.target).float()
            t_in = self._t_emb(t_ids[t.resp.b, t.resp.t]).float()
            t_tg = self._t_emb(t.resp.target).float()
            k = unit_std(torch.cat([t_in, t_tg], -1))  # [Nt, 2 d_T]
            t_tg = unit_std(t_tg)
            t_h = unit_std(t.hidden[max(t.hidden)][t.resp.b, t.resp.t].float())
        q = self.query(torch.cat([s_in, s_tg], -1))  # [Ns, 2 d_T]
        a, scores = cross_model_attention(q, k, s.resp.b, t.resp.b)
        h_t2s = a @ self.t2s(t_h + t_tg)  # [Ns, d_S]
        w_s = heads.student_head_weight.detach()
        z_t2s = h_t2s @ w_s.T  # [Ns, V_S]
        ce_t2s = F.cross_entropy(z_t2s.float(), s.resp.target)
        kd_s, right = gated_kl(z_t2s, s.logits, s.resp.target, o.tau)
        a_rev = scores.T.softmax(-1).nan_to_num(0.0)  # [Nt, Ns]
        h_s2t = a_rev @ self.s2t(s.hidden[max(s.hidden)][s.resp.b, s.resp.t].float())  # [Nt, d_T]
        z_s2t = heads.teacher_logits(h_s2t, None, detach_weight=True)
        kd_t = kl_div(t.logits.detach(), z_s2t, o.tau).mean()
        kd = ce_t2s + kd_s + kd_t
        return {"ce": heads.ce, "ce_t2s": ce_t2s, "kd_student": kd_s, "kd_teacher": kd_t,
                "t2s_acc": right.mean().detach(), "loss": (1 - o.alpha) * heads.ce + o.alpha * kd}
