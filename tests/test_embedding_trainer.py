import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdistill.config import load_config
from lmdistill.errors import LmdistillError
from lmdistill.train import cache as tcache
from lmdistill.train.embedding import run_embedding

ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = ROOT / "configs" / "tiny" / "talas-tiny.yaml"


def _cfg(tiny_st, tiny_st_student, sentences_file, out, *extra):
    return load_config(TINY_CFG, [f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]",
                                  f"output_dir={out}", *extra])


def _student_params(out):
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(out / "student"), device="cpu")
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("optimizer", ["asam", "adamw"])
def test_gradient_accumulation_invariance(tiny_st, tiny_st_student, sentences_file, tmp_path, optimizer):
    # anchor-only TALAS (a per-sentence mean): batch 8 must equal 2 micro-batches of 4
    common = ["method_args={k: 2, w_lasd: 0.0, w_task: 0.0}", "train.max_steps=3", f"train.optimizer={optimizer}",
              "eval.before=false", "eval.teacher=false", "train.max_grad_norm=0"]
    run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "a", "train.batch_size=8", *common),
                  progress=False)
    run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "b", "train.batch_size=4",
                       "train.grad_accum=2", *common), progress=False)
    a, b = _student_params(tmp_path / "a"), _student_params(tmp_path / "b")
    base = _student_params_of(tiny_st_student)
    assert not torch.allclose(a, base)  # it trained
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _student_params_of(folder):
    from sentence_transformers import SentenceTransformer

    return torch.cat([p.detach().flatten() for p in SentenceTransformer(str(folder), device="cpu").parameters()])


def test_train_logs_every_term_and_learns(tiny_st, tiny_st_student, sentences_file, sts_file, tmp_path):
    # the task term is off by default; on here (the specified 0.001) so that every term is logged
    m = run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "r", "train.max_steps=8",
                           "method_args.w_task=0.001", f"data.eval={{toy: {sts_file}}}"), progress=False)
    logged = [h for h in m["log_history"] if "anchor" in h]
    assert logged and all({"anchor", "lasd", "task", "loss"} <= set(h) for h in logged)
    assert logged[-1]["anchor"] < logged[0]["anchor"]
    assert {"teacher_scores", "before", "after"} <= set(m)
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["after"]["toy"]["n"] == 6 and saved["steps"] == 8


def test_saved_student_loads_without_lmdistill(tiny_st, tiny_st_student, sentences_file, tmp_path):
    run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "eval.before=false", "eval.teacher=false"),
                  progress=False)
    from sentence_transformers import SentenceTransformer

    here = SentenceTransformer(str(tmp_path / "student"), device="cpu").encode(["a red car", "dogs"])
    code = ("import sys, json; from sentence_transformers import SentenceTransformer; "
            f"m = SentenceTransformer({str(tmp_path / 'student')!r}, device='cpu'); "
            "e = m.encode(['a red car', 'dogs']).tolist(); "
            "assert not any(k.startswith('lmdistill') for k in sys.modules); print(json.dumps(e))")
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    there = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    assert np.allclose(here, there, atol=1e-5)


def test_stale_cache_is_refused(tiny_st, tiny_st_student, sentences_file, tmp_path):
    cache_file = tmp_path / "teacher.safetensors"
    key = tcache.cache_key("x", "fp", ["other sentences"], "mean", 32, True)
    tcache.save_cache(cache_file, torch.zeros(1, 48), key)
    cfg = _cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "o", f"data.teacher_cache={cache_file}")
    with pytest.raises(LmdistillError, match="stale or foreign.*data_sha256"):
        run_embedding(cfg, progress=False)
    # the right cache is built once, then reused
    cfg2 = _cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "o2", f"data.teacher_cache={tmp_path / 'ok.st'}",
                "eval.before=false")
    run_embedding(cfg2, progress=False)
    mtime = (tmp_path / "ok.st").stat().st_mtime_ns
    run_embedding(cfg2, progress=False)
    assert (tmp_path / "ok.st").stat().st_mtime_ns == mtime


def test_cache_key_fields():
    key = tcache.cache_key("t", "fp", ["a", "b"], "mean", 64, True)
    emb = torch.randn(2, 3)
    with pytest.raises(LmdistillError, match="max_length"):
        tcache.load_cache(tcache.save_cache(Path(os.environ["LMDISTILL_CACHE"]) / "k.st", emb, key),
                          {**key, "max_length": "128"})


def test_unknown_method_and_option(tiny_st, tiny_st_student, sentences_file, tmp_path):
    with pytest.raises(LmdistillError, match="unknown embedding method 'nope'"):
        run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "method=nope"), progress=False)
    with pytest.raises(LmdistillError, match="unknown option 'kk' for method 'talas'"):
        run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "method_args={kk: 1}"), progress=False)
    with pytest.raises(LmdistillError, match="out of range"):
        run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "student_layers=[0,7]"), progress=False)


@pytest.mark.parametrize("method", ["embed_kd", "all_layer", "rkd", "stella"])
def test_baselines_train(tiny_st, tiny_st_student, sentences_file, tmp_path, method):
    m = run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, f"method={method}", "method_args={}",
                           "train.max_steps=6", "eval.before=false", "eval.teacher=false"), progress=False)
    losses = [h["loss"] for h in m["log_history"] if "loss" in h]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
