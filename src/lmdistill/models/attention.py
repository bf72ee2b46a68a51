"""The attention row of the last real token, at chosen layers only, without asking the model
for every attention matrix (docs/methods.md 1.2).

``output_attentions=True`` forces eager attention and keeps ``[B, H, T, T]`` per layer. Instead
we register an attention function (``lmdistill_sdpa``) with transformers' attention interface:
it runs the model's usual SDPA kernel and, at the layers marked for capture, also computes
``softmax(q_last K^T * scaling)`` for the last real query only: ``O(H * T)`` extra work and
memory per mapped layer. ``received`` weighting (sum over all queries) needs the full
probability matrix of that layer, computed once there and summed, never stored.

The row honours causality, padding, grouped-query heads, sliding windows and logit soft-capping.
The captured rows are detached (``sg``).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmdistill.errors import LmdistillError
from lmdistill.models import base_model, decoder_layers

try:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
except ImportError:  # pragma: no cover - older transformers
    ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask = None, None

IMPL = "lmdistill_sdpa"


def _row_attention(module, query, key, *, mode: str, scaling, sliding_window, softcap) -> torch.Tensor:
    state = module._lmdistill_state
    mask2d = state["mask"]  # [B, T] 1 = real token
    B, H, T, D = query.shape
    rep = H // key.shape[1]
    k = key.repeat_interleave(rep, dim=1) if rep > 1 else key  # [B, H, T, D]
    scale = scaling if scaling is not None else D ** -0.5
    pos = torch.arange(T, device=query.device)
    last = state.get("query")  # the query position of each row [B], when given
    if last is None:
        last = (mask2d.long() * (pos + 1)).argmax(dim=1)  # index of the last real token [B]
    if mode == "received":
        scores = torch.einsum("bhqd,bhkd->bhqk", query, k).float() * scale  # [B, H, T, T], this layer only
        allowed = (pos[None, :] <= pos[:, None])[None] & mask2d.bool()[:, None, :]  # [B, Tq, Tk]
        if sliding_window:
            allowed &= (pos[:, None] - pos[None, :] < sliding_window)[None]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        probs = probs * mask2d[:, None, :, None].to(probs.dtype)  # only real queries
        return probs.sum(dim=(1, 2)).detach()  # [B, T]
    q = query[torch.arange(B, device=query.device), :, last]  # [B, H, D]
    scores = torch.einsum("bhd,bhkd->bhk", q, k).float() * scale  # [B, H, T]
    allowed = mask2d.bool() & (pos[None] <= last[:, None])
    if sliding_window:
        allowed &= pos[None] > last[:, None] - sliding_window
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return probs.sum(dim=1).detach()  # [B, T]


def lmdistill_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that also records the last-token attention row at marked layers."""
    mode = getattr(module, "_lmdistill_capture", None)
    if mode is not None and getattr(module, "_lmdistill_state", None) is not None:
        module._lmdistill_row = _row_attention(
            module, query.detach(), key.detach(), mode=mode, scaling=kwargs.get("scaling"),
            sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"),
        )
    kwargs.pop("softcap", None) if kwargs.get("softcap") is None else None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPL, lmdistill_sdpa)
if ALL_MASK_ATTENTION_FUNCTIONS is not None:
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL, sdpa_mask)


def _attention_module(block) -> torch.nn.Module:
    for attr in ("self_attn", "attn", "attention"):
        if hasattr(block, attr):
            return getattr(block, attr)
    raise LmdistillError(f"cannot find the attention module of {type(block).__name__}: SRA captures attention "
                         "rows of Llama/GPT-2-like blocks; set method_args.weighting=uniform to need none")


class RowCapture:
    """Marks blocks for last-token-row capture and reads the rows after a forward pass.

    ``layers`` are hidden-state indices (``l`` = output of block ``l``, 1-based).
    """

    def __init__(self, model, layers: list[int], mode: str = "last_token") -> None:
        self.model, self.layers, self.mode = model, list(layers), mode
        blocks = decoder_layers(model)
        self.modules = {l: _attention_module(blocks[l - 1]) for l in self.layers}
        base = base_model(model)
        if base.config._attn_implementation not in (IMPL,):
            base.set_attn_implementation(IMPL) if hasattr(base, "set_attn_implementation") else None
            base.config._attn_implementation = IMPL
        for m in self.modules.values():
            m._lmdistill_capture = mode

    def prepare(self, attention_mask: torch.Tensor, query: torch.Tensor | None = None) -> None:
        """Call before the forward pass with the batch's ``[B, T]`` attention mask and, optionally,
        each row's query position ``[B]`` (default: its last real token)."""
        for m in self.modules.values():
            m._lmdistill_state = {"mask": attention_mask, "query": query}
            m._lmdistill_row = None

    def rows(self) -> dict[int, torch.Tensor]:
        """``{layer: [B, T]}`` summed-over-heads attention rows of the last forward pass."""
        out = {}
        for l, m in self.modules.items():
            if m._lmdistill_row is None:
                raise RuntimeError(
                    f"no attention row was captured at layer {l}: the model does not route attention through "
                    "transformers' attention interface"
                )
            out[l] = m._lmdistill_row
            m._lmdistill_state = None
        return out
