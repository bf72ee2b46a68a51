"""What every cross-tokenizer LM method receives, and the shared pieces.

The trainer's wrapper runs both models once per step and hands the method two
:class:`Side` objects:

* ``hidden``: the hidden states the method asked for (``{layer: [B, T, d]}``; layer ``l`` =
  output of block ``l``, the last one after the final norm);
* ``rows``: last-token attention rows at the mapped layers (``{layer: [B, T]}``), if asked;
* ``resp``: the response positions: ``b``, ``t`` (the position whose output predicts the
  next token) and ``target`` (that next token), in batch order;
* ``logits``: logits at the response positions only ``[N, V]`` (the student's always, for CE;
  the teacher's only for methods that set ``needs_teacher_logits``). No ``[B, T, V]`` tensor is
  built for either model.

A method returns a dict of named loss terms, ``loss`` being the total.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmdistill.models import base_model


@dataclass
class Response:
    """Response positions of a batch: flat indices, in (b, t) order."""

    b: torch.Tensor  # [N]
    t: torch.Tensor  # [N]
    target: torch.Tensor  # [N]

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> Response:
        """Positions ``t`` whose next token ``labels[:, t+1]`` is a response token."""
        nxt = labels[:, 1:]
        b, t = torch.nonzero(nxt != -100, as_tuple=True)
        return cls(b, t, nxt[b, t])

    def per_example(self, batch_size: int) -> list[torch.Tensor]:
        """Row indices (into the flat ``N``) of each example."""
        return [torch.nonzero(self.b == i, as_tuple=True)[0] for i in range(batch_size)]


@dataclass
class Side:
    """One model's outputs for a batch (see module docstring)."""

    hidden: dict[int, torch.Tensor]
    resp: Response
    logits: torch.Tensor | None = None
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class TeacherNeeds:
    """What a method reads in a training step, declared once (``LMMethod.needs()``); the trainer
    provides it, from the teacher's forward pass or from a teacher cache, and asks nothing else."""

    teacher: bool = True  # the teacher takes part at all (SFT: no)
    logits: bool = False  # the teacher's logits at its response positions
    student_layers: tuple[int, ...] = ()  # hidden-state indices read (the last is always provided)
    teacher_layers: tuple[int, ...] = ()
    rows: str | None = None  # attention rows at those layers: "last_token" | "received"
    row_query: str = "last_text"  # the row's query: the last text token, or "last_token" (the EOS)
    spans: bool = False  # the spans shared by both tokenizations (in the batch)
    max_spans: int = 1024
    cache_form: str | None = None  # see LMMethod.cache_form


@dataclass
class Heads:
    """The output heads a method may apply to its own states, and the student's CE."""

    ce: torch.Tensor | None = None
    student_head_weight: torch.Tensor | None = None
    student_norm: nn.Module | None = None
    student_logits: Callable | None = None  # (states, vocabulary ids=None, detach_weight=False) -> logits
    # (states, vocabulary ids, logp [N, len(ids)], tau) -> [N] KL(exp(logp) || softmax(student logits / tau)),
    # fused (lmdistill.models.head_kl): the same numbers as through student_logits, with less time and memory
    student_kl: Callable | None = None
    teacher_head_weight: torch.Tensor | None = None
    teacher_norm: nn.Module | None = None
    teacher_logits: Callable | None = None  # as student_logits, the weight detached


@dataclass
class NoOptions:
    """A method without options."""


class LMMethod(nn.Module):
    """Base class of cross-tokenizer LM methods."""

    Options = NoOptions
    needs_teacher = True
    needs_teacher_logits = False
    needs_spans = False
    row_mode: str | None = None  # "last_token" / "received" when attention rows are needed
    row_query: str = "last_text"  # the last-token row's query: the last text token, or "last_token" (the EOS)
    # what a teacher cache stores for the method (lmdistill.train.lm_cache): "spans" (the method's own
    # ``teacher_targets``, read back as ``batch["teacher_targets"]`` with ``t`` None), "token_logits" (the
    # teacher's response-position logits, top k + the rest, rebuilt into ``t.logits``), or None (online only)
    cache_form: str | None = None
    no_cache_reason = "it has no cached form: train it online (drop data.teacher_cache)"

    def cache_signature(self) -> dict:
        """The options that shape what a teacher cache stores (part of its key)."""
        return {"form": self.cache_form}

    def teacher_targets(self, batch, t, heads, top_k: int | None = None) -> dict[str, torch.Tensor]:
        """What a teacher cache stores for a batch ("token_logits": see :func:`token_logit_targets`)."""
        return token_logit_targets(t.logits, top_k)

    def __init__(self, opts, student, teacher, student_tokenizer, teacher_tokenizer, cache_dir=None) -> None:
        super().__init__()
        self.opts = opts

    def needs(self) -> TeacherNeeds:
        """What the method reads in a step (see :class:`TeacherNeeds`)."""
        return TeacherNeeds(teacher=self.needs_teacher, logits=self.needs_teacher_logits,
                            student_layers=tuple(self.student_layers()), teacher_layers=tuple(self.teacher_layers()),
                            rows=self.row_mode, row_query=self.row_query, spans=self.needs_spans,
                            cache_form=self.cache_form)

    def run_facts(self, log_history: list[dict]) -> dict:
        """What the method adds to a run's metrics.json, beside the logged terms (default: nothing)."""
        return {}

    def student_layers(self) -> list[int]:
        """Hidden-state indices of the student the method reads (the last is always provided)."""
        return []

    def teacher_layers(self) -> list[int]:
        """Hidden-state indices of the teacher the method reads."""
        return []

    def forward(self, batch: dict, s: Side, t: Side | None, heads: dict) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def _config(model):
    """A model's config, or the config itself (a teacher cache trains with the teacher's config only)."""
    from transformers import PretrainedConfig

    return model if isinstance(model, PretrainedConfig) else base_model(model).config


def num_layers(model) -> int:
    """Number of blocks of a causal LM (or of its config)."""
    return int(_config(model).num_hidden_layers)


def hidden_size(model) -> int:
    """Width of a causal LM's hidden states (or of its config's)."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return int(model.hidden_size)
    return int(model.get_input_embeddings().embedding_dim)


def vocab_rows(model) -> int:
    """Rows of a causal LM's output layer (or its config's vocabulary size); may exceed the tokenizer's."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return int(model.vocab_size)
    return int(model.get_output_embeddings().weight.shape[0])


def token_logit_targets(logits: torch.Tensor, top_k: int | None) -> dict[str, torch.Tensor]:
    """The teacher's response-position logits as a cache stores them: all of them (``logits [N, V]``),
    or the top k (``logits``, ``idx [N, k]``) with the logsumexp over the whole vocabulary (``lse [N]``)."""
    z = logits.float()
    if top_k is None or top_k >= z.size(-1):
        return {"logits": z}
    vals, idx = z.topk(top_k, dim=-1)
    return {"logits": vals, "idx": idx, "lse": z.logsumexp(-1)}


def logits_from_targets(tg: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """``[N, V]`` teacher logits back from :func:`token_logit_targets`: exact for all of them; for the
    top k, the remaining probability mass is spread evenly over the other ``V - k`` entries (so the
    softmax keeps the top k's probabilities and the total)."""
    z = tg["logits"].float()
    if "idx" not in tg:
        return z
    lse = tg["lse"].float()
    rest = (1 - (z - lse[:, None]).exp().sum(-1)).clamp_min(1e-30)
    fill = lse + (rest / max(vocab - z.size(-1), 1)).log()
    out = fill[:, None].expand(-1, vocab).clone()
    return out.scatter_(1, tg["idx"].long(), z)


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Row-wise ``KL(softmax(p/tau) || softmax(q/tau))`` ``[N]``."""
    p_log = F.log_softmax(p_logits.float() / tau, dim=-1)
    q_log = F.log_softmax(q_logits.float() / tau, dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def aligned_by_position(s: Side, t: Side, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Student and teacher response rows aligned by index from the first response token,
    truncated to the shorter side (ULD, MultiLevelOT). Returns flat row indices and lengths."""
    s_rows, t_rows, lengths = [], [], []
    for si, ti in zip(s.resp.per_example(batch_size), t.resp.per_example(batch_size)):
        n = min(len(si), len(ti))
        s_rows.append(si[:n])
        t_rows.append(ti[:n])
        lengths.append(n)
    return torch.cat(s_rows), torch.cat(t_rows), lengths
