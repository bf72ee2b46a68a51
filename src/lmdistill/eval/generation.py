"""Generation evaluation: ROUGE-L F1 (x100) of generated responses (docs/methods.md 5).

Batched generation with left padding; greedy or sampling with fixed seeds; each response
scored against every reference and the best kept (rouge-score's ROUGE-L F1, stemming on, as
MiniLLM's evaluation); the mean per seed and over seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from lmdistill import models
from lmdistill.data.readers import read_instructions

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str] | tuple[str, ...]) -> float:
    """Best ROUGE-L F1 (x100) of ``prediction`` over ``references``."""
    return 100.0 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _load(model_or_ref, tokenizer=None, trust_remote_code: bool = False):
    if isinstance(model_or_ref, str):
        tok = tokenizer or models.load_tokenizer(model_or_ref, trust_remote_code=trust_remote_code)
        model = models.load_causal_lm(model_or_ref, trust_remote_code=trust_remote_code).to(models.default_device())
    else:
        model, tok = model_or_ref, tokenizer
        if tok is None:
            raise ValueError("a tokenizer is needed with a model object")
    model.eval()
    return model, tok


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, greedy: bool, seed: int,
             batch_size: int = 8, temperature: float = 1.0, top_p: float = 1.0, progress: bool = True) -> list[str]:
    """Responses to ``prompts`` (batched, left padded)."""
    side = tok.padding_side
    tok.padding_side = "left"
    outs: list[str] = []
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=f"generating (seed {seed})", disable=not progress):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
            if greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            gen = model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return outs


def rouge_eval(model_or_ref, data: str | Path, max_new_tokens: int = 256, seeds: list[int] = (10,),
               greedy: bool = False, limit: int | None = None, batch_size: int = 8, tokenizer=None,
               temperature: float = 1.0, top_p: float = 1.0, progress: bool = True,
               trust_remote_code: bool = False) -> dict:
    """``{"rougeL": mean, "per_seed": [...], "n": rows}`` on a MiniLLM-format JSONL file.

    Greedy decoding is deterministic, so it runs once whatever the seeds.
    """
    rows = read_instructions(data, limit)
    model, tok = _load(model_or_ref, tokenizer, trust_remote_code)
    seeds = list(seeds)[:1] if greedy else list(seeds)
    per_seed = []
    for seed in seeds:
        preds = generate(model, tok, [r.prompt for r in rows], max_new_tokens, greedy, seed, batch_size,
                         temperature, top_p, progress)
        per_seed.append(round(float(np.mean([rouge_l(p, r.references) for p, r in zip(preds, rows)])), 2))
    return {"rougeL": round(float(np.mean(per_seed)), 2), "per_seed": per_seed, "n": len(rows),
            "greedy": bool(greedy), "max_new_tokens": max_new_tokens}
