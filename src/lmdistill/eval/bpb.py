"""Bits per byte of reference responses: a likelihood metric that does not depend on the
tokenizer, so teachers and students with different vocabularies can be compared.

For each row the model reads ``prompt + response`` (teacher forcing, its own tokenizer and
special tokens). The response tokens are the tokens whose character range ends after the
response starts. We sum ``-log2 p`` over them and divide by the number of UTF-8 bytes they
cover: from the start of the first response token to the end of the last one. When a token
straddles the prompt/response boundary (``"\\n"`` merged with the response's first word, for
instance) its bits are counted, and so are all the bytes it covers, prompt bytes included:
bits and bytes always describe the same stretch of text. Special tokens (BOS/EOS) carry no
bytes and are not counted.

Reported: the mean of the per-row values and the pooled value (total bits / total bytes).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmdistill.data.readers import read_instructions
from lmdistill.eval.generation import _load
from lmdistill.models import base_model, decoder_and_head, lm_head_logits


@torch.no_grad()
def _target_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, want: torch.Tensor | None = None,
                     chunk: int = 512) -> torch.Tensor:
    """``log p(ids[:, t+1] | ids[:, :t+1])`` ``[B, T-1]`` without a ``[B, T, V]`` log-softmax.

    For a transformers causal LM the decoder runs alone and the LM head is applied, in chunks,
    only to the positions ``want`` (``[B, T-1]``, default all) asks for: the response tokens,
    not the prompt or the padding (a 262k vocabulary at 8 x 512 tokens would be 4 GB of
    logits). Positions not wanted are 0.
    """
    base = base_model(model)
    target = ids[:, 1:]
    if hasattr(base, "get_decoder") and base.get_output_embeddings() is not None:
        decoder, head, softcap = decoder_and_head(base)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
        sel = torch.ones_like(target, dtype=torch.bool) if want is None else want.to(ids.device)
        flat_h = hidden[sel]
        flat_t = target[sel]
        vals = torch.empty(flat_t.shape, dtype=torch.float32, device=ids.device)
        for i in range(0, flat_h.size(0), chunk):
            z = lm_head_logits(head, softcap, flat_h[i:i + chunk]).float()
            vals[i:i + chunk] = z.gather(-1, flat_t[i:i + chunk, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
        out = torch.zeros(target.shape, dtype=torch.float32, device=ids.device)
        out[sel] = vals
        return out.cpu()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    out = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (out if want is None else out * want.to(out.device)).cpu()


def response_bits_and_bytes(tok, model, prompts: list[str], responses: list[str]) -> list[tuple[float, int]]:
    """``(bits, bytes)`` of each response under ``model`` (one batch, right padded)."""
    texts = [p + r for p, r in zip(prompts, responses)]
    enc = tok(texts, return_offsets_mapping=True, return_special_tokens_mask=True, padding=True,
              return_tensors="pt")
    offsets = enc.pop("offset_mapping")
    special = enc.pop("special_tokens_mask").bool()
    device = next(model.parameters()).device
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    r = torch.tensor([len(p) for p in prompts])[:, None]
    starts, ends = offsets[..., 0], offsets[..., 1]
    is_resp = (ends > r) & (ends > starts) & ~special & enc["attention_mask"].bool()
    is_resp[:, 0] = False  # the first token has no prediction
    logp = _target_logprobs(model, ids, mask, want=is_resp[:, 1:])  # [B, T-1]: log p(token t+1 | tokens <= t)
    out = []
    for i, text in enumerate(texts):
        pos = torch.nonzero(is_resp[i], as_tuple=True)[0]
        if len(pos) == 0:
            out.append((0.0, 0))
            continue
        bits = float(-logp[i, pos - 1].sum()) / math.log(2)
        a, b = int(starts[i, pos[0]]), int(ends[i, pos[-1]])
        out.append((bits, len(text[a:b].encode("utf-8"))))
    return out


def bpb_eval(model_or_ref, data: str | Path, limit: int | None = None, batch_size: int = 8, tokenizer=None,
             progress: bool = True, trust_remote_code: bool = False) -> dict:
    """``{"bpb": mean over rows, "bpb_pooled": total bits / total bytes, "n": rows}``."""
    rows = read_instructions(data, limit)
    model, tok = _load(model_or_ref, tokenizer, trust_remote_code)
    side = tok.padding_side
    tok.padding_side = "right"
    results: list[tuple[float, int]] = []
    try:
        for i in tqdm(range(0, len(rows), batch_size), desc="bits per byte", disable=not progress):
            chunk = rows[i:i + batch_size]
            results += response_bits_and_bytes(tok, model, [r.prompt for r in chunk], [r.response for r in chunk])
    finally:
        tok.padding_side = side
    per_row = [b / n for b, n in results if n > 0]
    total_bits = sum(b for b, _ in results)
    total_bytes = sum(n for _, n in results)
    return {"bpb": round(float(np.mean(per_row)), 4) if per_row else float("nan"),
            "bpb_pooled": round(total_bits / total_bytes, 4) if total_bytes else float("nan"), "n": len(rows)}
