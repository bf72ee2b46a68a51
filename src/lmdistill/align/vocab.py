"""Shared vocabularies and edit-distance maps between two tokenizers (methods.md 1.6, 1.8).
Written by hand: no maintained library maps one vocabulary onto another.

A token's *normalised string* is the text it stands for: the byte-level BPE alphabet
(``Ġ`` for a space, ...) decoded to bytes and then UTF-8, SentencePiece's ``▁`` turned into a
space, byte-fallback tokens (``<0x41>``) turned into their byte. Tokens that are not valid
UTF-8 on their own keep a ``bytes:..`` key, so a lone byte still matches the same lone byte
on the other side. Special tokens are left out.

``vocab_match = "exact"`` compares raw token strings instead (the ablation).

Maps are computed once per tokenizer pair and cached as ``.npy`` files in the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lmdistill.errors import LmdistillError


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {v: k for k, v in _bytes_to_unicode().items()}


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer uses the GPT-2 byte-level alphabet (``Ġ`` for a space)."""
    keys = list(tokenizer.get_vocab())
    return sum(k.startswith("Ġ") for k in keys) > sum(k.startswith("▁") for k in keys)


def _decode_bytes(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + b.hex()


def normalised_strings(tokenizer, exact: bool = False) -> list[str | None]:
    """The normalised string of every token id (``None`` for special tokens)."""
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    out: list[str | None] = [None] * size
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tok_id in getattr(tokenizer, "added_tokens_decoder", {}) or {}:
        specials.add(tok_id)
    byte_level = is_byte_level(tokenizer)
    for tok, i in vocab.items():
        if i in specials:
            continue
        if exact:
            out[i] = tok
        elif byte_level:
            if all(ch in _BYTE_DECODER for ch in tok):
                out[i] = _decode_bytes(bytes(_BYTE_DECODER[ch] for ch in tok))
            else:
                out[i] = tok
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out[i] = _decode_bytes(bytes([int(tok[3:5], 16)]))
        else:
            out[i] = tok.replace("▁", " ")
    return out


def _pair_key(student_tok, teacher_tok, kind: str) -> str:
    h = hashlib.sha256(kind.encode())
    for tok in (student_tok, teacher_tok):
        vocab = tok.get_vocab()
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])[:50]).encode())
        h.update(str(len(vocab)).encode())
        h.update(hashlib.sha256("".join(sorted(vocab)).encode()).digest())
    return h.hexdigest()[:20]


def _cached(path: Path | None, compute):
    if path is not None and path.exists():
        return np.load(path, allow_pickle=False)
    arr = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, path)
    return arr


def shared_vocab(student_tok, teacher_tok, match: str = "normalised", cache_dir: Path | None = None) -> np.ndarray:
    """``[n, 2]`` pairs (student id, teacher id) of tokens with the same (normalised) string."""
    if match not in ("normalised", "exact"):
        raise LmdistillError(f"vocab_match must be 'normalised' or 'exact', got {match!r}")
    key = _pair_key(student_tok, teacher_tok, match)
    path = None if cache_dir is None else Path(cache_dir) / "vocab" / f"shared-{key}.npy"

    def compute():
        s = normalised_strings(student_tok, exact=match == "exact")
        t = normalised_strings(teacher_tok, exact=match == "exact")
        t_index: dict[str, int] = {}
        for i, key in enumerate(t):
            if key is not None and key not in t_index:
                t_index[key] = i
        pairs, used = [], set()
        for i, key in enumerate(s):
            if key is not None and key in t_index and key not in used:
                used.add(key)
                pairs.append((i, t_index[key]))
        return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)

    pairs = _cached(path, compute)
    if len(pairs) == 0:
        raise LmdistillError(
            "the two tokenizers share no vocabulary entry: span logit distillation needs one; "
            "set method_args.w_logit=0 or use vocab_match=normalised"
        )
    return pairs


def edit_distance_map(student_tok, teacher_tok, cache_dir: Path | None = None) -> np.ndarray:
    """``[V_teacher]``: for each teacher token, the student token of minimum edit distance (MinED).

    Exact (normalised) matches map directly; the rest search the student tokens that start
    with the same character (all student tokens when none does), with rapidfuzz's
    Levenshtein distance. Special tokens map to the student's unknown/eos token.
    """
    key = _pair_key(student_tok, teacher_tok, "mined")
    path = None if cache_dir is None else Path(cache_dir) / "vocab" / f"mined-{key}.npy"

    def compute():
        from rapidfuzz.distance import Levenshtein
        from rapidfuzz.process import cdist

        s = normalised_strings(student_tok)
        t = normalised_strings(teacher_tok)
        fallback = student_tok.unk_token_id if student_tok.unk_token_id is not None else student_tok.eos_token_id
        fallback = 0 if fallback is None else int(fallback)

        def bucket(key: str) -> tuple[bool, str]:
            return key.startswith(" "), key.lstrip()[:1]

        s_index: dict[str, int] = {}
        s_buckets: dict[tuple, list[tuple[str, int]]] = {}
        for i, key in enumerate(s):
            if key is not None and key not in s_index:
                s_index[key] = i
                s_buckets.setdefault(bucket(key), []).append((key, i))
        out = np.full(len(t), fallback, dtype=np.int64)
        t_buckets: dict[tuple, list[tuple[str, int]]] = {}
        for j, key in enumerate(t):
            if key is None:
                continue
            if key in s_index:
                out[j] = s_index[key]
            else:
                t_buckets.setdefault(bucket(key), []).append((key, j))
        all_s = [(k, i) for k, i in s_index.items()]
        for b, queries in t_buckets.items():
            cands = s_buckets.get(b) or s_buckets.get((not b[0], b[1])) or all_s
            c_keys = [c[0] for c in cands]
            c_ids = np.asarray([c[1] for c in cands], dtype=np.int64)
            for lo in range(0, len(queries), 2048):
                chunk = queries[lo:lo + 2048]
                dist = cdist([q[0] for q in chunk], c_keys, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
                out[np.asarray([q[1] for q in chunk])] = c_ids[dist.argmin(axis=1)]
        return out

    return _cached(path, compute)


def token_strings(tokenizer) -> list[str]:
    """Token strings with word-boundary markers stripped (for DTW costs)."""
    return [(s or "").strip() for s in normalised_strings(tokenizer)]


def dtw(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Dynamic time warping of two token-string sequences, cost = Levenshtein distance.

    Returns the warping path as (i, j) pairs. O(len(a) * len(b)); distances from rapidfuzz.
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    cost = cdist(a, b, scorer=Levenshtein.distance, dtype=np.int32).astype(np.float64)
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        row, prev = acc[i], acc[i - 1]
        c = cost[i - 1]
        for j in range(1, m + 1):
            row[j] = c[j - 1] + min(prev[j - 1], prev[j], row[j - 1])
    path, i, j = [], n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = np.argmin((acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]))
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return path[::-1]
