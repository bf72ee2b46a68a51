"""Shared vocabularies and edit-distance maps between two tokenizers (docs/methods.md 1.6, 3).
Written by hand: no maintained library maps one vocabulary onto another.

A token's *normalised string* is the text it stands for: the byte-level BPE alphabet
(``Ġ`` for a space, ...) decoded to bytes and then UTF-8, SentencePiece's ``▁`` turned into a
space, byte-fallback tokens (``<0x41>``) turned into their byte. Tokens that are not valid
UTF-8 on their own keep a ``bytes:..`` key, so a lone byte still matches the same lone byte
on the other side. Only tokens marked *special* are left out: added tokens that stand for text
(Gemma-3's ``\n``, ``\n\n``, tab runs) are ordinary text here.

When several ids of one vocabulary share a string (Gemma-3's byte-fallback ``<0x2C>`` and its
real piece ``,``), the string's *canonical* id is the one the tokenizer itself produces when it
encodes that string; failing that a regular piece before a byte-fallback one, then the lowest id.
A byte-fallback id therefore pairs only where no regular piece of that string exists.

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


def is_byte_fallback(tok: str) -> bool:
    """SentencePiece byte-fallback tokens: ``<0x41>``."""
    return len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokens marked special (control tokens); added tokens that are text are not."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tok_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", True):
            ids.add(int(tok_id))
    return ids


def normalised_strings(tokenizer, exact: bool = False) -> list[str | None]:
    """The normalised string of every token id (``None`` for special tokens)."""
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    out: list[str | None] = [None] * size
    specials = special_ids(tokenizer)
    added = {int(i): a for i, a in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()}
    byte_level = is_byte_level(tokenizer)
    for tok, i in vocab.items():
        if i in specials:
            continue
        if exact:
            out[i] = tok
        elif i in added:  # an added token stands for its content as written
            out[i] = str(added[i].content)
        elif byte_level:
            if all(ch in _BYTE_DECODER for ch in tok):
                out[i] = _decode_bytes(bytes(_BYTE_DECODER[ch] for ch in tok))
            else:
                out[i] = tok
        elif is_byte_fallback(tok):
            out[i] = _decode_bytes(bytes([int(tok[3:5], 16)]))
        else:
            out[i] = tok.replace("▁", " ")
    return out


# encoded after this character, a string is cut at its own start: SentencePiece tokenizers add
# their word-boundary prefix to the text's first piece, not to the string under test
_CONTEXT = "§"


def produced_id(tokenizer, text: str) -> int | None:
    """The single id the tokenizer produces for ``text`` (alone, or after a neutral character),
    or ``None`` when it cuts ``text`` into several tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    try:
        enc = tokenizer(_CONTEXT + text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # slow tokenizers have no offsets
        return None
    start, end = len(_CONTEXT), len(_CONTEXT) + len(text)
    inside = [(int(i), (a, b)) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if b > start]
    if len(inside) == 1 and inside[0][1] == (start, end):
        return inside[0][0]
    return None


def canonical_index(tokenizer, strings: list[str | None], exact: bool = False) -> dict[str, int]:
    """``{string: id}`` with one id per string: for strings that several ids share, the id the
    tokenizer produces for the string, else a regular piece before a byte-fallback one, else the
    lowest id (module docstring)."""
    ids: dict[str, list[int]] = {}
    for i, key in enumerate(strings):
        if key is not None:
            ids.setdefault(key, []).append(i)
    index = {key: c[0] for key, c in ids.items()}
    if exact:
        return index
    inv = {i: t for t, i in tokenizer.get_vocab().items()}
    for key, cands in ids.items():
        if len(cands) == 1:
            continue
        produced = produced_id(tokenizer, key) if not key.startswith("bytes:") else None
        if produced in cands:
            index[key] = produced
        else:
            index[key] = min(cands, key=lambda i: (is_byte_fallback(inv.get(i, "")), i))
    return index


# bump when the maps' rules change, so that maps cached by an earlier version are not reused
MAP_VERSION = 2


def _pair_key(student_tok, teacher_tok, kind: str) -> str:
    h = hashlib.sha256(f"{kind}:v{MAP_VERSION}".encode())
    for tok in (student_tok, teacher_tok):
        vocab = tok.get_vocab()
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])[:50]).encode())
        h.update(str(len(vocab)).encode())
        h.update(hashlib.sha256("".join(sorted(vocab)).encode()).digest())
        h.update(json.dumps(sorted(special_ids(tok))).encode())
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
        exact = match == "exact"
        s_index = canonical_index(student_tok, normalised_strings(student_tok, exact), exact)
        t_index = canonical_index(teacher_tok, normalised_strings(teacher_tok, exact), exact)
        pairs = sorted((i, t_index[key]) for key, i in s_index.items() if key in t_index)
        return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)

    pairs = _cached(path, compute)
    if len(pairs) == 0:
        raise LmdistillError(
            "the two tokenizers share no vocabulary entry: span logit distillation needs one; "
            "set method_args.w_logit=0 or use vocab_match=normalised"
        )
    return pairs


def shared_vocab_stats(pairs: np.ndarray, student_tok, teacher_tok) -> dict:
    """How many pairs the shared vocabulary has, and how many have a byte-fallback token on a side."""
    def fallback_ids(tok) -> set[int]:
        return {i for t, i in tok.get_vocab().items() if is_byte_fallback(t)}

    fs, ft = fallback_ids(student_tok), fallback_ids(teacher_tok)
    n_fb = sum(1 for a, b in pairs.tolist() if a in fs or b in ft)
    return {"pairs": int(len(pairs)), "byte_fallback_pairs": int(n_fb)}


def edit_distance_map(student_tok, teacher_tok, cache_dir: Path | None = None) -> np.ndarray:
    """``[V_teacher]``: for each teacher token, the student token of minimum edit distance (MinED).

    Exact (normalised) matches map directly; the rest search the student tokens that start
    with the same character (all student tokens when none does), with rapidfuzz's
    Levenshtein distance. Special tokens map to the student's unknown/eos token; added tokens
    that are text (Gemma-3's ``\n``) map like any other token.
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

        s_index = canonical_index(student_tok, s)
        s_buckets: dict[tuple, list[tuple[str, int]]] = {}
        for key, i in s_index.items():
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
