"""Spans shared by two tokenizations of the same text (docs/methods.md 1.1). Written by hand: no
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

:func:`align_batch` aligns a whole batch in one call: one compiled merge pass per row
(:mod:`lmdistill.align.kernel`, with numba), or a fixed number of numpy operations for the
batch (without it); both give the same spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmdistill.align import kernel
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
    backend: str = "auto",
) -> BatchAlignment:
    """Spans of every row of a batch at once (see :func:`align_offsets` for one row).

    ``backend``: ``"compiled"`` (one merge pass per row, :mod:`lmdistill.align.kernel`, needs
    numba), ``"numpy"`` (a fixed number of array operations for the whole batch), or ``"auto"``
    (compiled when numba is installed). Both give the same spans; the compiled one is what keeps
    alignment under 5% of tokenisation at every batch size (``benchmarks/align_cost.py``).
    """
    if backend not in ("auto", "compiled", "numpy"):
        raise LmdistillError(f"alignment backend {backend!r}: use auto, compiled or numpy")
    if backend == "compiled" and not kernel.COMPILED:
        raise LmdistillError('the compiled alignment needs numba: pip install "lmdistill[fast]" (or use backend="numpy")')
    b = len(student_offsets)
    if b == 0:
        z = np.zeros((0, 1, 2), dtype=np.int64)
        return BatchAlignment(z, z.copy(), z.copy(), np.zeros((0, 1), dtype=bool), [])
    # few array operations here: at batch size 1 each one's fixed cost counts (benchmarks/align_cost.py)
    offsets = [*student_offsets, *teacher_offsets]
    lens = [len(o) for o in offsets]
    try:
        off = np.concatenate([o for o in offsets if len(o)] or [np.zeros((0, 2))]).astype(np.int64, copy=False)
    except ValueError:
        off = np.zeros(0)  # rows of different shapes: refused below
    keep = [*(student_keep or [None] * b), *(teacher_keep or [None] * b)]
    if all(k is not None for k in keep):
        keep = np.concatenate(keep).astype(bool, copy=False)
    else:
        keep = np.concatenate([np.ones(n, dtype=bool) if k is None else np.asarray(k, dtype=bool).reshape(-1)
                               for n, k in zip(lens, keep)])
    if off.ndim != 2 or off.shape[1] != 2 or len(keep) != len(off) or len(teacher_offsets) != b:
        raise LmdistillError("align_batch wants, per row and side, offsets [n, 2] and a keep mask [n] of the same n, "
                             "and as many teacher rows as student rows")
    lengths, starts = np.array(lens, dtype=np.int64), np.asarray(response_starts, dtype=np.int64).reshape(b)
    if response_ends is None:  # the furthest real token end of the row, either side
        real = keep & (off[:, 1] > off[:, 0])
        response_ends = np.zeros(b, dtype=np.int64)
        np.maximum.at(response_ends, np.repeat(np.arange(2 * b) % b, lengths), np.where(real, off[:, 1], 0))
    resp_chars = [max(int(e) - int(r), 0) for e, r in zip(response_ends, response_starts)]

    if backend == "numpy" or not kernel.COMPILED:
        spans, mask, counts = _spans_numpy(off, keep, lengths, starts)
    else:
        spans, mask, counts = kernel.scan_rows(off, keep, lengths, starts)
    return _pack(spans, mask, counts, resp_chars, max_spans)


def _spans_numpy(off, keep, lengths, rs):
    """The numpy path of :func:`align_batch`; returns what :func:`lmdistill.align.kernel.scan_rows`
    returns: ``[b, K, 6]`` spans (char range, student token range, teacher token range), each row
    padded with zeros to the longest (K >= 1), their ``[b, K]`` mask, and ``[b, 4]`` counts per row
    (spans, aligned characters, student tokens in spans, teacher tokens in spans).

    The 2B rows (student rows, then teacher rows) are laid end to end, character c of row r
    getting the key r * stride + c. Token ends are made monotone within each row (one running
    maximum serves all rows, since later rows have larger keys); a side's cuts are its token
    ends and each row's first start (uncovered characters go to the token that follows them),
    marked in a boolean table; the common cuts are where the student half and the teacher half
    of the table agree. Every span bound is a token end of both sides, so a span's tokens on a
    side are the run of (sorted) end keys in (previous bound, bound]: two searchsorted calls.
    Tokens that are not real (specials, empty offsets) are not filtered out, which would cost
    passes over the batch: they take a neighbour's end key, and so stay out of span edges.
    """
    b = len(rs)
    real = keep & (off[:, 1] > off[:, 0])
    row_offset = np.cumsum(lengths) - lengths
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
    n_spans = np.bincount(span_row, minlength=b)
    slot = np.arange(n) - np.repeat(np.cumsum(n_spans) - n_spans, n_spans)  # index within its row
    k = max(int(n_spans.max()), 1)
    spans = np.zeros((b * k, 6), dtype=np.int64)
    spans[span_row * k + slot] = np.stack([lo - base, hi - base, first_tok[:n], last_tok[:n] + 1, first_tok[n:],
                                           last_tok[n:] + 1], axis=1)
    counts = np.stack([n_spans, np.bincount(span_row, weights=hi - lo, minlength=b), per_side[0], per_side[1]], axis=1)
    return spans.reshape(b, k, 6), np.arange(k) < n_spans[:, None], counts.astype(np.int64)


def _pack(spans, mask, counts, resp_chars, max_spans) -> BatchAlignment:
    """Padded spans, uniformly subsampled in rows beyond ``max_spans``, and each row's statistics."""
    if spans.shape[1] > max_spans:  # uniform subsampling (the rounded points are distinct: spacing > 1)
        n_spans = counts[:, 0]
        for r in np.nonzero(n_spans > max_spans)[0]:
            spans[r, :max_spans] = spans[r, np.linspace(0, n_spans[r] - 1, max_spans).round().astype(np.int64)]
        spans, mask = spans[:, :max_spans], mask[:, :max_spans]

    stats = []
    for (ns, aligned, s_tok, t_tok), rc in zip(counts.tolist(), resp_chars):
        st = {"n_spans": ns, "aligned_chars": aligned, "response_chars": rc,
              "ratio": round(aligned / rc, 4) if rc > 0 and ns > 0 else 0.0,
              "student_tokens_per_span": round(s_tok / max(ns, 1), 4),
              "teacher_tokens_per_span": round(t_tok / max(ns, 1), 4), "subsampled": ns > max_spans}
        if ns > max_spans:
            st["n_spans_kept"] = max_spans
        stats.append(st)
    return BatchAlignment(spans[..., 0:2], spans[..., 2:4], spans[..., 4:6], mask, stats)


def align_offsets(
    student_offsets, teacher_offsets, response_start: int = 0, response_end: int | None = None,
    student_keep=None, teacher_keep=None, max_spans: int = 1024, backend: str = "auto",
) -> Alignment:
    """Spans from two offset lists (``[n, 2]`` character ranges; empty ranges are skipped).

    ``*_keep`` (optional boolean masks) exclude further tokens, e.g. padding or specials with
    non-empty offsets. ``response_end`` (default: the furthest token end) is used for the
    alignment ratio only. One row of :func:`align_batch`.
    """
    return align_batch([student_offsets], [teacher_offsets], [response_start],
                       None if response_end is None else [response_end],
                       [student_keep], [teacher_keep], max_spans, backend).row(0)


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
