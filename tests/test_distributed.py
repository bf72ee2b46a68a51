"""Two processes (torchrun, gloo on the CPU) against one: same losses, same parameters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]


def _params(folder):
    from sentence_transformers import SentenceTransformer

    return torch.cat([p.detach().flatten() for p in SentenceTransformer(str(folder), device="cpu").parameters()])


def _run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_match_one_with_the_global_batch(tiny_st, tiny_st_student, sentences_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # anchor-only TALAS (a per-sentence mean), under ASAM: 2 x 4 must equal 1 x 8, which holds only
    # if both replicas perturb with the same (all-reduced) gradient
    common = [f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]",
              "method_args.w_lasd=0.0", "method_args.w_task=0.0", "train.max_steps=3", "train.optimizer=asam",
              "eval.before=false", "eval.teacher=false", "train.save_steps=2"]
    _run([sys.executable, "-m", "lmdistill", "train", "configs/tiny/talas-tiny.yaml", *common,
          "train.batch_size=8", f"output_dir={tmp_path / 'one'}"], env)
    _run([*TORCHRUN, "-m", "lmdistill", "train", "configs/tiny/talas-tiny.yaml", *common,
          "train.batch_size=4", f"output_dir={tmp_path / 'two'}"], env)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    l1 = [h["loss"] for h in one["log_history"] if "loss" in h]
    l2 = [h["loss"] for h in two["log_history"] if "loss" in h]
    assert len(l1) == len(l2) == 3
    assert l1 == pytest.approx(l2, rel=1e-4)
    a1 = [h["anchor"] for h in one["log_history"] if "anchor" in h]
    a2 = [h["anchor"] for h in two["log_history"] if "anchor" in h]
    assert a1 == pytest.approx(a2, rel=1e-4)  # loss terms are averaged over processes too
    assert torch.allclose(_params(tmp_path / "one" / "student"), _params(tmp_path / "two" / "student"),
                          rtol=1e-4, atol=1e-6)
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-2" / "rng_state_1.pth").exists()


@pytest.mark.parametrize("cached", [False, True], ids=["online", "from-one-teacher-cache"])
def test_sra_on_two_processes_matches_one(cached, llama_lm, gpt2_lm, same_rows_file, tmp_path):
    """SRA, 2 processes x batch 1 against 1 process x batch 2 (identical rows, so token-averaged
    CE is the same either way; a Llama student without dropout): the same losses, every term;
    online, and with both processes reading one teacher cache."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["configs/tiny/sra-tiny.yaml", f"student={llama_lm}", f"teacher={gpt2_lm}",
              f"data.train=[{same_rows_file}]", "train.max_steps=3", "data.eval={}"]
    if cached:
        common.append(f"data.teacher_cache={tmp_path / 'cache'}")
        _run([sys.executable, "-m", "lmdistill", "cache", *common], env)
    _run([sys.executable, "-m", "lmdistill", "train", *common, "train.batch_size=2", f"output_dir={tmp_path / 'one'}"],
         env)
    _run([*TORCHRUN, "-m", "lmdistill", "train", *common, "train.batch_size=1", f"output_dir={tmp_path / 'two'}"], env)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    if cached:
        assert one["teacher_cache"]["folder"] == two["teacher_cache"]["folder"]
    h1 = [h for h in one["log_history"] if "loss" in h]
    h2 = [h for h in two["log_history"] if "loss" in h]
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2):
        for k in ("loss", "ce", "span", "geo", "logit"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (k, a, b)


NAN_ON_RANK_1 = """
import os, sys
import lmdistill.train.embedding as emb
from lmdistill.cli import finish
from lmdistill.config import load_config
from lmdistill.methods.embedding.talas import Talas

real, calls = Talas.forward, {"n": 0}


def flaky(self, *a, **k):
    out = real(self, *a, **k)
    if self.training:
        calls["n"] += 1
        if os.environ["RANK"] == "1" and calls["n"] == 2:  # step 2, on one process only
            out["loss"] = out["loss"] * float("nan")
    return out


Talas.forward = flaky
emb.run_embedding(load_config(sys.argv[1], sys.argv[2:]), progress=False)
finish(0)  # as the command ends: close the process group, then exit at once
"""


def test_nonfinite_loss_on_one_process_skips_the_step_on_all(tiny_st, tiny_st_student, sentences_file, tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([*TORCHRUN, str(script), "configs/tiny/talas-tiny.yaml", f"teacher={tiny_st}",
                        f"student={tiny_st_student}", f"data.train=[{sentences_file}]", "train.max_steps=4",
                        "train.batch_size=4", "train.optimizer=adamw", "method_args.w_task=0.0", "eval.before=false",
                        "eval.teacher=false", f"output_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)  # a hang would time out
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())  # written by rank 0, which saw no NaN
    assert m["steps"] == 4 and m["nonfinite_steps"] == 1
    assert torch.isfinite(_params(tmp_path / "run" / "student")).all()
