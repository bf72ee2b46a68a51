"""The fused LM-head KL (lmdistill.models.head_kl) equals the plain computation, loss and gradients."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmdistill import models
from lmdistill.config import load_config
from lmdistill.models.head_kl import lm_head_kl
from lmdistill.train import lm as lm_mod
from lmdistill.train.lm import run_lm

ROOT = Path(__file__).resolve().parents[1]


def _plain(head, softcap, x, ids, logp, tau):
    log_s = F.log_softmax(models.lm_head_logits(head, softcap, x, ids).float() / tau, dim=-1)
    return (logp.exp() * (logp - log_s)).sum(-1)


def _grads(fn, head, x, ids, logp, tau, softcap=None):
    head.zero_grad()
    x = x.clone().requires_grad_()
    kl = fn(head, softcap, x, ids, logp, tau)
    (kl * torch.linspace(0.5, 1.5, kl.numel())).sum().backward()  # unequal row weights reach the backward
    return kl.detach(), x.grad, head.weight.grad.clone(), None if head.bias is None else head.bias.grad.clone()


@pytest.mark.parametrize("n_ids", [None, 90, 20])  # every column; most of them (column selection); few (row gather)
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 5.0)])
def test_fused_head_kl_equals_the_plain_computation(n_ids, bias, softcap):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 100, bias=bias)
    x = torch.randn(7, 16) * 3
    ids = None if n_ids is None else torch.randperm(100)[:n_ids]
    logp = F.log_softmax(torch.randn(7, n_ids or 100) * 4, dim=-1)
    fused = _grads(lm_head_kl, head, x, ids, logp, 2.0, softcap)
    plain = _grads(_plain, head, x, ids, logp, 2.0, softcap)
    assert float(plain[0].min()) > 0.01  # a real divergence, not a trivially equal zero
    for a, b in zip(fused, plain):
        if b is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_fused_head_kl_refuses_a_second_backward():
    head = torch.nn.Linear(8, 30, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    kl = lm_head_kl(head, None, x, torch.arange(20), F.log_softmax(torch.randn(3, 20), -1), 2.0).sum()
    kl.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        kl.backward()


def test_sra_trains_the_same_with_the_fused_span_logit_kl(llama_lm, gpt2_lm, instructions_file, tmp_path,
                                                        monkeypatch):
    """Four SRA steps on the tiny pair: every loss term and the trained student equal those of the
    unfused computation (autograd through the student's shared-vocabulary logits)."""
    def cfg(out):
        return load_config(ROOT / "configs/tiny/sra-tiny.yaml", [
            f"student={llama_lm}", f"teacher={gpt2_lm}", f"data.train=[{instructions_file}]", "data.eval={}",
            f"output_dir={out}", "train.max_steps=4", "train.batch_size=2"])

    fused = run_lm(cfg(tmp_path / "fused"), progress=False)
    monkeypatch.setattr(lm_mod, "lm_head_kl", _plain)
    plain = run_lm(cfg(tmp_path / "plain"), progress=False)
    terms = [[h for h in m["log_history"] if "loss" in h] for m in (fused, plain)]
    assert terms[0] and all(h["logit"] > 0 for h in terms[0])
    for a, b in zip(*terms, strict=True):
        for k in ("loss", "ce", "span", "geo", "logit"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)

    def params(d):
        return torch.cat([p.detach().flatten() for p in models.load_causal_lm(str(d / "student")).parameters()])

    assert torch.allclose(params(tmp_path / "fused"), params(tmp_path / "plain"), rtol=1e-5, atol=1e-6)
