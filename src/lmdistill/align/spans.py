"""Spans shared by two tokenizations of the same text (methods.md 1.1). Written by hand: no
maintained library computes the finest common segmentation of two offset lists.

Both tokenizers encode the same string and report character offsets. A *cut* of one side
is a position where one of its tokens ends (or where its first token starts). A span
boundary is a cut of both sides; span k holds, on each side, the tokens that end after
boundary k-1 and at or before boundary k. This is the finest common segmentation.

Characters a tokenizer does not cover (a space folded into a word-boundary marker, for
instance) are counted with the token that follows them: a token's range runs from the end
of the previous token of its side. So, on each side, the tokens of a span cover exactly the
span's characters, and the spans partition the aligned part of the response.

* Only the response is aligned: spans start at the first common cut at or after
  ``response_start``; tokens that end at or before it are context.
* Tokens with empty offsets (BOS, EOS, padding, other specials) belong to no span.
* Truncation: spans stop at the last common cut, wherever each side was cut.
* ``max_spans``: beyond it, spans are subsampled uniformly (``stats["subsampled"]``).

Everything is vectorised with numpy over the whole batch (:func:`align_batch`): the cost is a
few array operations per batch, not per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmdistill.errors import LmdistillError


@dataclass
class Alignment:
    """Spans of one sequence: ``chars[k] = (a, b)``, ``student[k] = (i, j)``, ``teacher[k] = (k0, k1)``
    (half-open ranges: characters, and indices into each side's input_ids)."""

    chars: np.ndarray  # [K, 2]
    student: np.ndarray  # [K, 2]
    teacher: np.ndarray  # [K, 2]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chars)

    def to_json(self) -> dict:
        """The ``lmdistill align --json`` object."""
        return {
            "spans": [
                {"chars": [int(c[0]), int(c[1])], "student": [int(s[0]), int(s[1])], "teacher": [int(t[0]), int(t[1])]}
                for c, s, t in zip(self.chars, self.student, self.teacher)
            ],
            "stats": self.stats,
        }


@dataclass
class BatchAlignment:
    """Spans of a batch, padded to the longest row (``K >= 1``): ``chars``, ``student``, ``teacher``
    are ``[B, K, 2]`` (as in :class:`Alignment`), ``mask`` is ``[B, K]``; ``stats`` one dict per row."""

    chars: np.ndarray
    student: np.ndarray
    teacher: np.ndarray
    mask: np.ndarray
    stats: list

    def row(self, i: int) -> Alignment:
        n = int(self.mask[i].sum())
        return Alignment(self.chars[i, :n], self.student[i, :n], self.teacher[i, :n], self.stats[i])


def align_batch(
    student_offsets: list, teacher_offsets: list, response_starts, response_ends=None,
    student_keep: list | None = None, teacher_keep: list | None = None, max_spans: int = 1024,
) -> BatchAlignment:
    """Spans of every row of a batch at once (see :func:`align_offsets` for one row).

    A fixed number of numpy operations for the whole batch, both sides together: this is what
    keeps alignment a small fraction of tokenisation (``benchmarks/align_cost.py``).

    How: the 2B rows (student rows, then teacher rows) are laid end to end, character c of row
    r getting the key r * stride + c. Token ends are made monotone within each row (one running
    maximum serves all rows, since later rows have larger keys); a side's cuts are its token
    ends and each row's first start (uncovered characters go to the token that follows them),
    marked in a boolean table; the common cuts are where the student half and the teacher half
    of the table agree. Every span bound is a token end of both sides, so a span's tokens on a
    side are the run of (sorted) end keys in (previous bound, bound]: two searchsorted calls.
    Tokens that are not real (specials, empty offsets) are not filtered out, which would cost
    passes over the batch: they take a neighbour's end key, and so stay out of span edges.
    """
    b = len(student_offsets)
    if b == 0:
        z = np.zeros((0, 1, 2), dtype=np.int64)
        return BatchAlignment(z, z.copy(), z.copy(), np.zeros((0, 1), dtype=bool), [])
    arrays = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in (*student_offsets, *teacher_offsets)]
    lengths = np.array([len(o) for o in arrays], dtype=np.int64)
    row_offset = np.cumsum(lengths) - lengths
    off = np.concatenate(arrays)
    real = off[:, 1] > off[:, 0]
    keep = [*(student_keep or [None] * b), *(teacher_keep or [None] * b)]
    if any(k is not None for k in keep):
        real &= np.concatenate([np.ones(n, dtype=bool) if k is None else np.asarray(k, dtype=bool).reshape(-1)
                                for n, k in zip(lengths, keep)])
    stride = int(off[:, 1].max(initial=0)) + 1
    base = np.repeat(np.arange(2 * b, dtype=np.int64) * stride, lengths)
    # monotone end keys; a token that is not real takes the end before it (fwd) or after it (bwd),
    # so it never opens a span (fwd) nor closes one (bwd)
    fwd = np.maximum.accumulate(np.where(real, off[:, 1] + base, -1))
    bwd = np.minimum.accumulate(np.where(real, fwd, np.iinfo(np.int64).max)[::-1])[::-1]
    first_real = real.copy()
    first_real[1:] &= fwd[:-1] < base[1:]  # the running end before it lies in an earlier row
    table = np.zeros(2 * b * stride + 1, dtype=bool)  # the last slot takes what is not a cut
    table[np.where(real, fwd, 2 * b * stride)] = True
    table[off[first_real, 0] + base[first_real]] = True
    common = np.nonzero(table[:b * stride] & table[b * stride:-1])[0]  # sorted, unique

    rs = np.asarray(response_starts, dtype=np.int64).reshape(b)
    if response_ends is None:
        response_ends = np.zeros(b, dtype=np.int64)
        np.maximum.at(response_ends, np.repeat(np.arange(2 * b) % b, lengths), np.where(real, off[:, 1], 0))
    resp_chars = np.maximum(np.asarray(response_ends, dtype=np.int64).reshape(b) - rs, 0)
    c_row = common // stride
    in_response = common - c_row * stride >= rs[c_row]
    common, c_row = common[in_response], c_row[in_response]
    # span j ends at common[j] and starts at the previous common cut of the same row
    is_end = np.zeros(len(common), dtype=bool)
    is_end[1:] = c_row[1:] == c_row[:-1]
    hi, lo = common[is_end], common[:-1][is_end[1:]]
    span_row, n = c_row[is_end], int(is_end.sum())
    shift = b * stride  # teacher keys
    side_row = np.concatenate([span_row, span_row + b])
    g_first = np.searchsorted(fwd, np.concatenate([lo, lo + shift]), side="right")  # both are real tokens
    g_last = np.searchsorted(bwd, np.concatenate([hi, hi + shift]), side="right") - 1
    n_real = np.cumsum(real)
    per_side = np.bincount(side_row, weights=n_real[g_last] - n_real[g_first] + 1, minlength=2 * b).reshape(2, b)
    first_tok, last_tok = g_first - row_offset[side_row], g_last - row_offset[side_row]  # indices in the row
    base = span_row * stride
    every = np.stack([lo - base, hi - base, first_tok[:n], last_tok[:n] + 1, first_tok[n:], last_tok[n:] + 1], axis=1)

    n_spans = np.bincount(span_row, minlength=b)
    aligned = np.bincount(span_row, weights=hi - lo, minlength=b).astype(np.int64)
    row_start = np.cumsum(n_spans) - n_spans
    slot = np.arange(n) - np.repeat(row_start, n_spans)  # index within its row
    subsampled = n_spans > max_spans
    kept = np.minimum(n_spans, max_spans)
    if subsampled.any():  # uniform subsampling (the rounded points are distinct: spacing > 1)
        keep = np.ones(n, dtype=bool)
        for r in np.nonzero(subsampled)[0]:
            keep[row_start[r]:row_start[r] + n_spans[r]] = False
            keep[row_start[r] + np.linspace(0, n_spans[r] - 1, max_spans).round().astype(np.int64)] = True
        slot = (np.cumsum(keep) - 1) - np.repeat(np.cumsum(kept) - kept, n_spans)
        every, span_row, slot = every[keep], span_row[keep], slot[keep]
    k = max(int(kept.max()), 1)  # one masked slot at least: padded tensors are never empty
    out = np.zeros((b, k, 6), dtype=np.int64)
    mask = np.zeros((b, k), dtype=bool)
    out[span_row, slot] = every
    mask[span_row, slot] = True

    safe = np.maximum(n_spans, 1)
    ratio = np.where((resp_chars > 0) & (n_spans > 0), aligned / np.maximum(resp_chars, 1), 0.0).round(4)
    per_span = (per_side / safe).round(4).tolist()
    stats = [{"n_spans": ns, "aligned_chars": c, "response_chars": rc, "ratio": q, "student_tokens_per_span": sp,
              "teacher_tokens_per_span": tp, "subsampled": sub}
             for ns, c, rc, q, sp, tp, sub in zip(n_spans.tolist(), aligned.tolist(), resp_chars.tolist(),
                                                  ratio.tolist(), per_span[0], per_span[1], subsampled.tolist())]
    for r in np.nonzero(subsampled)[0]:
        stats[r]["n_spans_kept"] = int(kept[r])
    return BatchAlignment(out[..., 0:2], out[..., 2:4], out[..., 4:6], mask, stats)


def align_offsets(
    student_offsets, teacher_offsets, response_start: int = 0, response_end: int | None = None,
    student_keep=None, teacher_keep=None, max_spans: int = 1024,
) -> Alignment:
    """Spans from two offset lists (``[n, 2]`` character ranges; empty ranges are skipped).

    ``*_keep`` (optional boolean masks) exclude further tokens, e.g. padding or specials with
    non-empty offsets. ``response_end`` (default: the furthest token end) is used for the
    alignment ratio only. One row of :func:`align_batch`.
    """
    return align_batch([student_offsets], [teacher_offsets], [response_start],
                       None if response_end is None else [response_end],
                       [student_keep], [teacher_keep], max_spans).row(0)


def encode_with_offsets(tokenizer, text: str, max_length: int | None = None, add_special_tokens: bool = True):
    """``input_ids``, ``offsets`` and a real-token mask of one text (a fast tokenizer is required)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LmdistillError(
            f"tokenizer {type(tokenizer).__name__} is slow and gives no character offsets: use a fast tokenizer "
            "(a model folder with tokenizer.json)"
        )
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens,
                    truncation=max_length is not None, max_length=max_length, return_special_tokens_mask=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    keep = ~np.asarray(enc["special_tokens_mask"], dtype=bool)
    return ids, offsets, keep


def align_text(text: str, student_tokenizer, teacher_tokenizer, response_start: int = 0,
               max_spans: int = 1024, max_length: int | None = None) -> dict:
    """Align one text under two tokenizers; the ``lmdistill align --json`` object."""
    if not 0 <= response_start <= len(text):
        raise LmdistillError(f"--response-start {response_start} is outside the text (0..{len(text)})")
    _, s_off, s_keep = encode_with_offsets(student_tokenizer, text, max_length)
    _, t_off, t_keep = encode_with_offsets(teacher_tokenizer, text, max_length)
    al = align_offsets(s_off, t_off, response_start, len(text), s_keep, t_keep, max_spans)
    return al.to_json()
