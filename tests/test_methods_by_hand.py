"""Hand-computed checks of the baselines' pieces (MinED, DSKD) and SRA's options."""

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmdistill.align.vocab import dtw, edit_distance_map
from lmdistill.methods.llm.base import Heads, Response, Side
from lmdistill.methods.llm.dskd import cross_model_attention, gated_kl
from lmdistill.methods.llm.mined import MinED, MinEDOptions


def _word_tokenizer(words):
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def test_dtw_path_by_hand():
    # Levenshtein costs: the-the 0, cat-c 2, cat-at 1, the-c 3, .-at 2, .-. 0; the cheapest warp
    # (cost 3) puts "cat" on both "c" and "at"; the next best (".", on "at" and ".") costs 4
    assert dtw(["the", "cat", "."], ["the", "c", "at", "."]) == [(0, 0), (1, 1), (1, 2), (2, 3)]
    assert dtw(["x"], ["x"]) == [(0, 0)]
    assert dtw([], ["x"]) == []


def test_edit_distance_map_by_hand():
    student = _word_tokenizer(["hello", "world", "xy"])
    teacher = _word_tokenizer(["xyz", "hello", "wor"])
    vmap = edit_distance_map(student, teacher)
    s = student.get_vocab()
    # exact match; nearest by Levenshtein among tokens of the same first letter
    assert vmap[teacher.convert_tokens_to_ids("hello")] == s["hello"]
    assert vmap[teacher.convert_tokens_to_ids("wor")] == s["world"]  # distance 2
    assert vmap[teacher.convert_tokens_to_ids("xyz")] == s["xy"]  # distance 1


def _side(targets, logits, b=None):
    n = len(targets)
    b = torch.zeros(n, dtype=torch.long) if b is None else torch.tensor(b)
    return Side(hidden={}, resp=Response(b, torch.arange(n), torch.tensor(targets)), logits=logits)


def test_mined_distils_only_one_to_one_positions_whose_mapped_target_agrees():
    """Student tokens [the, cat, .], teacher tokens [the, c, at, .]: DTW pairs the-the and .-.
    one to one, and cat with both c and at (not one to one). With the map sending teacher "."
    to the student's "the", only the the-the pair is distilled; cat and . keep one-hot targets."""
    m = MinED.__new__(MinED)
    torch.nn.Module.__init__(m)
    m.opts = MinEDOptions(alpha=0.5, tau=1.0)
    m.s_str = ["the", "cat", "."]  # student vocabulary 0..2
    m.t_str = ["the", "c", "at", "."]  # teacher vocabulary 0..3
    m.register_buffer("vmap", torch.tensor([0, 1, 1, 0]))  # teacher id -> student id; "." -> "the" on purpose
    torch.manual_seed(0)
    z_s, z_t = torch.randn(3, 3), torch.randn(4, 4)
    s, t = _side([0, 1, 2], z_s), _side([0, 1, 2, 3], z_t)
    ce = F.cross_entropy(z_s, torch.tensor([0, 1, 2]))
    out = m({"s_input_ids": torch.zeros(1, 3, dtype=torch.long)}, s, t, Heads(ce=ce))
    mapped = torch.full((3,), -1e4)
    for j in range(4):  # scatter with max over collisions
        mapped[m.vmap[j]] = max(float(mapped[m.vmap[j]]), float(z_t[0, j]))
    p = F.softmax(mapped, -1)
    log_q = F.log_softmax(z_s, -1)
    kl0 = sum(float(pi * (pi.log() - lq)) for pi, lq in zip(p, log_q[0]) if pi > 0)
    expect = (kl0 - float(log_q[1, 1]) - float(log_q[2, 2])) / 3
    assert float(out["kl"]) == pytest.approx(expect, rel=1e-5)
    assert float(out["aligned"]) == pytest.approx(1 / 3)
    assert float(out["loss"]) == pytest.approx(0.5 * float(ce) + 0.5 * expect, rel=1e-5)


def test_dskd_attention_stays_within_each_example():
    torch.manual_seed(0)
    q, k = torch.randn(5, 4), torch.randn(6, 4)
    ex_q, ex_k = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 1])
    a, _ = cross_model_attention(q, k, ex_q, ex_k)
    for i in range(5):
        assert float(a[i][ex_k != ex_q[i]].abs().sum()) == 0.0
        assert float(a[i].sum()) == pytest.approx(1.0)
    own = (q[0] @ k[:3].T / 2).softmax(-1)  # sqrt(4) = 2
    assert torch.allclose(a[0, :3], own)


def test_dskd_kl_is_gated_by_the_projected_argmax():
    z_t2s = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    z_s = torch.zeros(3, 3)
    target = torch.tensor([0, 2, 2])  # right at rows 0 and 2, wrong at row 1
    kl, right = gated_kl(z_t2s, z_s, target, tau=1.0)
    assert right.tolist() == [1.0, 0.0, 1.0]
    p = F.softmax(torch.tensor([3.0, 0.0, 0.0]), -1)
    one = float((p * (p.log() - math.log(1 / 3))).sum())
    assert float(kl) == pytest.approx(2 * one / 3, rel=1e-6)


def test_sra_options_uniform_weights_orthogonal_projectors_layer_pairs(gpt2_lm, llama_lm, instructions_file,
                                                                        monkeypatch):
    from test_lm_methods import _setup

    import lmdistill.methods.llm.sra as sra

    seen = []
    real = sra.weighted_cosine_loss
    monkeypatch.setattr(sra, "weighted_cosine_loss", lambda a, b, W: seen.append(W) or real(a, b, W))
    wrapper, batch = _setup("sra", gpt2_lm, llama_lm, instructions_file, span_weighting="uniform",
                            projector_init="orthogonal", layer_pairs=[[1, 2], [2, 1]])
    m = wrapper.method
    assert m.pairs == [(1, 2), (2, 1)] and m.student_layers() == [1, 2] and m.teacher_layers() == [1, 2]
    wrapper(**batch)
    K = batch["span_mask"].sum(1, keepdim=True).float()
    for W in seen:  # W_k = 1/K over each row's real spans, 0 on padding
        assert torch.allclose(W, batch["span_mask"].float() / K)
    for proj in m.projectors:  # d_S 32 -> d_T 32 here: P P^T = I
        P = proj.weight
        assert torch.allclose(P @ P.T, torch.eye(P.size(0)), atol=1e-5)


def test_dskd_does_not_depend_on_the_scale_the_teachers_embedding_module_applies(gpt2_lm, llama_lm,
                                                                                  instructions_file):
    """Gemma's embedding module returns the table's rows times sqrt(d) (25.3 at d = 640). DSKD divides
    the embeddings it looks up by their own std, as the reference does, so its terms do not depend on
    that factor. Dividing by the table's std instead left Gemma's keys and target embeddings 25 times
    too large: near-hard attention and a projected-teacher CE in the tens."""
    from test_lm_methods import _setup

    wrapper, batch = _setup("dskd", gpt2_lm, llama_lm, instructions_file)
    plain = wrapper.method._t_emb

    class Scaled(torch.nn.Module):
        def forward(self, ids):
            return plain(ids) * 25.3

    with torch.no_grad():
        before = wrapper(**batch)
        wrapper.method._t_emb = Scaled()  # the method's lookups only; the teacher's forward is unchanged
        after = wrapper(**batch)
    for term in ("ce_t2s", "kd_student", "kd_teacher", "loss"):
        assert float(after[term]) == pytest.approx(float(before[term]), rel=1e-4), term
