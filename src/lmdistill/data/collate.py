"""Batches for LM distillation: prompt/response rows encoded for the student and the teacher,
cut to ``max_length`` without losing the response, with the spans shared by both
tokenizations and, when training from a teacher cache, the cached teacher targets."""

from __future__ import annotations

import numpy as np
import torch

from lmdistill.align.spans import align_batch


def encode_batch(tokenizer, prompts: list[str], responses: list[str], max_length: int,
                 prompt_max_fraction: float = 0.5) -> list[tuple]:
    """Per example: ``ids``, ``labels`` (response tokens, and EOS when the response is whole),
    offsets and real-token mask.

    One tokenizer call for the batch (the fast tokenizer encodes the rows in parallel). A row
    longer than ``max_length`` keeps its leading special tokens (BOS), the end of its prompt
    (at most ``prompt_max_fraction * max_length`` tokens, more when the response is short) and
    as much of its response as fits. A response that had to be cut gets no EOS: the model is
    never taught to stop mid-sentence.
    """
    texts = [p + r for p, r in zip(prompts, responses)]
    enc = tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True, truncation=False)
    eos = tokenizer.eos_token_id
    prompt_cap = int(max_length * prompt_max_fraction)
    out = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(enc["input_ids"][i], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        keep = ~np.asarray(enc["special_tokens_mask"][i], dtype=bool)
        real = np.flatnonzero(keep)
        lo, hi = (int(real[0]), int(real[-1]) + 1) if len(real) else (len(ids), len(ids))
        resp = keep & (offsets[:, 1] > len(prompt)) & (offsets[:, 1] > offsets[:, 0])
        n_prompt = int((~resp[lo:hi]).sum()) if len(real) else 0  # text tokens before the response
        n_resp = hi - lo - n_prompt
        appends_eos = eos is not None and eos not in ids[hi:].tolist()
        after = 1 if appends_eos else len(ids) - hi  # tokens after the text: the EOS (and other end specials)
        room = max_length - lo
        if len(ids) + int(appends_eos) <= max_length:  # fits as it is
            keep_prompt, keep_resp, whole = n_prompt, n_resp, True
        elif n_resp + after + min(n_prompt, prompt_cap) <= room:  # the response fits once the prompt is cut
            keep_resp, whole = n_resp, True
            keep_prompt = min(n_prompt, room - n_resp - after)
        else:  # the response is cut: the prompt keeps at most its cap, nothing after the text
            keep_resp = min(n_resp, max(room - min(n_prompt, prompt_cap), 0))
            keep_prompt, whole = min(n_prompt, room - keep_resp), False
        head = np.arange(lo)
        body = np.arange(lo + n_prompt - keep_prompt, lo + n_prompt + keep_resp)
        tail = np.arange(hi, len(ids)) if whole else np.arange(0)
        sel = np.concatenate([head, body, tail]).astype(np.int64)
        ids, offsets, keep, resp = ids[sel], offsets[sel], keep[sel], resp[sel]
        labels = np.where(resp, ids, -100)
        if whole and eos is not None:
            at = np.flatnonzero(ids == eos)
            at = at[at >= len(head) + len(body)]
            if len(at):  # the tokenizer appended EOS itself
                labels[at[0]] = eos
            else:
                ids, labels = np.append(ids, eos), np.append(labels, eos)
                offsets = np.concatenate([offsets, np.zeros((1, 2), dtype=np.int64)])
                keep = np.append(keep, False)
        out.append((ids.tolist(), labels.tolist(), offsets, keep))
    return out


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs], dtype=torch.long)


def _last_text(encoded: list[tuple]) -> torch.Tensor:
    """Each row's last text token (not a special token such as the appended EOS) ``[B]``."""
    return torch.tensor([int(np.flatnonzero(e[3])[-1]) if e[3].any() else len(e[0]) - 1 for e in encoded])


class InstructionCollator:
    """Batches prompt/response rows for both tokenizers (and spans when the method needs them)."""

    def __init__(self, student_tok, teacher_tok, max_length: int, spans: bool, max_spans: int = 1024,
                 prompt_max_fraction: float = 0.5, targets=None) -> None:
        self.s_tok, self.t_tok = student_tok, teacher_tok
        self.max_length, self.spans, self.max_spans = max_length, spans, max_spans
        self.prompt_max_fraction = prompt_max_fraction
        self.targets = targets  # a teacher cache (lmdistill.train.lm_cache.LMTeacherCache): rows need "index"
        self.stats: list[dict] = []

    def __call__(self, rows: list[dict]) -> dict:
        out: dict = {}
        prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
        s_enc = encode_batch(self.s_tok, prompts, responses, self.max_length, self.prompt_max_fraction)
        out["s_input_ids"] = _pad([e[0] for e in s_enc], self.s_tok.pad_token_id)
        out["s_attention_mask"] = _pad([[1] * len(e[0]) for e in s_enc], 0)
        out["s_labels"] = _pad([e[1] for e in s_enc], -100)
        out["s_last_text"] = _last_text(s_enc)
        if self.t_tok is None:
            return out
        t_enc = encode_batch(self.t_tok, prompts, responses, self.max_length, self.prompt_max_fraction)
        out["t_input_ids"] = _pad([e[0] for e in t_enc], self.t_tok.pad_token_id)
        out["t_attention_mask"] = _pad([[1] * len(e[0]) for e in t_enc], 0)
        out["t_labels"] = _pad([e[1] for e in t_enc], -100)
        out["t_last_text"] = _last_text(t_enc)
        if self.spans:
            al = align_batch([e[2] for e in s_enc], [e[2] for e in t_enc], [len(p) for p in prompts],
                             [len(p) + len(r) for p, r in zip(prompts, responses)], [e[3] for e in s_enc],
                             [e[3] for e in t_enc], self.max_spans)
            self.stats = al.stats
            out.update({"spans_s": torch.from_numpy(al.student), "spans_t": torch.from_numpy(al.teacher),
                        "span_mask": torch.from_numpy(al.mask.astype(np.int64)),
                        "align_ratio": torch.tensor([st["ratio"] for st in al.stats], dtype=torch.float32)})
        if self.targets is not None:
            out["teacher_targets"] = self.targets.collate([int(r["index"]) for r in rows], out)
        return out
