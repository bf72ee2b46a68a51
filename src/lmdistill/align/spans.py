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

Everything is vectorised with numpy: the cost is a few array operations per sequence.
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


def _side(offsets: np.ndarray, keep: np.ndarray | None):
    """Real tokens of one side: their indices, filled starts and (monotone) ends."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    real = offsets[:, 1] > offsets[:, 0]
    if keep is not None:
        real &= np.asarray(keep, dtype=bool)
    idx = np.nonzero(real)[0]
    if len(idx) == 0:
        return idx, idx, idx
    ends = np.maximum.accumulate(offsets[idx, 1])
    starts = np.concatenate([offsets[idx[:1], 0], ends[:-1]])
    return idx, starts, ends


def _empty(stats: dict) -> Alignment:
    z = np.zeros((0, 2), dtype=np.int64)
    return Alignment(z, z.copy(), z.copy(), stats)


def align_offsets(
    student_offsets, teacher_offsets, response_start: int = 0, response_end: int | None = None,
    student_keep=None, teacher_keep=None, max_spans: int = 1024,
) -> Alignment:
    """Spans from two offset lists (``[n, 2]`` character ranges; empty ranges are skipped).

    ``*_keep`` (optional boolean masks) exclude further tokens, e.g. padding or specials with
    non-empty offsets. ``response_end`` (default: the furthest token end) is used for the
    alignment ratio only.
    """
    s_idx, s_start, s_end = _side(student_offsets, student_keep)
    t_idx, t_start, t_end = _side(teacher_offsets, teacher_keep)
    if response_end is None:
        response_end = int(max(s_end[-1] if len(s_end) else 0, t_end[-1] if len(t_end) else 0))
    resp_chars = max(int(response_end) - int(response_start), 0)
    stats = {"n_spans": 0, "aligned_chars": 0, "response_chars": resp_chars, "ratio": 0.0,
             "student_tokens_per_span": 0.0, "teacher_tokens_per_span": 0.0, "subsampled": False}
    if len(s_idx) == 0 or len(t_idx) == 0:
        return _empty(stats)
    s_cuts = np.union1d(s_end, s_start[:1])
    t_cuts = np.union1d(t_end, t_start[:1])
    common = np.intersect1d(s_cuts, t_cuts, assume_unique=True)
    common = common[common >= response_start]
    if len(common) < 2:
        return _empty(stats)
    c0, bounds = common[0], common[1:]

    def assign(idx, ends):
        sel = (ends > c0) & (ends <= bounds[-1])
        k = np.searchsorted(bounds, ends[sel], side="left")  # bounds[k-1] < end <= bounds[k]
        tok = idx[sel]
        first = np.searchsorted(k, np.arange(len(bounds)), side="left")
        last = np.searchsorted(k, np.arange(len(bounds)), side="right")
        return np.stack([tok[first], tok[last - 1] + 1], axis=1), last - first

    s_rng, s_n = assign(s_idx, s_end)
    t_rng, t_n = assign(t_idx, t_end)
    chars = np.stack([np.concatenate([[c0], bounds[:-1]]), bounds], axis=1)
    stats.update({
        "n_spans": int(len(bounds)),
        "aligned_chars": int(bounds[-1] - c0),
        "ratio": round(float(bounds[-1] - c0) / resp_chars, 4) if resp_chars else 0.0,
        "student_tokens_per_span": round(float(s_n.mean()), 4),
        "teacher_tokens_per_span": round(float(t_n.mean()), 4),
    })
    if len(bounds) > max_spans:
        keep = np.unique(np.linspace(0, len(bounds) - 1, max_spans).round().astype(np.int64))
        chars, s_rng, t_rng = chars[keep], s_rng[keep], t_rng[keep]
        stats.update({"subsampled": True, "n_spans_kept": int(len(keep))})
    return Alignment(chars.astype(np.int64), s_rng.astype(np.int64), t_rng.astype(np.int64), stats)


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
