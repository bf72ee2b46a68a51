"""SRA: Span Representation Alignment for cross-tokenizer LLM distillation (docs/methods.md 1.2-1.7).

Both tokenizations are cut into shared text spans (:mod:`lmdistill.align.spans`). At each
mapped layer pair, each span is summarised on each side by its attention-weighted Center of
Mass (the last real token's attention row, detached, as token weights); spans are weighted by
the teacher's span masses; a projected cosine loss aligns student and teacher CoMs; a
geometric regulariser keeps the span-by-span cosine structure; span logits are distilled
over the shared vocabulary through each model's LM head applied to the CoMs only:

``L = alpha CE + (1 - alpha) (c L_span + lambda_geo L_geo + w_logit L_logit)``.

Follows the SRA paper (arXiv 2605.01205) as docs/methods.md describes it; the options below are the
choices the paper leaves open (each with its ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lmdistill.align.vocab import shared_vocab, shared_vocab_stats
from lmdistill.errors import LmdistillError
from lmdistill.methods.llm.base import LMMethod, TeacherNeeds, hidden_size, num_layers
from lmdistill.models import final_norm
from lmdistill.registry import register


@dataclass
class SRAOptions:
    """SRA options; defaults as specified, except the span logit KL's reduction (``logit_reduction``)."""

    alpha: float = 0.5
    c_span: float = 2.0
    lambda_geo: float = 10.0
    w_logit: float = 1.0
    # mean (over each row's spans, then rows; chosen on the dev split at 200 steps) | sum (over spans / B, as
    # the paper specifies it: ~100 spans a Dolly row make it 10-20 times the CE beside it)
    logit_reduction: str = "mean"
    tau: float = 2.0
    p: float = 1.0  # span-weight exponent
    weighting: str = "last_token"  # last_token | received | uniform (token weights inside a span)
    span_weighting: str = "attention"  # attention | uniform
    layer_pairs: list | None = None  # [[student_layer, teacher_layer], ...]; None = proportional
    n_pairs: int = 2  # the top n student layers, teacher layers placed proportionally
    pair_stride: int | None = None  # int s: both sides' layers s apart, ending at the final layers (authors: 2)
    projector_init: str = "xavier"  # xavier | orthogonal
    velocity: bool = False
    w_velocity: float = 1.0
    vocab_match: str = "normalised"  # normalised | exact
    max_spans: int = 1024
    span_weights_from: str = "each_pair"  # each_pair (its own teacher masses, as the authors' code) | last_pair
    query_at: str = "last_text"  # the attention row's query: last_text (as the authors) | last_token (the EOS)


MASS_EVERY = 25  # forward passes between two measurements of the teacher's mass in the shared vocabulary


def default_layer_pairs(n_student: int, n_teacher: int, n_pairs: int, stride: int | None = None) -> list[tuple[int, int]]:
    """The top ``n_pairs`` student layers, each with the teacher layer at the same relative depth;
    with ``stride``, layers ``stride`` apart on both sides, ending at both final layers (the
    authors' scripts: three pairs, stride 2)."""
    if stride:
        return [(n_student - stride * k, n_teacher - stride * k) for k in range(n_pairs - 1, -1, -1)]
    pairs = []
    for l_s in range(n_student - n_pairs + 1, n_student + 1):
        pairs.append((l_s, max(1, min(n_teacher, round(l_s * n_teacher / n_student)))))
    return pairs


def token_weights(rows: torch.Tensor | None, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``w_t = a_t / sum a`` over the real tokens (``[B, T]``); ``uniform`` gives the plain mean."""
    m = mask.to(torch.float32)
    if mode == "uniform" or rows is None:
        a = m
    else:
        a = rows.float() * m
    return a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)


def span_matrix(spans: torch.Tensor, span_mask: torch.Tensor, length: int) -> torch.Tensor:
    """``M[b, k, t] = 1`` when token t belongs to span k (half-open ranges ``spans[b, k]``)."""
    pos = torch.arange(length, device=spans.device)
    inside = (pos >= spans[..., :1]) & (pos < spans[..., 1:2])  # [B, K, T]
    return (inside & span_mask.bool().unsqueeze(-1)).to(torch.float32)


def span_com(hidden: torch.Tensor, weights: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Span centers of mass ``c [B, K, d]`` and masses ``m [B, K]``."""
    mass = torch.bmm(M, weights.unsqueeze(-1)).squeeze(-1)  # [B, K]
    com = torch.bmm(M, weights.unsqueeze(-1) * hidden.float()) / mass.clamp_min(1e-5).unsqueeze(-1)
    return com, mass


def span_weights(mass: torch.Tensor, span_mask: torch.Tensor, p: float = 1.0, uniform: bool = False) -> torch.Tensor:
    """``W_k = m_k^p / sum m^p`` over the real spans of each sequence (``uniform``: 1/K)."""
    valid = span_mask.to(torch.float32)
    base = valid if uniform else mass.clamp_min(0).pow(p) * valid
    total = base.sum(dim=1, keepdim=True)
    # a sequence whose spans got no mass at all falls back to uniform weights
    base = torch.where(total > 0, base, valid)
    return base / base.sum(dim=1, keepdim=True).clamp_min(1e-12)


def weighted_cosine_loss(a: torch.Tensor, b: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_k W_k (1 - cos(a_k, b_k))``."""
    return (W * (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-8))).sum(1).mean()


def geometric_loss(c_s: torch.Tensor, c_t: torch.Tensor, W: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_{j != k} pi_jk (G^S_jk - G^T_jk)^2`` with ``pi_jk ∝ W_j W_k`` off the diagonal."""
    gs = F.normalize(c_s, dim=-1) @ F.normalize(c_s, dim=-1).transpose(1, 2)
    gt = F.normalize(c_t, dim=-1) @ F.normalize(c_t, dim=-1).transpose(1, 2)
    valid = span_mask.to(torch.float32)
    pi = (W * valid).unsqueeze(2) * (W * valid).unsqueeze(1)
    pi = pi * (1 - torch.eye(pi.size(-1), device=pi.device))
    pi = pi / pi.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return (pi * (gs - gt.detach()).pow(2)).sum(dim=(1, 2)).mean()


def span_logit_kl(z_s: torch.Tensor, z_t: torch.Tensor, span_mask: torch.Tensor, tau: float,
                  reduction: str = "sum") -> torch.Tensor:
    """``sum over real spans KL(softmax(z_T / tau) || softmax(z_S / tau)) / B`` (``reduction="sum"``,
    as specified), or the mean over each row's real spans, averaged over rows (``"mean"``: the
    term no longer grows with the number of spans, ~100 per Dolly row)."""
    return span_logit_kl_to(z_s, F.log_softmax(z_t.float() / tau, dim=-1), None, span_mask, tau, reduction)


def span_logit_kl_to(z_s: torch.Tensor, logp_t: torch.Tensor, idx: torch.Tensor | None, span_mask: torch.Tensor,
                     tau: float, reduction: str = "sum") -> torch.Tensor:
    """:func:`span_logit_kl` against teacher log-probabilities at ``tau``: over the whole shared
    vocabulary (``idx`` None, ``logp_t [B, K, V]``), or its top k (``idx``, ``logp_t [B, K, k]``)
    plus one bucket for the remaining mass, on both sides (what a teacher cache stores). Each of
    ``z_s``, ``logp_t``, ``idx`` may instead hold the real spans only (``[N, ...]``, ``span_mask``'s
    order): the student's logits are then computed for no padded span."""
    real = span_mask.bool()
    z_s, logp_t = (z if z.dim() == 2 else z[real] for z in (z_s, logp_t))
    if idx is not None and idx.dim() == 3:
        idx = idx[real]
    log_s = F.log_softmax(z_s.float() / tau, dim=-1)
    logp_t = logp_t.float()
    if idx is None:
        kl_real = (logp_t.exp() * (logp_t - log_s)).sum(-1)
    else:
        ls = log_s.gather(-1, idx.long())
        p = logp_t.exp()
        kl_real = (p * (logp_t - ls)).sum(-1)
        rest_t = (1 - p.sum(-1)).clamp_min(0)
        rest_s = (1 - ls.exp().sum(-1)).clamp_min(1e-12)
        kl_real = kl_real + torch.where(rest_t > 0, rest_t * (rest_t.clamp_min(1e-12).log() - rest_s.log()), 0.0)
    return reduce_span_kl(kl_real, span_mask, reduction)


def reduce_span_kl(kl_real: torch.Tensor, span_mask: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """The span logit term from each real span's KL (``kl_real [N]``, ``span_mask``'s order): summed
    over spans / B, or the mean over each row's spans averaged over rows (see :func:`span_logit_kl`)."""
    real = span_mask.bool()
    kl = kl_real.new_zeros(span_mask.shape).masked_scatter(real, kl_real)  # [B, K], 0 at padding
    if reduction == "mean":
        return (kl.sum(-1) / real.sum(-1).clamp_min(1)).mean()
    return kl.sum() / span_mask.size(0)


@register("sra", kind="lm")
class SRA(LMMethod):
    """Span Representation Alignment (see module docstring)."""

    Options = SRAOptions
    needs_spans = True
    cache_form = "spans"  # trains from a teacher cache of its span targets (lmdistill.train.lm_cache)

    def __init__(self, opts: SRAOptions, student, teacher, student_tokenizer, teacher_tokenizer, cache_dir=None):
        super().__init__(opts, student, teacher, student_tokenizer, teacher_tokenizer, cache_dir)
        for name, val, allowed in (("weighting", opts.weighting, ("last_token", "received", "uniform")),
                                   ("span_weighting", opts.span_weighting, ("attention", "uniform")),
                                   ("logit_reduction", opts.logit_reduction, ("sum", "mean")),
                                   ("span_weights_from", opts.span_weights_from, ("each_pair", "last_pair")),
                                   ("query_at", opts.query_at, ("last_text", "last_token")),
                                   ("projector_init", opts.projector_init, ("xavier", "orthogonal"))):
            if val not in allowed:
                raise LmdistillError(f"sra {name}={val!r} is not one of {', '.join(allowed)}")
        ns, nt = num_layers(student), num_layers(teacher)
        pairs = ([tuple(p) for p in opts.layer_pairs] if opts.layer_pairs
                 else default_layer_pairs(ns, nt, opts.n_pairs, opts.pair_stride))
        for ls, lt in pairs:
            if not (1 <= ls <= ns and 1 <= lt <= nt):
                raise LmdistillError(
                    f"sra layer pair ({ls}, {lt}) out of range: student layers are 1..{ns}, teacher layers 1..{nt}"
                )
        self.pairs = pairs
        self.row_mode = None if opts.weighting == "uniform" else opts.weighting
        self.row_query = opts.query_at
        d_s, d_t = hidden_size(student), hidden_size(teacher)
        self.projectors = nn.ModuleList(nn.Linear(d_s, d_t, bias=False) for _ in pairs)
        for proj in self.projectors:
            (nn.init.orthogonal_ if opts.projector_init == "orthogonal" else nn.init.xavier_uniform_)(proj.weight)
        self.shared = None
        # the LM head reads the final norm's output: a CoM taken at a non-final layer is a
        # pre-norm state (norms in the thousands), so that model's final norm goes first
        self.norm_s = self.norm_t = False
        if opts.w_logit > 0:
            for side, model, layer, n in (("student", student, pairs[-1][0], ns), ("teacher", teacher, pairs[-1][1], nt)):
                if layer != n and isinstance(model, nn.Module) and final_norm(model) is None:
                    raise LmdistillError(
                        f"sra: the span logit term reads the {side}'s LM head at layer {layer} of {n}, and its "
                        "final norm could not be found: end layer_pairs at the final layers, or set method_args.w_logit=0"
                    )
            self.norm_s, self.norm_t = pairs[-1][0] != ns, pairs[-1][1] != nt
            pairs_v = torch.as_tensor(shared_vocab(student_tokenizer, teacher_tokenizer, opts.vocab_match, cache_dir))
            self.register_buffer("shared_s", pairs_v[:, 0].clone(), persistent=False)
            self.register_buffer("shared_t", pairs_v[:, 1].clone(), persistent=False)
            self.shared = len(pairs_v)
            self.shared_stats = shared_vocab_stats(pairs_v.numpy(), student_tokenizer, teacher_tokenizer)
        self._calls = 0

    @torch.no_grad()
    def teacher_shared_mass(self, heads, c_real, z_shared, max_spans: int = 64) -> torch.Tensor:
        """The teacher's probability mass inside the shared vocabulary at its span CoMs (tau = 1),
        averaged over up to ``max_spans`` real spans of the batch (``c_real``, ``z_shared``: the real
        spans only; the full head is applied to those ``max_spans``)."""
        if c_real.size(0) == 0:
            return torch.zeros((), device=c_real.device)
        z_full = heads.teacher_logits(c_real[:max_spans]).float()
        inside = z_shared[:max_spans].float().logsumexp(-1) - z_full.logsumexp(-1)
        return inside.exp().mean()

    def student_layers(self) -> list[int]:
        return sorted({ls for ls, _ in self.pairs})

    def teacher_layers(self) -> list[int]:
        return sorted({lt for _, lt in self.pairs})

    def needs(self) -> TeacherNeeds:
        return replace(super().needs(), max_spans=self.opts.max_spans)

    def run_facts(self, log_history: list[dict]) -> dict:
        """The shared vocabulary's size, its byte-fallback pairs and the teacher's probability mass
        inside it (measured every MASS_EVERY forward passes, or when its cache was built)."""
        if self.shared is None:
            return {}
        masses = [e["shared_mass"] for e in log_history if "shared_mass" in e]
        return {"shared_vocab": {**self.shared_stats,
                                 "teacher_mass_in_shared": round(sum(masses) / len(masses), 6) if masses else None}}

    def cache_signature(self) -> dict:
        """What the teacher targets depend on among the options (part of a teacher cache's key)."""
        o = self.opts
        return {"form": self.cache_form, "pairs": [list(p) for p in self.pairs], "weighting": o.weighting,
                "query_at": o.query_at, "max_spans": o.max_spans, "logit": o.w_logit > 0,
                "tau": o.tau if o.w_logit > 0 else None, "vocab_match": o.vocab_match if o.w_logit > 0 else None,
                "shared": self.shared}

    def teacher_targets(self, batch, t, heads, top_k: int | None = None) -> dict[str, torch.Tensor]:
        """Everything the loss needs from the teacher, per span (no gradient): ``com [B, P, K, d]``
        (each pair's span CoMs), ``mass [B, P, K]`` and, with the span logit term, ``logp``: the
        teacher's log-probabilities at ``tau`` over the shared vocabulary at the real spans only
        (``[N, V]`` in ``span_mask``'s order, or its top ``top_k`` with their indices ``idx``).
        A teacher cache stores exactly these, per row."""
        o = self.opts
        span_mask = batch["span_mask"]
        Mt = span_matrix(batch["spans_t"], span_mask, batch["t_input_ids"].size(1))
        coms, masses = [], []
        with torch.no_grad():
            for _, lt in self.pairs:
                wt = token_weights(t.rows.get(lt), t.attention_mask, o.weighting)
                ct, mt = span_com(t.hidden[lt], wt, Mt)
                coms.append(ct)
                masses.append(mt)
            out = {"com": torch.stack(coms, 1), "mass": torch.stack(masses, 1)}
            if o.w_logit > 0:  # the head is applied to the real spans only
                real = span_mask.bool()
                c_t = coms[-1][real]
                if self.norm_t:
                    c_t = heads.teacher_norm(c_t.to(heads.teacher_head_weight.dtype))
                z_t = heads.teacher_logits(c_t, self.shared_t)
                logp = F.log_softmax(z_t.float() / o.tau, dim=-1)
                if top_k is not None and top_k < logp.size(-1):
                    out["logp"], out["idx"] = logp.topk(top_k, dim=-1)
                else:
                    out["logp"] = logp
                if self._calls % MASS_EVERY == 0:
                    out["shared_mass"] = self.teacher_shared_mass(heads, c_t, z_t)
        self._calls += 1
        return out

    def forward(self, batch, s, t, heads):
        o = self.opts
        span_mask = batch["span_mask"]
        # from a teacher cache, or from the teacher's forward pass of this step
        tg = batch["teacher_targets"] if t is None else self.teacher_targets(batch, t, heads)
        Ms = span_matrix(batch["spans_s"], span_mask, batch["s_input_ids"].size(1))
        coms_s, coms_t, Ws = [], [], []
        for p, (ls, _) in enumerate(self.pairs):
            ws = token_weights(s.rows.get(ls), s.attention_mask, o.weighting)
            cs, _ = span_com(s.hidden[ls], ws, Ms)
            coms_s.append(cs)
            coms_t.append(tg["com"][:, p].float())
            Ws.append(span_weights(tg["mass"][:, p].float(), span_mask, o.p, uniform=o.span_weighting == "uniform"))
        if o.span_weights_from == "last_pair":
            Ws = [Ws[-1]] * len(Ws)
        W = Ws[-1]  # the geometric and span logit terms live at the last pair
        proj = [P(c) for P, c in zip(self.projectors, coms_s)]
        lam = 1.0 / len(self.pairs)
        l_span = sum(lam * weighted_cosine_loss(ps, ct, Wp) for ps, ct, Wp in zip(proj, coms_t, Ws))
        out = {"ce": heads.ce, "span": l_span}
        if o.velocity and len(self.pairs) > 1:
            vel = sum(weighted_cosine_loss(proj[i + 1] - proj[i], coms_t[i + 1] - coms_t[i], W)
                      for i in range(len(self.pairs) - 1)) / (len(self.pairs) - 1)
            out["velocity"] = vel
            l_span = l_span + o.w_velocity * vel
        distill = o.c_span * l_span
        if o.lambda_geo > 0:
            out["geo"] = geometric_loss(coms_s[-1], coms_t[-1], W, span_mask)
            distill = distill + o.lambda_geo * out["geo"]
        if o.w_logit > 0:
            c_s = coms_s[-1][span_mask.bool()]  # the real spans only: no logits for padding
            if self.norm_s:
                c_s = heads.student_norm(c_s.to(heads.student_head_weight.dtype))
            if "shared_mass" in tg:
                out["shared_mass"] = tg["shared_mass"]
            if "idx" not in tg and heads.student_kl is not None:  # the whole shared vocabulary: fused
                logp = tg["logp"] if tg["logp"].dim() == 2 else tg["logp"][span_mask.bool()]
                kl_real = heads.student_kl(c_s, self.shared_s, logp, o.tau)
                out["logit"] = reduce_span_kl(kl_real, span_mask, o.logit_reduction)
            else:  # a cache's top k plus the rest
                z_s = heads.student_logits(c_s, self.shared_s)
                out["logit"] = span_logit_kl_to(z_s, tg["logp"], tg.get("idx"), span_mask, o.tau, o.logit_reduction)
            distill = distill + o.w_logit * out["logit"]
        out["loss"] = o.alpha * heads.ce + (1 - o.alpha) * distill
        return out
