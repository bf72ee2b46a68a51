import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmdistill.methods.llm.sra import (
    default_layer_pairs,
    geometric_loss,
    span_com,
    span_logit_kl,
    span_logit_kl_to,
    span_matrix,
    span_weights,
    token_weights,
    weighted_cosine_loss,
)
from lmdistill.models.attention import RowCapture


def test_token_weights_modes():
    rows = torch.tensor([[1.0, 3.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert token_weights(rows, mask, "last_token").tolist() == [[0.25, 0.75, 0.0, 0.0]]
    assert token_weights(rows, mask, "uniform")[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


def test_com_and_mass_by_hand():
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0]]])
    w = torch.tensor([[0.1, 0.3, 0.6, 0.0]])
    spans = torch.tensor([[[0, 2], [2, 3], [0, 0]]])
    mask = torch.tensor([[1, 1, 0]])
    M = span_matrix(spans, mask, 4)
    assert M.tolist() == [[[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]]
    com, mass = span_com(h, w, M)
    # span 0: (0.1 * [1, 0] + 0.3 * [0, 1]) / 0.4 = [0.25, 0.75]; span 1: [2, 2]
    assert com[0, 0].tolist() == pytest.approx([0.25, 0.75])
    assert com[0, 1].tolist() == pytest.approx([2.0, 2.0])
    assert mass[0].tolist() == pytest.approx([0.4, 0.6, 0.0])
    # a zero-mass span does not divide by zero (the 1e-5 floor)
    assert torch.isfinite(com).all()


def test_span_weights():
    mass = torch.tensor([[0.2, 0.6, 0.9]])
    mask = torch.tensor([[1, 1, 0]])
    assert span_weights(mass, mask)[0].tolist() == pytest.approx([0.25, 0.75, 0.0])
    assert span_weights(mass, mask, p=2)[0].tolist() == pytest.approx([0.04 / 0.4, 0.36 / 0.4, 0.0])
    assert span_weights(mass, mask, uniform=True)[0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert span_weights(torch.zeros(1, 3), mask)[0].tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_weighted_cosine_loss_by_hand():
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    W = torch.tensor([[0.25, 0.75]])
    assert float(weighted_cosine_loss(a, b, W)) == pytest.approx(0.75 * (1 - 1 / math.sqrt(2)))


def test_geometric_loss_by_hand():
    # student spans orthogonal (G^S_01 = 0), teacher spans equal (G^T_01 = 1); a third, padded span
    cs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]])
    ct = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [7.0, 7.0]]])
    W = torch.tensor([[0.25, 0.75, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # pi_01 = pi_10 = 0.5 after renormalising; (0 - 1)^2 each -> 1.0
    assert float(geometric_loss(cs, ct, W, mask)) == pytest.approx(1.0)
    assert float(geometric_loss(ct, ct, W, mask)) == pytest.approx(0.0)


def test_span_logit_kl_by_hand():
    z_t = torch.tensor([[[0.0, math.log(3.0) * 2], [1.0, 1.0]]])  # at tau = 2: p_T = [0.25, 0.75]
    z_s = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # at tau = 2: p_S = [0.5, 0.5]
    mask = torch.tensor([[1, 0]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(span_logit_kl(z_s, z_t, mask, tau=2.0)) == pytest.approx(expected, rel=1e-5)
    # two rows: sum over spans / B against the mean of each row's span mean
    z_t2, z_s2 = torch.cat([z_t, z_t]), torch.cat([z_s, z_s])
    both = torch.tensor([[1, 0], [1, 1]])
    # the second span: p_T = [0.5, 0.5], p_S = softmax([2.5, -2.5])
    ps2 = torch.softmax(torch.tensor([5.0, -5.0]) / 2, -1)
    kl2 = float((0.5 * (torch.log(0.5 / ps2))).sum())
    assert float(span_logit_kl(z_s2, z_t2, both, 2.0)) == pytest.approx((2 * expected + kl2) / 2, rel=1e-5)
    assert float(span_logit_kl(z_s2, z_t2, both, 2.0, "mean")) == pytest.approx((expected + (expected + kl2) / 2) / 2,
                                                                                rel=1e-5)


def test_span_logit_kl_reads_the_real_spans_only():
    """The student's and teacher's span logits may come as the real spans only ([N, V]); laid out
    per row ([B, K, V]) the padded spans contribute nothing, whatever they hold."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    real = mask.bool()
    z_s, z_t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    z_s[~real] = float("nan")  # padding: never part of the loss
    logp = torch.log_softmax(z_t / 2.0, -1)
    vals, idx = logp.topk(3, dim=-1)
    for reduction in ("sum", "mean"):
        full = span_logit_kl_to(z_s[real], logp[real], None, mask, 2.0, reduction)
        assert torch.isfinite(full)
        assert float(span_logit_kl_to(z_s, logp, None, mask, 2.0, reduction)) == pytest.approx(float(full), rel=1e-6)
        assert float(span_logit_kl(z_s, z_t, mask, 2.0, reduction)) == pytest.approx(float(full), rel=1e-6)
        top = span_logit_kl_to(z_s[real], vals[real], idx[real], mask, 2.0, reduction)
        assert float(span_logit_kl_to(z_s, vals, idx, mask, 2.0, reduction)) == pytest.approx(float(top), rel=1e-6)
    # by hand, the sum: every real span's KL over B = 2
    log_s = torch.log_softmax(z_s[real] / 2.0, -1)
    by_hand = float((logp[real].exp() * (logp[real] - log_s)).sum() / 2)
    assert float(span_logit_kl_to(z_s[real], logp[real], None, mask, 2.0)) == pytest.approx(by_hand, rel=1e-6)


def test_default_layer_pairs():
    assert default_layer_pairs(30, 18, 2) == [(29, 17), (30, 18)]
    assert default_layer_pairs(2, 4, 2) == [(1, 2), (2, 4)]
    # the authors' scripts: three pairs two layers apart, ending at the final layers
    assert default_layer_pairs(22, 32, 3, stride=2) == [(18, 28), (20, 30), (22, 32)]
    assert default_layer_pairs(15, 18, 3, stride=2) == [(11, 14), (13, 16), (15, 18)]


@pytest.mark.parametrize("mode, query", [("last_token", None), ("received", None), ("last_token", [5, 3])])
def test_captured_rows_match_eager_attention(mode, query):
    """The captured rows equal eager attention's: the last real token's row, every query's
    (``received``), or the row of a query given per row (SRA's last *text* token, not the EOS)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    cap = RowCapture(model, [1, 3], mode)
    cap.prepare(mask, None if query is None else torch.tensor(query))
    out = model(input_ids=ids, attention_mask=mask)
    rows = cap.rows()
    eager = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)  # the model's own output is unchanged
    q0, q1 = query or (6, 4)
    for layer in (1, 3):
        A = ref.attentions[layer - 1]  # [B, H, T, T]
        if mode == "last_token":
            expect = torch.stack([A[0, :, q0].sum(0), A[1, :, q1].sum(0)])
        else:
            expect = torch.stack([A[0].sum((0, 1)), A[1, :, :5].sum((0, 1))])
        assert torch.allclose(rows[layer], expect, atol=1e-5)
        if query is not None:  # nothing after the query
            assert float(rows[layer][0, q0 + 1:].abs().sum()) == 0.0 and float(rows[layer][1, q1 + 1:].sum()) == 0.0
    assert 2 not in rows  # only the mapped layers
