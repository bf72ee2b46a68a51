import math

import pytest
import torch

from lmdistill.optim import ASAM, SAM


def _toy(w0, base_lr=0.1, **kw):
    w = torch.nn.Parameter(torch.tensor([w0], dtype=torch.float64))  # a [1, 2] weight matrix
    opt_cls = kw.pop("cls", ASAM)
    opt = opt_cls(torch.optim.SGD([w], lr=base_lr), **kw)

    def closure():
        loss = 0.5 * (w**2).sum()
        loss.backward()
        return loss

    return w, opt, closure


def _step(w, opt, closure):
    opt.zero_grad()
    closure()
    opt.step(closure)


def test_asam_matches_hand_computed_update():
    w, opt, closure = _toy([1.0, -2.0], rho=0.05, eta=0.01)
    _step(w, opt, closure)
    # g = w = [1, -2]; T = |w| + 0.01 = [1.01, 2.01]; ||T g|| = sqrt(1.01^2 + 4.02^2) = 4.144937...
    # eps = 0.05 * T^2 g / ||T g|| = [0.0123054..., -0.0974667...]; descent gradient = w + eps
    norm = math.sqrt(1.01**2 + 4.02**2)
    eps = [0.05 * 1.01**2 * 1.0 / norm, 0.05 * 2.01**2 * -2.0 / norm]
    expected = [1.0 - 0.1 * (1.0 + eps[0]), -2.0 - 0.1 * (-2.0 + eps[1])]
    assert w.detach()[0].tolist() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx([0.89876946, -1.79025333], rel=1e-6)


def test_sam_matches_hand_computed_update():
    w, opt, closure = _toy([1.0, -2.0], cls=SAM, rho=0.05)
    _step(w, opt, closure)
    eps = [0.05 / math.sqrt(5), -0.1 / math.sqrt(5)]
    assert w.detach()[0].tolist() == pytest.approx([1 - 0.1 * (1 + eps[0]), -2 - 0.1 * (-2 + eps[1])], rel=1e-9)


def test_asam_reduces_to_sam():
    # scaling off: exactly SAM
    w1, o1, c1 = _toy([0.3, -1.7], rho=0.05, eta=0.01, adaptive=False)
    w2, o2, c2 = _toy([0.3, -1.7], cls=SAM, rho=0.05)
    _step(w1, o1, c1)
    _step(w2, o2, c2)
    assert torch.equal(w1, w2)
    # huge eta: T is nearly constant, so ASAM(rho / eta) ~ SAM(rho)
    w3, o3, c3 = _toy([0.3, -1.7], rho=0.05 / 1e5, eta=1e5)
    _step(w3, o3, c3)
    assert torch.allclose(w3, w2, rtol=1e-5)
    # and it is not SAM for a small eta
    w4, o4, c4 = _toy([0.3, -1.7], rho=0.05, eta=0.01)
    _step(w4, o4, c4)
    assert not torch.allclose(w4, w2, rtol=1e-5)


def test_non_adaptive_group_uses_unit_scaling():
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    opt = ASAM(torch.optim.SGD([{"params": [w], "adaptive": False}], lr=0.1), rho=0.05, eta=0.01)
    ref, ref_opt, ref_closure = _toy([1.0, -2.0], cls=SAM, rho=0.05)

    def closure():
        (0.5 * (w**2).sum()).backward()

    _step(w, opt, closure)
    _step(ref, ref_opt, ref_closure)
    assert torch.allclose(w, ref)


def test_decreases_a_quadratic_and_is_deterministic():
    def run(seed):
        torch.manual_seed(seed)
        a = torch.rand(20) + 0.1
        w = torch.nn.Parameter(torch.randn(4, 5))
        opt = ASAM(torch.optim.AdamW([w], lr=0.05), rho=0.05, eta=0.01)

        def closure():
            loss = (a.view(4, 5) * w**2).sum()
            loss.backward()
            return loss

        losses = []
        for _ in range(50):
            opt.zero_grad()
            losses.append(float(closure().detach()))
            opt.step(closure)
        return losses, w.detach().clone()

    losses, w_a = run(0)
    assert losses[-1] < 0.05 * losses[0]
    _, w_b = run(0)
    assert torch.equal(w_a, w_b)


def test_clipping_applies_to_the_descent_gradient_only():
    w, opt, closure = _toy([3.0, -4.0], cls=SAM, rho=0.5, max_grad_norm=1.0)
    _step(w, opt, closure)
    # ascent uses the raw gradient g = [3, -4] (norm 5): eps = 0.5 * g / 5 = [0.3, -0.4]
    d = torch.tensor([3.3, -4.4], dtype=torch.float64)
    d = d / d.norm()  # descent gradient clipped to norm 1
    assert torch.allclose(w.detach()[0], torch.tensor([3.0, -4.0], dtype=torch.float64) - 0.1 * d)


def test_interval_and_skip():
    w, opt, closure = _toy([1.0, -2.0], rho=0.05, eta=0.01, interval=2)
    _step(w, opt, closure)  # step 1: a plain SGD step
    assert w.detach()[0].tolist() == pytest.approx([0.9, -1.8])
    opt.skip_next = True
    _step(w, opt, closure)
    assert w.detach()[0].tolist() == pytest.approx([0.9, -1.8]) and opt.skipped_steps == 1


def test_fp16_descent_gradient_is_unscaled_once():
    w, opt, _ = _toy([1.0, -2.0], cls=SAM, rho=0.05)
    scale = 1024.0
    opt.grad_scale = lambda: scale

    def scaled_closure():
        (scale * 0.5 * (w**2).sum()).backward()

    opt.zero_grad()
    (0.5 * (w**2).sum()).backward()  # the ascent gradient arrives already unscaled (scaler.unscale_)
    opt.step(scaled_closure)
    eps = [0.05 / math.sqrt(5), -0.1 / math.sqrt(5)]
    assert w.detach()[0].tolist() == pytest.approx([1 - 0.1 * (1 + eps[0]), -2 - 0.1 * (-2 + eps[1])], rel=1e-9)


def test_state_dict_round_trip():
    w, opt, closure = _toy([1.0, -2.0], rho=0.05, eta=0.01)
    _step(w, opt, closure)
    state = opt.state_dict()
    w2, opt2, _ = _toy([1.0, -2.0], rho=0.05, eta=0.01)
    opt2.load_state_dict(state)
    assert opt2.sam_steps == 1
