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


def test_sra_runs_on_two_processes(gpt2_lm, llama_lm, instructions_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    _run([*TORCHRUN, "-m", "lmdistill", "train", "configs/tiny/sra-tiny.yaml", f"student={gpt2_lm}",
          f"teacher={llama_lm}", f"data.train=[{instructions_file}]", "train.batch_size=1", "train.max_steps=2",
          f"output_dir={tmp_path}", "data.eval={}"], env)
    m = json.loads((tmp_path / "metrics.json").read_text())
    losses = [h["loss"] for h in m["log_history"] if "loss" in h]
    assert m["steps"] == 2 and all(x == x for x in losses)
