"""Bad input gets one clear error: slow tokenizers, empty shared vocabularies, empty data."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmdistill import models as lm_models
from lmdistill.align.spans import align_text
from lmdistill.align.vocab import shared_vocab
from lmdistill.config import load_config
from lmdistill.errors import LmdistillError
from lmdistill.train.lm import run_lm


def _word_tokenizer(words):
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


class _SlowTokenizer:
    """What a Python-only tokenizer looks like to us: no character offsets."""

    is_fast = False
    pad_token = "x"


def test_slow_tokenizer_without_offsets_is_refused(tmp_path, monkeypatch):
    with pytest.raises(LmdistillError, match="slow.*fast tokenizer"):
        align_text("hello", _SlowTokenizer(), _SlowTokenizer())
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _SlowTokenizer())
    with pytest.raises(LmdistillError, match="slow tokenizer without character offsets"):
        lm_models.load_tokenizer(str(tmp_path))


def test_empty_shared_vocabulary_is_refused():
    a = _word_tokenizer(["alpha", "beta"])
    b = _word_tokenizer(["gamma", "delta"])
    with pytest.raises(LmdistillError, match="share no vocabulary entry"):
        shared_vocab(a, b)
    assert len(shared_vocab(a, _word_tokenizer(["beta", "zeta"]))) == 1


def test_empty_instruction_data_is_refused(tmp_path, gpt2_lm, llama_lm):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = load_config(None, ["task=lm", "method=sft", f"student={gpt2_lm}", f"data.train=[{empty}]",
                             f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(LmdistillError, match="no rows"):
        run_lm(cfg, progress=False)
    assert not (tmp_path / "o").exists()  # nothing written half


def test_missing_teacher_folder_names_the_fix(tmp_path):
    with pytest.raises(LmdistillError, match="run that first"):
        lm_models.resolve("runs/sft-model/student")


def test_gguf_conversion_fails_on_missing_weights(tmp_path, monkeypatch):
    """A GGUF file whose tensors do not cover the architecture must not leave random weights."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)

    class Partial(LlamaForCausalLM):
        def state_dict(self, *a, **k):
            sd = super().state_dict(*a, **k)
            sd.pop("model.layers.0.mlp.down_proj.weight")
            return sd

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Partial(cfg))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(LmdistillError, match="lacks 1 weights.*down_proj"):
        lm_models._gguf_to_folder(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
