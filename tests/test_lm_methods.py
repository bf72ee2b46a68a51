import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmdistill import models
from lmdistill.config import build_options, load_config
from lmdistill.data.collate import InstructionCollator, encode_batch
from lmdistill.data.readers import read_instructions
from lmdistill.errors import LmdistillError
from lmdistill.methods.llm.multilevel_ot import sinkhorn_cost, topk_by_mass
from lmdistill.methods.llm.uld import sorted_l1
from lmdistill.registry import get_method, list_methods
from lmdistill.train.lm import LMDistillModel, build_method


def test_sorted_l1_by_hand():
    p_s = torch.tensor([[0.1, 0.7, 0.2]])
    p_t = torch.tensor([[0.5, 0.5]])
    # sorted: [0.7, 0.2, 0.1] vs [0.5, 0.5, 0] -> 0.2 + 0.3 + 0.1
    assert float(sorted_l1(p_s, p_t)) == pytest.approx(0.6)


@pytest.mark.parametrize("v_s, v_t", [(50, 300), (300, 50), (64, 64)])
def test_sorted_l1_equals_sorting_everything(v_s, v_t):
    """The top-v shortcut gives the value and the gradients of padding and sorting both sides in full."""
    def full_sort(p_s, p_t):
        s = p_s.sort(dim=-1, descending=True).values
        t = p_t.sort(dim=-1, descending=True).values
        v = max(s.size(-1), t.size(-1))
        pad = torch.nn.functional.pad
        return (pad(s, (0, v - s.size(-1))) - pad(t, (0, v - t.size(-1)))).abs().sum(-1)

    g = torch.Generator().manual_seed(0)
    z_s = (torch.randn(7, v_s, generator=g, dtype=torch.float64) * 3).requires_grad_()
    z_t = (torch.randn(7, v_t, generator=g, dtype=torch.float64) * 3).requires_grad_()
    got = sorted_l1(z_s.softmax(-1), z_t.softmax(-1))
    grads = torch.autograd.grad(got.sum(), (z_s, z_t))
    want = full_sort(z_s.softmax(-1), z_t.softmax(-1))
    want_grads = torch.autograd.grad(want.sum(), (z_s, z_t))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and on vectors that are not distributions (any non-negative input)
    a, b = torch.rand(3, v_s, generator=g, dtype=torch.float64), torch.rand(3, v_t, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sorted_l1(a, b), full_sort(a, b), rtol=1e-12, atol=1e-12)


def test_sinkhorn_by_hand():
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # the plan concentrates on the diagonal as eps -> 0: <P, C> -> 0; at eps = 1 it is
    # P = [[a, b], [b, a]] / 2 with a = 1 / (1 + e^-1): <P, C> = b = e^-1 / (1 + e^-1)
    assert float(sinkhorn_cost(cost, 0.01, 200)) == pytest.approx(0.0, abs=1e-6)
    assert float(sinkhorn_cost(cost, 1.0, 200)) == pytest.approx(math.exp(-1) / (1 + math.exp(-1)), rel=1e-4)


def test_topk_by_mass():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    # column masses [0.3, 0.8, 0.9]: columns 2 then 1
    assert topk_by_mass(p, 2).flatten().tolist() == pytest.approx([0.3, 0.6, 0.6, 0.2])


def test_registry():
    assert set(list_methods("lm")) >= {"sra", "sft", "uld", "mined", "dskd", "multilevel_ot"}
    assert set(list_methods("embedding")) >= {"talas", "embed_kd", "all_layer", "rkd", "stella"}
    with pytest.raises(LmdistillError, match="unknown lm method"):
        get_method("nope", "lm")


def _setup(method, student, teacher, instructions_file, **opts):
    cfg = load_config(None, ["task=lm", f"method={method}", f"student={student}", f"teacher={teacher}"])
    cfg.method_args = opts
    s_tok, t_tok = models.load_tokenizer(str(student)), models.load_tokenizer(str(teacher))
    s = AutoModelForCausalLM.from_pretrained(student)
    t = AutoModelForCausalLM.from_pretrained(teacher)
    torch.manual_seed(0)
    m = build_method(cfg, s, t, s_tok, t_tok)
    wrapper = LMDistillModel(s, t, m)
    rows = read_instructions(instructions_file)
    coll = InstructionCollator(s_tok, t_tok, 64, spans=m.needs_spans)
    batch = coll([{"prompt": r.prompt, "response": r.response} for r in rows])
    return wrapper, batch


def test_sra_applies_both_heads_to_real_spans_only_and_gathers_the_teachers_rows_once(
        gpt2_lm, llama_lm, instructions_file, monkeypatch):
    import lmdistill.train.lm as lm

    wrapper, batch = _setup("sra", gpt2_lm, llama_lm, instructions_file)
    n_real = int(batch["span_mask"].sum())
    assert n_real < batch["span_mask"].numel()  # the batch has padded spans
    sizes, real_fn = [], lm.lm_head_logits
    monkeypatch.setattr(lm, "lm_head_logits", lambda head, cap, x, *a: sizes.append(x.shape[:-1]) or real_fn(head, cap,
                                                                                                              x, *a))
    wrapper(**batch)
    rows = wrapper._t_rows[1]
    wrapper(**batch)
    assert wrapper._t_rows[1] is rows  # the teacher's shared rows: gathered at the first step only
    n_resp = int((batch["s_labels"] != -100).sum())
    # per step: the student's response tokens (CE), then the real spans (teacher targets, student span logits)
    assert sizes[:3] == [torch.Size([n_resp]), torch.Size([n_real]), torch.Size([n_real])]
    _, t_head, _ = lm.decoder_and_head(wrapper.teacher)
    assert torch.equal(rows.weight, t_head.weight[wrapper.method.shared_t])
    x = torch.randn(3, t_head.weight.shape[1])
    heads = wrapper.teacher_heads()
    torch.testing.assert_close(heads["teacher_logits"](x, wrapper.method.shared_t),
                               real_fn(t_head, None, x, wrapper.method.shared_t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [0.3, 0.94])
def test_head_logits_over_some_ids_equal_the_full_heads_columns_with_their_gradients(share):
    """A small id set gathers its rows; a large one (SRA's shared vocabulary) takes the columns of
    the whole head's output. Both give the full head's logits at those ids, soft-capped, and the
    same gradients to the states and to the head."""
    from lmdistill.models import lm_head_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 200)
    ids = torch.randperm(200)[: int(200 * share)]
    x = torch.randn(7, 16, requires_grad=True)
    z = lm_head_logits(head, 30.0, x, ids)
    gz = torch.randn_like(z)
    (z * gz).sum().backward()
    gx, gw, gb = x.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    x.grad = head.weight.grad = head.bias.grad = None
    ref = torch.tanh(head(x) / 30.0)[:, ids] * 30.0
    (ref * gz).sum().backward()
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    for got, want in ((gx, x.grad), (gw, head.weight.grad), (gb, head.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert gw[torch.ones(200, dtype=torch.bool).index_fill_(0, ids, False)].abs().sum() == 0  # rows outside ids
    head.zero_grad(set_to_none=True)
    lm_head_logits(head, None, x, ids, detach_weight=True).sum().backward()
    assert head.weight.grad is None and head.bias.grad is None  # detached: the states' gradient only


METHODS = ["sft", "sra", "uld", "mined", "dskd", "multilevel_ot"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("direction", ["gpt2->llama", "llama->gpt2"])
def test_method_runs_and_decreases_on_a_repeated_batch(method, direction, gpt2_lm, llama_lm, instructions_file):
    student, teacher = (gpt2_lm, llama_lm) if direction == "gpt2->llama" else (llama_lm, gpt2_lm)
    wrapper, batch = _setup(method, student, teacher, instructions_file)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    teacher_before = {k: v.clone() for k, v in wrapper.teacher.state_dict().items()}
    losses = []
    for _ in range(6):
        opt.zero_grad()
        out = wrapper(**batch)
        assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v)), out
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < losses[0], losses
    # the teacher is frozen
    assert all(torch.equal(v, wrapper.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_sra_logs_every_term_and_options(gpt2_lm, llama_lm, instructions_file):
    wrapper, batch = _setup("sra", gpt2_lm, llama_lm, instructions_file, velocity=True)
    out = wrapper(**batch)
    assert {"ce", "span", "velocity", "geo", "logit", "loss", "align_ratio"} <= set(out)
    o = wrapper.method.opts
    total = o.alpha * out["ce"] + (1 - o.alpha) * (o.c_span * (out["span"] + out["velocity"]) + o.lambda_geo * out["geo"]
                                                   + out["logit"])
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-5)
    for opts in ({"weighting": "uniform"}, {"weighting": "received"}, {"span_weighting": "uniform"},
                 {"lambda_geo": 0.0, "w_logit": 0.0}, {"vocab_match": "exact"}, {"projector_init": "orthogonal"},
                 {"layer_pairs": [[1, 2], [2, 2]]}):
        w, b = _setup("sra", gpt2_lm, llama_lm, instructions_file, **opts)
        res = w(**b)
        assert torch.isfinite(res["loss"])
        if opts.get("w_logit") == 0.0:
            assert "logit" not in res and "geo" not in res


def test_sra_refuses_bad_layers_and_options(gpt2_lm, llama_lm, instructions_file):
    with pytest.raises(LmdistillError, match="out of range"):
        _setup("sra", gpt2_lm, llama_lm, instructions_file, layer_pairs=[[3, 1]])
    with pytest.raises(LmdistillError, match="weighting"):
        _setup("sra", gpt2_lm, llama_lm, instructions_file, weighting="max")
    with pytest.raises(LmdistillError, match="unknown option"):
        build_options(get_method("sra", "lm").Options, {"gamma": 1}, "sra")


def test_teacher_runs_without_lm_head_for_sra(gpt2_lm, llama_lm, instructions_file):
    wrapper, batch = _setup("sra", gpt2_lm, llama_lm, instructions_file)
    calls = []
    head = wrapper.teacher.get_output_embeddings()
    head.register_forward_hook(lambda *a: calls.append(1))
    wrapper(**batch)
    assert calls == []  # the teacher head is applied to span CoMs only, never as a module over [B, T]


def test_collator_labels_and_spans(gpt2_lm, llama_lm, instructions_file):
    wrapper, batch = _setup("sra", gpt2_lm, llama_lm, instructions_file)
    s_tok = models.load_tokenizer(str(gpt2_lm))
    rows = read_instructions(instructions_file)
    ids = batch["s_input_ids"][0]
    labels = batch["s_labels"][0]
    text = s_tok.decode(ids[labels != -100])
    assert rows[0].response in text and "Instruction" not in text
    assert batch["span_mask"].sum() > 0
    assert (batch["spans_s"][..., 1] >= batch["spans_s"][..., 0]).all()
    assert np.isclose(float(batch["align_ratio"][0]), 1.0)


PROMPT = "### Instruction:\nName three colours and say something about each of them.\n\n### Response:\n"
RESPONSE = "Blue is the colour of the sky, red is the colour of fire, and green is the colour of grass."


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_truncated_rows_keep_the_response_and_get_no_eos(which, gpt2_lm, llama_lm):
    tok = models.load_tokenizer(str(gpt2_lm if which == "gpt2" else llama_lm))
    eos = tok.eos_token_id
    full = encode_batch(tok, [PROMPT], [RESPONSE], 512)[0]
    n_resp = sum(1 for x in full[1] if x != -100) - 1  # labelled response tokens, EOS aside
    assert full[1][-1] == eos and full[0][-1] == eos  # a whole response ends in a labelled EOS
    for max_length in (16, 24, 32):
        ids, labels, offsets, keep = encode_batch(tok, [PROMPT], [RESPONSE], max_length)[0]
        assert len(ids) == max_length == len(labels) == len(offsets)
        assert eos not in [x for x in labels if x != -100]  # no EOS target mid-sentence
        kept = [x for x in labels if x != -100]
        # the prompt keeps at most half of max_length when the response needs the room
        n_prompt = int(keep.sum()) - len(kept)
        assert n_prompt <= max_length // 2 and len(kept) >= max_length // 2 - 1
        assert tok.decode(kept).strip() and RESPONSE.startswith(tok.decode(kept).strip()[:20])
        assert "Response:" in tok.decode(ids)  # the prompt's end is what is kept
        if tok.bos_token_id is not None and full[0][0] == tok.bos_token_id:
            assert ids[0] == tok.bos_token_id
    assert n_resp > 16


def test_collator_query_is_the_last_text_token(gpt2_lm, llama_lm, instructions_file):
    _, batch = _setup("sra", gpt2_lm, llama_lm, instructions_file)
    for side, tok in (("s", models.load_tokenizer(str(gpt2_lm))), ("t", models.load_tokenizer(str(llama_lm)))):
        ids, q = batch[f"{side}_input_ids"], batch[f"{side}_last_text"]
        for i in range(ids.size(0)):
            assert int(ids[i, q[i]]) != tok.eos_token_id and int(ids[i, q[i] + 1]) == tok.eos_token_id


def test_sra_applies_the_final_norm_before_the_head_at_a_non_final_layer(gpt2_lm, llama_lm, instructions_file):
    """At layer 1 of 2 the CoM is a pre-norm state: each model's final norm runs on it first."""
    for last, expect in (([[1, 1]], True), ([[2, 2]], False)):
        wrapper, batch = _setup("sra", llama_lm, gpt2_lm, instructions_file, layer_pairs=last)
        calls = {"s": [], "t": []}
        models.final_norm(wrapper.student).register_forward_hook(lambda m, a, o, c=calls: c["s"].append(a[0].shape))
        models.final_norm(wrapper.teacher).register_forward_hook(lambda m, a, o, c=calls: c["t"].append(a[0].shape))
        out = wrapper(**batch)
        n_real = int(batch["span_mask"].sum())
        # each decoder's own call on [B, T, d], then, at a non-final layer, one on the real spans' CoMs [N, d]
        for side in ("s", "t"):
            assert len(calls[side]) == (2 if expect else 1), calls
            if expect:
                assert tuple(calls[side][1][:-1]) == (n_real,)
        assert torch.isfinite(out["loss"])


def test_sra_refuses_a_non_final_logit_layer_without_a_final_norm(gpt2_lm, llama_lm, instructions_file, monkeypatch):
    import lmdistill.methods.llm.sra as sra

    monkeypatch.setattr(sra, "final_norm", lambda model: None)
    with pytest.raises(LmdistillError, match="final norm"):
        _setup("sra", gpt2_lm, llama_lm, instructions_file, layer_pairs=[[1, 1]])
    _setup("sra", gpt2_lm, llama_lm, instructions_file, layer_pairs=[[1, 1]], w_logit=0.0)  # no head: fine
    _setup("sra", gpt2_lm, llama_lm, instructions_file, layer_pairs=[[2, 2]])  # final layers: fine


def test_sra_span_weights_come_from_each_pair(gpt2_lm, llama_lm, instructions_file, monkeypatch):
    import lmdistill.methods.llm.sra as sra

    seen = []
    real = sra.weighted_cosine_loss
    monkeypatch.setattr(sra, "weighted_cosine_loss", lambda a, b, W: seen.append(W) or real(a, b, W))
    for mode in ("each_pair", "last_pair"):
        seen.clear()
        wrapper, batch = _setup("sra", gpt2_lm, llama_lm, instructions_file, layer_pairs=[[1, 1], [2, 2]],
                                span_weights_from=mode)
        wrapper(**batch)
        assert len(seen) == 2
        assert torch.equal(seen[0], seen[1]) == (mode == "last_pair")
        for W in seen:  # weights over each row's real spans sum to 1
            assert torch.allclose(W.sum(1), torch.ones(W.size(0)), atol=1e-5)
    with pytest.raises(LmdistillError, match="span_weights_from"):
        _setup("sra", gpt2_lm, llama_lm, instructions_file, span_weights_from="first")
    with pytest.raises(LmdistillError, match="projector_init"):
        _setup("sra", gpt2_lm, llama_lm, instructions_file, projector_init="kaiming")


def test_lm_student_reduced_to_a_subset_of_its_blocks(llama_lm, tmp_path):
    """``student_layers`` in an LM run: the pruned student runs, saves and reloads as a plain model."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 100, (2, 6))
    kept = [model.model.layers[i] for i in (0, 2)]
    models.reduce_causal_layers(model, [0, 2])
    assert list(model.model.layers) == kept and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    out = model(input_ids=ids).logits
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache follows the new indices
    assert gen.shape == (2, 9)
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert torch.allclose(again(input_ids=ids).logits, out, atol=1e-6)
    for bad in ([], [0, 4], [1, 1]):
        with pytest.raises(LmdistillError, match="student_layers"):
            models.reduce_causal_layers(AutoModelForCausalLM.from_config(cfg), bad)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_a_long_prompt_is_cut_so_that_a_short_response_keeps_its_eos(which, gpt2_lm, llama_lm):
    tok = models.load_tokenizer(str(gpt2_lm if which == "gpt2" else llama_lm))
    prompt = "### Instruction:\n" + " ".join(["Describe the colours of the sky."] * 12) + "\n\n### Response:\n"
    response = "Blue."
    ids, labels, _, keep = encode_batch(tok, [prompt], [response], 32)[0]
    assert len(ids) <= 32
    kept = [x for x in labels if x != -100]
    assert kept[-1] == tok.eos_token_id and tok.decode(kept[:-1]).strip() == "Blue."  # whole, with its EOS
    assert "Response:" in tok.decode(ids) and int(keep.sum()) - len(kept) + 1 > 16  # the prompt keeps the room left
