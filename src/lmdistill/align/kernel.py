"""The compiled path of span alignment: one merge pass per row over both sides' tokens.

:func:`scan_rows` computes exactly what the numpy path of :func:`lmdistill.align.spans.align_batch`
computes (the tests check it row for row), in a single pass instead of ~50 array operations,
each with its fixed cost. It is plain Python, compiled with numba when numba is installed
(``pip install "lmdistill[fast]"``; ``make`` installs it); without numba, ``align_batch`` uses
the numpy path and gives the same spans, 2.5-5x slower (``benchmarks/align_cost.py``).

One side's *cut* values, in order: its first real token's start, then the running maximum of
its real tokens' ends. A real token belongs to the cut equal to the running maximum at it, so
tokens nested in an earlier token (several byte tokens of one character, for instance) stay
with that earlier token. The two sides are walked together, always advancing the side whose
cut is behind; where the cuts are equal, the cut is common, and the tokens consumed on each
side since the previous common cut (from ``response_start`` on) form one span.
"""

from __future__ import annotations

import numpy as np

try:
    import numba

    COMPILED = True
except Exception:  # not installed, or built for another numpy: the functions stay plain Python
    COMPILED = False


def _jit(fn):
    """Compiled at first call, then cached on disk (in memory only where no cache folder is writable)."""
    if not COMPILED:
        return fn
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba found no writable place for its cache
        return numba.njit(nogil=True)(fn)


@_jit
def _advance(off, keep, state, end):
    """Move one side to its next cut. ``state`` = [cut, next token to scan, last token of the cut's
    group, real tokens consumed, first token after the last common cut (-1: none yet)]. The next
    token to scan is always real and ends after the cut (or is ``end``: no further cut, False)."""
    q = state[1]
    if q == end:
        return False
    m = off[q, 1]
    state[0], state[2] = m, q
    state[3] += 1
    if state[4] < 0:
        state[4] = q
    q += 1
    while q < end and not (keep[q] and off[q, 1] > off[q, 0] and off[q, 1] > m):
        if keep[q] and off[q, 1] > off[q, 0]:  # real tokens nested in this one join its cut
            state[2] = q
            state[3] += 1
        q += 1
    state[1] = q
    return True


@_jit
def _first_real(off, keep, start, end):
    i = start
    while i < end and not (keep[i] and off[i, 1] > off[i, 0]):
        i += 1
    return i


@_jit
def scan_rows(off, keep, lengths, response_starts):
    """Spans of ``b`` rows: ``off`` [N, 2] and ``keep`` [N] hold the b student rows then the b teacher
    rows end to end (``lengths``: [2b]); a token is real when kept and its range is not empty.

    Returns ``spans`` [b, K, 6], each row's spans padded with zeros to the longest row (K >= 1):
    (char start, char end, student first token, student end token, teacher first token, teacher
    end token), token indices counted within the row; ``mask`` [b, K] (True on spans); and
    ``counts`` [b, 4]: (spans, aligned characters, student tokens in spans, teacher tokens in spans)."""
    b = len(response_starts)
    a0, b0 = 0, lengths[:b].sum()  # where row r starts on each side
    flat = np.empty((b0 + 1, 6), dtype=np.int64)  # a span holds >= 1 student token
    counts = np.zeros((b, 4), dtype=np.int64)
    n = 0
    sa = np.zeros(5, dtype=np.int64)
    sb = np.zeros(5, dtype=np.int64)
    for r in range(b):
        a1, b1 = a0 + lengths[r], b0 + lengths[b + r]
        pa, pb = _first_real(off, keep, a0, a1), _first_real(off, keep, b0, b1)
        if pa < a1 and pb < b1:
            sa[0], sa[1], sa[2], sa[3], sa[4] = off[pa, 0], pa, pa - 1, 0, -1
            sb[0], sb[1], sb[2], sb[3], sb[4] = off[pb, 0], pb, pb - 1, 0, -1
            rs = response_starts[r]
            lo, ca, cb = -1, 0, 0
            while True:
                if sa[0] == sb[0]:
                    if sa[0] >= rs:
                        if lo >= 0:
                            flat[n, 0], flat[n, 1] = lo, sa[0]
                            flat[n, 2], flat[n, 3] = sa[4] - a0, sa[2] + 1 - a0
                            flat[n, 4], flat[n, 5] = sb[4] - b0, sb[2] + 1 - b0
                            counts[r, 0] += 1
                            counts[r, 1] += sa[0] - lo
                            counts[r, 2] += sa[3] - ca
                            counts[r, 3] += sb[3] - cb
                            n += 1
                        lo, ca, cb = sa[0], sa[3], sb[3]
                        sa[4] = sb[4] = -1
                    if not _advance(off, keep, sa, a1) or not _advance(off, keep, sb, b1):
                        break
                elif sa[0] < sb[0]:
                    if not _advance(off, keep, sa, a1):
                        break
                elif not _advance(off, keep, sb, b1):
                    break
        a0, b0 = a1, b1
    spans = np.zeros((b, max(counts[:, 0].max(), 1), 6), dtype=np.int64)
    mask = np.zeros((b, spans.shape[1]), dtype=np.bool_)
    n = 0
    for r in range(b):
        for k in range(counts[r, 0]):
            spans[r, k] = flat[n]
            mask[r, k] = True
            n += 1
    return spans, mask, counts
