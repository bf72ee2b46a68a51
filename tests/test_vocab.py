"""Shared vocabulary and MinED map on real tokenizers: each string pairs the ids the two
tokenizers themselves produce for it (not a byte-fallback twin), added text tokens included."""

import numpy as np
import pytest
import tiny
from tokenizers import AddedToken
from transformers import AutoTokenizer

from lmdistill import models
from lmdistill.align.vocab import edit_distance_map, normalised_strings, shared_vocab, shared_vocab_stats

CHARS = [",", ".", "\n", "\n\n", "1", "-", "(", '"', "a", "the"]


def _produced(tok, text):
    """The one token the tokenizer cuts ``text`` into when it follows a neutral character
    (SentencePiece tokenizers would otherwise add their word-boundary prefix), else None."""
    enc = tok("§" + text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [(i, tuple(o)) for i, o in zip(enc["input_ids"], enc["offset_mapping"]) if o[1] > 1]
    return inside[0][0] if len(inside) == 1 and inside[0][1] == (1, 1 + len(text)) else None


def _real_pair():
    return models.load_tokenizer("pkg:smollm2-135m-instruct"), models.load_tokenizer("pkg:gemma-3-270m")


def _tok(path):
    return AutoTokenizer.from_pretrained(path)


PAIRS = {
    "smollm2->gemma3": _real_pair,
    "gpt2->mistral": lambda: (_tok(tiny.GPT2), _tok(tiny.MISTRAL)),
    "tinyllama->gpt2": lambda: (_tok(tiny.TINYLLAMA), _tok(tiny.GPT2)),
    "mistral->tinyllama": lambda: (_tok(tiny.MISTRAL), _tok(tiny.TINYLLAMA)),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_each_character_pairs_the_ids_the_tokenizers_produce(pair):
    s_tok, t_tok = PAIRS[pair]()
    pairs = shared_vocab(s_tok, t_tok)
    s_to_t = dict(map(tuple, pairs.tolist()))
    assert len(s_to_t) == len(pairs) and len(set(s_to_t.values())) == len(pairs)  # one to one
    checked = []
    for ch in CHARS:
        si, ti = _produced(s_tok, ch), _produced(t_tok, ch)
        if si is None or ti is None:  # one side cuts it into several tokens: nothing to pair
            continue
        assert s_to_t.get(si) == ti, (pair, ch, si, ti, s_to_t.get(si))
        checked.append(ch)
    # "\n\n" is two byte-fallback tokens on the SentencePiece side; everything else is one token
    assert len(checked) >= 9, checked


def test_gemma_byte_fallback_twins_and_added_text_tokens():
    s_tok, t_tok = _real_pair()
    pairs = shared_vocab(s_tok, t_tok)
    s_to_t = dict(map(tuple, pairs.tolist()))
    t_vocab = {i: t for t, i in t_tok.get_vocab().items()}
    # the real pieces win over their byte-fallback twins ...
    for ch, fallback in ((",", "<0x2C>"), (".", "<0x2E>"), ("1", "<0x31>"), (" ", "<0x20>")):
        sid = s_tok.convert_tokens_to_ids("Ġ" if ch == " " else ch)
        assert t_vocab[s_to_t[sid]] != fallback, ch
    # ... Gemma's non-special added "\n" (107) and "\n\n" (108) are text, and pair with Ċ, ĊĊ
    assert s_to_t[s_tok.convert_tokens_to_ids("Ċ")] == 107
    assert s_to_t[s_tok.convert_tokens_to_ids("ĊĊ")] == 108
    assert normalised_strings(t_tok)[107] == "\n" and normalised_strings(t_tok)[2] is None  # <bos> is special
    stats = shared_vocab_stats(pairs, s_tok, t_tok)
    # a byte-fallback id pairs only where no regular piece exists (SmolLM2's lone bytes 0x80-0xFF, ...)
    assert 0 < stats["byte_fallback_pairs"] <= 160 and stats["pairs"] == len(pairs)
    t_strings, s_strings = normalised_strings(t_tok), normalised_strings(s_tok)
    regular = {t_strings[j] for j, tok in t_vocab.items() if not tok.startswith("<0x") and t_strings[j] is not None}
    for a, b in pairs.tolist():
        if t_vocab[b].startswith("<0x"):
            assert s_strings[a] not in regular, (a, b, s_strings[a])


def test_mined_maps_added_text_tokens_like_any_other():
    """A teacher's non-special added token that is text maps to the student token of that text,
    not to the student's fallback (EOS/unk)."""
    s_tok, t_tok = _tok(tiny.GPT2), _tok(tiny.MISTRAL)
    t_tok.add_tokens([AddedToken("\n\n", special=False, normalized=False)])
    added = t_tok.convert_tokens_to_ids("\n\n")
    assert added >= 32000
    vmap = edit_distance_map(s_tok, t_tok)
    assert vmap[added] == s_tok.convert_tokens_to_ids("ĊĊ")
    assert vmap[t_tok.convert_tokens_to_ids(",")] == s_tok.convert_tokens_to_ids(",")
    pairs = dict(map(tuple, shared_vocab(s_tok, t_tok).tolist()))
    assert pairs[s_tok.convert_tokens_to_ids("ĊĊ")] == added
    assert np.all(vmap >= 0) and np.all(vmap < len(s_tok))
