"""Golden losses: every method, 3 steps on tiny models with a fixed seed, every logged loss term
compared with the stored values (``tests/golden/losses.json``), at batch 4 x accumulation 1
and batch 2 x accumulation 2. A change to any distillation term moves its numbers and fails
here; "finite and decreasing" alone would not (CE alone makes that true).

Where a method's loss is a mean of per-example terms, the two batch layouts must also give the
same terms: accumulation invariance, per method. Methods whose loss compares the examples of a
batch with each other (in-batch similarity: TALAS's layer term and task term, RKD, Stella) are
exempt from that check by design: a micro-batch of 2 is another batch than one of 4.

Regenerate after an intended change: ``LMDISTILL_WRITE_GOLDEN=1 pytest tests/test_golden.py``
(and say why in the commit).
"""

import json
import os
from pathlib import Path

import pytest

from lmdistill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "losses.json"
WRITE = os.environ.get("LMDISTILL_WRITE_GOLDEN") == "1"
LAYOUTS = [(4, 1), (2, 2)]

EMBEDDING = {
    "talas": ["method=talas", "method_args.w_task=0.001"],  # the task term as specified (the default is 0)
    "talas_anchor_only": ["method=talas", "method_args={w_lasd: 0.0, w_task: 0.0}"],
    "embed_kd_mse": ["method=embed_kd", "method_args={loss: mse}"],
    "embed_kd_cosine": ["method=embed_kd", "method_args={loss: cosine}"],
    "all_layer": ["method=all_layer", "method_args={}"],
    "rkd": ["method=rkd", "method_args={}"],
    "stella": ["method=stella", "method_args={}"],
}
IN_BATCH = {"talas", "rkd", "stella"}
LM = {name: [f"method={name}", "method_args={}"] for name in ("sft", "uld", "mined", "dskd", "multilevel_ot")}
LM["sra"] = ["method=sra"]  # its defaults: the span logit KL averaged over each row's spans
LM["sra_summed"] = ["method=sra", "method_args.logit_reduction=sum"]  # the paper's sum (the default until 2026-12-07)


def _stored() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def _terms(metrics: dict) -> list[dict]:
    skip = {"epoch", "learning_rate", "grad_norm", "step", "train_runtime", "train_samples_per_second",
            "train_steps_per_second", "total_flos", "train_loss"}
    return [{k: v for k, v in e.items() if k not in skip and isinstance(v, (int, float))}
            for e in metrics["log_history"] if "loss" in e]


def _check(key: str, terms: list[dict]) -> None:
    assert len(terms) == 3 and all(t for t in terms), terms
    if WRITE:
        stored = _stored()
        stored[key] = terms
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    stored = _stored()
    assert key in stored, f"no golden losses for {key}: run LMDISTILL_WRITE_GOLDEN=1 pytest tests/test_golden.py"
    want = stored[key]
    assert [sorted(t) for t in terms] == [sorted(t) for t in want], (terms, want)
    for got, exp in zip(terms, want):
        for k in exp:
            assert got[k] == pytest.approx(exp[k], rel=2e-3, abs=1e-5), (key, k, got[k], exp[k])


def _both_layouts(run, config: str, key: str, overrides, invariant: bool) -> None:
    """Run ``config`` at both layouts, check each against its golden terms and, where the
    method's loss is per example, the two layouts against each other."""
    runs = {}
    for b, a in LAYOUTS:
        cfg = load_config(ROOT / config, [*overrides(b, a), "train.max_steps=3", f"train.batch_size={b}",
                                          f"train.grad_accum={a}", "train.seed=7"])
        runs[(b, a)] = _terms(run(cfg, progress=False))
        _check(f"{key}/{b}x{a}", runs[(b, a)])
    if invariant:
        _same(runs)


@pytest.mark.parametrize("name", list(EMBEDDING))
def test_embedding_golden_losses(name, tiny_st, tiny_st_student, sentences_file, tmp_path):
    from lmdistill.train.embedding import run_embedding

    _both_layouts(run_embedding, "configs/tiny/talas-tiny.yaml", f"embedding/{name}", lambda b, a: [
        f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]",
        f"output_dir={tmp_path / f'{b}x{a}'}", "eval.before=false", "eval.teacher=false", *EMBEDDING[name]],
        invariant=name not in IN_BATCH)


@pytest.mark.parametrize("name", list(LM))
def test_lm_golden_losses(name, llama_lm, gpt2_lm, same_rows_file, tmp_path):
    from lmdistill.train.lm import run_lm

    # the Llama student has no dropout, so both layouts draw the same computation
    _both_layouts(run_lm, "configs/tiny/sra-tiny.yaml", f"lm/{name}", lambda b, a: [
        f"student={llama_lm}", f"teacher={gpt2_lm}", f"data.train=[{same_rows_file}]",
        f"output_dir={tmp_path / f'{b}x{a}'}", "data.eval={}", *LM[name]], invariant=True)


def _same(runs: dict) -> None:
    one, two = runs[(4, 1)], runs[(2, 2)]
    for s1, s2 in zip(one, two):
        for k in s1:
            if k in ("nonfinite_steps",):
                continue
            assert s2[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-6), (k, s1, s2)
