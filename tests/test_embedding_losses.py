import math

import pytest
import torch

from lmdistill.errors import LmdistillError
from lmdistill.methods.embedding.all_layer import AllLayerKD, AllLayerOptions
from lmdistill.methods.embedding.base import pool
from lmdistill.methods.embedding.embed_kd import EmbedKD, EmbedKDOptions
from lmdistill.methods.embedding.rkd import RKD, RKDOptions, rkd_angle, rkd_distance
from lmdistill.methods.embedding.stella import Stella, StellaOptions
from lmdistill.methods.embedding.talas import Talas, TalasOptions, info_nce, layer_aligned_loss


def _identity(method):
    for p in method.parameters():
        with torch.no_grad():
            p.copy_(torch.eye(*p.shape))


# Two sentences, 2-d vectors; layers[0] is the embedding output.
L0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # R_0 = [[1, 1], [1, 1]]
L1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # R_1 = I
L2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # R_2 = I
TEACHER = torch.tensor([[1.0, 0.0], [1.0, 0.0]])


def test_layer_aligned_loss_by_hand():
    # MSE(R_0, R_1) = 2/4 = 0.5; MSE(R_1, R_2) = 0; mean over the two pairs = 0.25
    assert float(layer_aligned_loss([L0, L1, L2])) == pytest.approx(0.25)
    assert float(layer_aligned_loss([L0, L1, L2], start=1)) == pytest.approx(0.0)


def test_detach_upper_stops_gradient_into_the_upper_layer():
    lo = L1.clone().requires_grad_()
    hi = (L0 + 0.1).clone().requires_grad_()
    layer_aligned_loss([lo, hi], detach_upper=True).backward()
    assert hi.grad is None and lo.grad is not None and lo.grad.abs().sum() > 0
    lo2, hi2 = L1.clone().requires_grad_(), (L0 + 0.1).clone().requires_grad_()
    layer_aligned_loss([lo2, hi2]).backward()
    assert hi2.grad is not None and hi2.grad.abs().sum() > 0


def test_talas_total_by_hand():
    m = Talas(TalasOptions(k=2, w_task=0.0), d_student=2, d_teacher=2, n_layers=2)
    _identity(m)
    out = m([L0, L1, L2], TEACHER)
    # anchor on layers 1 and 2: layer 1: cos = [1, 0] -> 1 - cos mean = 0.5;
    # layer 2: cos = [1/sqrt2, 1/sqrt2] -> 1 - 1/sqrt2; mean over K = 2
    anchor = (0.5 + (1 - 1 / math.sqrt(2))) / 2
    assert float(out["anchor"]) == pytest.approx(anchor)
    assert float(out["lasd"]) == pytest.approx(0.25)
    assert float(out["loss"]) == pytest.approx(0.75 * anchor + 1.0 * 0.25)
    assert "task" not in out


def test_talas_anchors_only_the_top_k_layers():
    m = Talas(TalasOptions(k=1, w_task=0.0, w_lasd=0.0), 2, 2, 2)
    _identity(m)
    layers = [L0.clone().requires_grad_(), L1.clone().requires_grad_(), L2.clone().requires_grad_()]
    m(layers, TEACHER)["loss"].backward()
    def silent(g):
        return g is None or float(g.abs().sum()) == 0.0

    assert silent(layers[0].grad) and silent(layers[1].grad) and layers[2].grad.abs().sum() > 0


def test_info_nce_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = I / 0.1; each row: -log(e^10 / (e^10 + 1))
    assert float(info_nce(a, a, 0.1)) == pytest.approx(math.log(1 + math.exp(-10)), rel=1e-3)
    m = Talas(TalasOptions(k=1, w_task=0.5), 2, 2, 2)
    assert m.needs_second_view
    out = m([L0, L1, a], TEACHER, view2=a)
    assert float(out["task"]) == pytest.approx(math.log(1 + math.exp(-10)), rel=1e-3)


def test_talas_rejects_bad_k():
    with pytest.raises(LmdistillError, match="out of range"):
        Talas(TalasOptions(k=4), 2, 2, 3)


def test_embed_kd_by_hand():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mse = EmbedKD(EmbedKDOptions(loss="mse"), 2, 2, 1)
    assert mse.proj is None
    assert float(mse([s, s], t)["loss"]) == pytest.approx((0 + 4 + 0 + 1) / 4)
    cos = EmbedKD(EmbedKDOptions(loss="cosine"), 2, 2, 1)
    _identity(cos)
    s2 = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    assert float(cos([s2, s2], t)["loss"]) == pytest.approx(((1 - 1 / math.sqrt(2)) + 0) / 2)


def test_all_layer_by_hand():
    m = AllLayerKD(AllLayerOptions(), 2, 2, 2)
    _identity(m)
    out = m([L0, L1, L2], TEACHER)  # blocks 1 and 2, as in the anchor test
    assert float(out["loss"]) == pytest.approx((0.5 + (1 - 1 / math.sqrt(2))) / 2)


def test_rkd_by_hand():
    # identical relations -> zero; a scaled copy has the same normalised distances and angles
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert float(rkd_distance(3 * x, x)) == pytest.approx(0.0, abs=1e-7)
    assert float(rkd_angle(3 * x + 1, x)) == pytest.approx(0.0, abs=1e-6)
    # distances: x has [1, 2, sqrt5] (mean m); y = [[0,0],[1,0],[2,0]] has [1, 2, 1] (mean 4/3)
    y = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    mx = (1 + 2 + math.sqrt(5)) / 3
    dx = [1 / mx, 2 / mx, math.sqrt(5) / mx]
    dy = [0.75, 1.5, 0.75]
    diffs = [a - b for a, b in zip(dy, dx)]
    huber = [0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in diffs]
    # the 3x3 matrix holds each pair twice and a zero diagonal: mean over 9 entries
    assert float(rkd_distance(y, x)) == pytest.approx(2 * sum(huber) / 9, rel=1e-5)
    out = RKD(RKDOptions(), 2, 2, 1)([y, y], x)
    assert float(out["loss"]) == pytest.approx(25 * float(out["distance"]) + 50 * float(out["angle"]))


def test_stella_by_hand():
    m = Stella(StellaOptions(), 2, 2, 1)
    _identity(m)
    out = m([L1, L1], TEACHER)
    # cosine: [1, 0] -> 0.5; similarity: R_S = I vs R_T = ones -> MSE = 0.5
    assert float(out["cosine"]) == pytest.approx(0.5)
    assert float(out["similarity"]) == pytest.approx(0.5)
    assert float(out["loss"]) == pytest.approx(1.0)


def test_pooling_modes():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(h, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(h, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(h, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(h, mask, "lasttoken").tolist() == [[3.0, 4.0]]
