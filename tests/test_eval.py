import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmdistill.data.readers import StsPair
from lmdistill.eval.bpb import bpb_eval, response_bits_and_bytes
from lmdistill.eval.generation import rouge_eval, rouge_l
from lmdistill.eval.sts import sts_spearman

LETTERS = "abcdefghijklmnop"


def toy_tokenizer(pieces: list[str], pattern: str) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for p in pieces:
        vocab[p] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


class UniformModel(torch.nn.Module):
    """Uniform over the non-special tokens, whatever the context."""

    def __init__(self, vocab_size: int, specials: int = 2):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        bias = torch.zeros(vocab_size)
        bias[:specials] = -1e9
        self.register_buffer("bias", bias)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.bias.expand(*input_ids.shape, -1).clone()})


def test_bpb_hand_computed_with_multibyte_and_straddling():
    tok = toy_tokenizer(list(LETTERS) + ["é"], ".")
    model = UniformModel(len(tok))
    (bits, nbytes), = response_bits_and_bytes(tok, model, ["ab"], ["aé"])
    assert bits == pytest.approx(2 * math.log2(17)) and nbytes == 3
    pairs = [a + b for a in LETTERS for b in LETTERS]
    tok2 = toy_tokenizer(pairs + list(LETTERS), "..|.")
    model2 = UniformModel(len(tok2))
    # "abcde" with prompt "abc": tokens ab | cd | e; "cd" straddles the boundary and is counted
    # with all the bytes it covers: bits = 2 log2(272) over text[2:5] = 3 bytes
    (bits2, nbytes2), = response_bits_and_bytes(tok2, model2, ["abc"], ["de"])
    assert bits2 == pytest.approx(2 * math.log2(272)) and nbytes2 == 3


def test_bpb_does_not_depend_on_the_tokenization(tmp_path, monkeypatch):
    import json

    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "abcd", "output": "ponmlk"}, {"prompt": "ef", "output": "abcdefghij" * 3}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    single = toy_tokenizer(list(LETTERS), ".")
    pairs = toy_tokenizer([a + b for a in LETTERS for b in LETTERS], "..")
    # a uniform distribution over these 16 bytes is 4 bits a byte, however it is tokenised
    r1 = bpb_eval(UniformModel(len(single)), data, tokenizer=single, progress=False)
    r2 = bpb_eval(UniformModel(len(pairs)), data, tokenizer=pairs, progress=False)
    assert r1["bpb"] == pytest.approx(4.0) and r2["bpb"] == pytest.approx(4.0)
    assert r1["bpb_pooled"] == pytest.approx(4.0) and r2["bpb_pooled"] == pytest.approx(4.0) and r1["n"] == 2


def test_rouge_l():
    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(100.0)
    assert rouge_l("the cat", ["a dog", "the cat sat"]) == pytest.approx(100 * 2 * (1 * 2 / 3) / (1 + 2 / 3))
    assert rouge_l("xyz", ["abc"]) == 0.0


def test_rouge_eval_on_a_tiny_model(gpt2_lm, instructions_file):
    res = rouge_eval(str(gpt2_lm), instructions_file, max_new_tokens=4, seeds=[10, 20], greedy=False,
                     batch_size=2, progress=False)
    assert res["n"] == 4 and len(res["per_seed"]) == 2 and 0 <= res["rougeL"] <= 100
    again = rouge_eval(str(gpt2_lm), instructions_file, max_new_tokens=4, seeds=[10, 20], greedy=False,
                       batch_size=2, progress=False)
    assert again["per_seed"] == res["per_seed"]  # fixed seeds reproduce
    greedy = rouge_eval(str(gpt2_lm), instructions_file, max_new_tokens=4, seeds=[10, 20], greedy=True,
                        progress=False)
    assert len(greedy["per_seed"]) == 1


def test_sts_spearman_perfect_and_reversed():
    class Fixed:
        def __init__(self, table):
            self.table = table

        def encode(self, sents, **kw):
            import numpy as np

            v = np.array([self.table[s] for s in sents], dtype=float)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    table = {"a": [1, 0], "b": [1, 0.1], "c": [1, 1], "d": [0, 1]}
    pairs = [StsPair("a", "b", 5.0), StsPair("a", "c", 3.0), StsPair("a", "d", 0.0)]
    assert sts_spearman(Fixed(table), pairs, progress=False) == {"spearman": 100.0, "n": 3}
    rev = [StsPair(p.s1, p.s2, -p.score) for p in pairs]
    assert sts_spearman(Fixed(table), rev, progress=False)["spearman"] == -100.0
