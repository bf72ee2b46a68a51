"""The LM teacher cache: SRA trained from it equals SRA trained online; keys, resume, refusals."""

import json
from pathlib import Path

import pytest
import torch

from lmdistill import models
from lmdistill.cli import main
from lmdistill.config import load_config
from lmdistill.errors import LmdistillError
from lmdistill.train import lm_cache
from lmdistill.train.lm import run_lm

ROOT = Path(__file__).resolve().parents[1]
TERMS = ("loss", "ce", "span", "geo", "logit")


def _cfg(student, teacher, data, out, *extra):
    return load_config(ROOT / "configs/tiny/sra-tiny.yaml", [
        f"student={student}", f"teacher={teacher}", f"data.train=[{data}]", "data.eval={}", f"output_dir={out}",
        "train.max_steps=4", "train.batch_size=2", *extra])


def _params(folder):
    return torch.cat([p.detach().flatten() for p in models.load_causal_lm(str(folder)).parameters()])


def _terms(m):
    return [h for h in m["log_history"] if "loss" in h]


@pytest.fixture
def no_teacher_weights(monkeypatch, gpt2_lm):
    """Fail if anything loads the teacher's weights."""
    real = models.load_causal_lm

    def guarded(ref, *a, **k):
        assert str(ref) != str(gpt2_lm), "the teacher's weights were loaded"
        return real(ref, *a, **k)

    monkeypatch.setattr(models, "load_causal_lm", guarded)


def _cached_run(llama_lm, gpt2_lm, data, tmp_path, name, *extra, guard=None):
    cache = tmp_path / f"cache-{name}"
    opts = [f"data.teacher_cache={cache}", *extra]
    assert main(["cache", str(ROOT / "configs/tiny/sra-tiny.yaml"), f"student={llama_lm}", f"teacher={gpt2_lm}",
                 f"data.train=[{data}]", "data.eval={}", *opts]) == 0
    if guard:
        guard()
    return run_lm(_cfg(llama_lm, gpt2_lm, data, tmp_path / name, *opts), progress=False), cache


def test_training_from_the_cache_equals_online_in_float32_with_the_whole_vocabulary(
        llama_lm, gpt2_lm, instructions_file, tmp_path, request):
    online = run_lm(_cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / "online"), progress=False)
    cached, cache = _cached_run(llama_lm, gpt2_lm, instructions_file, tmp_path, "cached",
                                "data.teacher_top_k=null", "data.teacher_cache_dtype=float32",
                                guard=lambda: request.getfixturevalue("no_teacher_weights"))
    for a, b in zip(_terms(online), _terms(cached), strict=True):
        for k in TERMS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (k, a, b)
    # equal parameters after 4 steps: the gradients were the same
    assert torch.allclose(_params(tmp_path / "online" / "student"), _params(tmp_path / "cached" / "student"),
                          rtol=1e-5, atol=1e-6)
    summary = cached["teacher_cache"]
    assert summary["rows"] == 4 and summary["top_k"] is None and summary["bytes"] > 0
    assert cached["shared_vocab"]["teacher_mass_in_shared"] is not None


def test_top_k_in_float16_stays_within_the_stated_tolerance(llama_lm, gpt2_lm, instructions_file, tmp_path):
    """Top 16 of the shared vocabulary + one bucket for the rest, CoMs in float16: the CE, span
    and geometric terms within 1% of online training. The span logit KL can only shrink (merging
    the tail into one bucket loses divergence); how much depends on how peaked the teacher is
    (a random tiny teacher is nearly flat, so here most of it goes: see the next test)."""
    online = run_lm(_cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / "online"), progress=False)
    cached, cache = _cached_run(llama_lm, gpt2_lm, instructions_file, tmp_path, "topk",
                                "data.teacher_top_k=16", "data.teacher_cache_dtype=float16")
    for a, b in zip(_terms(online), _terms(cached), strict=True):
        for k in ("ce", "span", "geo"):
            assert b[k] == pytest.approx(a[k], rel=1e-2, abs=1e-4), (k, a, b)
        assert 0 <= b["logit"] <= a["logit"] * (1 + 1e-3) + 1e-6
    full = json.loads((cache / "manifest.json").read_text())
    assert full["key"]["top_k"] == 16 and full["key"]["dtype"] == "float16"


def test_top_k_with_a_rest_bucket_is_close_where_the_teacher_is_peaked():
    """A peaked teacher (as a trained LM is): top 64 of 5000 hold ~99% of its mass, and the
    top-k KL is within 2% of the full one; with k = V it is the full one."""
    from lmdistill.methods.llm.sra import span_logit_kl, span_logit_kl_to

    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 5, 5000, generator=g) * 2.0
    z_t[..., :32] += 20.0
    z_s = z_t + torch.randn(2, 5, 5000, generator=g) * 2.0
    mask = torch.ones(2, 5)
    full = span_logit_kl(z_s, z_t, mask, tau=2.0)
    logp = torch.log_softmax(z_t / 2.0, -1)
    vals, idx = logp.topk(64, -1)
    assert vals.exp().sum(-1).min() > 0.98
    assert span_logit_kl_to(z_s, vals, idx, mask, 2.0) == pytest.approx(float(full), rel=0.02)
    vals, idx = logp.topk(5000, -1)
    assert span_logit_kl_to(z_s, vals, idx, mask, 2.0) == pytest.approx(float(full), rel=1e-5)


def test_a_stale_or_foreign_cache_is_refused(llama_lm, gpt2_lm, instructions_file, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(instructions_file.read_text())
    _, cache = _cached_run(llama_lm, gpt2_lm, data, tmp_path, "first")
    opts = [f"data.teacher_cache={cache}"]
    data.write_text(instructions_file.read_text().replace("Blue", "Green"))  # the data file changed
    with pytest.raises(LmdistillError, match=r"another configuration \(differs in data\)"):
        run_lm(_cfg(llama_lm, gpt2_lm, data, tmp_path / "r1", *opts), progress=False)
    data.write_text(instructions_file.read_text())
    with pytest.raises(LmdistillError, match=r"differs in max_length"):
        run_lm(_cfg(llama_lm, gpt2_lm, data, tmp_path / "r2", "data.max_length=48", *opts), progress=False)
    with pytest.raises(LmdistillError, match=r"student_tokenizer"):  # another student tokenizer
        run_lm(_cfg(gpt2_lm, gpt2_lm, data, tmp_path / "r3", *opts), progress=False)
    with pytest.raises(LmdistillError, match="no teacher cache at .*lmdistill cache CONFIG"):
        run_lm(_cfg(llama_lm, gpt2_lm, data, tmp_path / "r4", f"data.teacher_cache={tmp_path / 'none'}"),
               progress=False)


def test_a_killed_build_resumes_and_gives_the_same_cache(llama_lm, gpt2_lm, instructions_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(lm_cache, "SHARD_ROWS", 2)
    cfg = _cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / "x", f"data.teacher_cache={tmp_path / 'killed'}")
    real, calls = lm_cache.save_file, {"n": 0}

    def dies_on_the_second_shard(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(tensors, path)

    monkeypatch.setattr(lm_cache, "save_file", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        lm_cache.build_lm_teacher_cache(cfg, progress=False)
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    with pytest.raises(LmdistillError, match="incomplete .*again to finish it"):
        run_lm(cfg, progress=False)
    lm_cache.build_lm_teacher_cache(cfg, progress=False)  # resumes: shard 0 is not recomputed
    assert calls["n"] == 3
    monkeypatch.setattr(lm_cache, "save_file", real)
    fresh = _cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / "y", f"data.teacher_cache={tmp_path / 'fresh'}")
    lm_cache.build_lm_teacher_cache(fresh, progress=False)
    for shard in ("shard-00000.safetensors", "shard-00001.safetensors"):
        a, b = load_file(tmp_path / "killed" / shard), load_file(tmp_path / "fresh" / shard)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,terms", [("uld", ("ce", "uld")), ("mined", ("ce", "kl")),
                                          ("multilevel_ot", ("ce", "token", "seq", "ot"))])
def test_token_level_baselines_from_the_cache_equal_online(method, terms, llama_lm, gpt2_lm, instructions_file,
                                                           tmp_path, request):
    """ULD, MinED and MultiLevelOT read the teacher's response logits: from a float32 cache of all
    of them, training equals online; from the top 32 + the rest spread evenly, it stays close."""
    m = [f"method={method}", "method_args={}"]
    online = run_lm(_cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / "online", *m), progress=False)
    topk, _ = _cached_run(llama_lm, gpt2_lm, instructions_file, tmp_path, "topk", *m, "data.teacher_top_k=32")
    assert all(b["ce"] == pytest.approx(a["ce"], rel=1e-2) for a, b in zip(_terms(online), _terms(topk)))
    cached, _ = _cached_run(llama_lm, gpt2_lm, instructions_file, tmp_path, "cached", *m, "data.teacher_top_k=null",
                            "data.teacher_cache_dtype=float32",
                            guard=lambda: request.getfixturevalue("no_teacher_weights"))
    for a, b in zip(_terms(online), _terms(cached), strict=True):
        for k in ("loss", *terms):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (k, a, b)
    assert torch.allclose(_params(tmp_path / "online" / "student"), _params(tmp_path / "cached" / "student"),
                          rtol=1e-5, atol=1e-6)


def test_logits_rebuilt_from_the_top_k_keep_their_probabilities_and_total():
    from lmdistill.methods.llm.base import logits_from_targets, token_logit_targets

    z = torch.randn(6, 100) * 3
    tg = token_logit_targets(z, 10)
    back = logits_from_targets(tg, 100)
    p, q = z.softmax(-1), back.softmax(-1)
    top = tg["idx"]
    assert torch.allclose(q.gather(1, top), p.gather(1, top), atol=1e-6)  # the top k exactly
    assert torch.allclose(back.logsumexp(-1), z.logsumexp(-1), atol=1e-5)
    assert torch.equal(logits_from_targets(token_logit_targets(z, None), 100), z)


@pytest.mark.parametrize("method,why", [("dskd", "hidden states")])
def test_methods_without_a_cached_form_are_refused_clearly(method, why, llama_lm, gpt2_lm, instructions_file,
                                                           tmp_path):
    cfg = _cfg(llama_lm, gpt2_lm, instructions_file, tmp_path, f"method={method}", "method_args={}",
               "data.teacher_cache=auto")
    with pytest.raises(LmdistillError, match=f"{method} cannot train from a teacher cache: .*{why}"):
        run_lm(cfg, progress=False)


def test_the_teachers_reference_scores_are_computed_once(llama_lm, gpt2_lm, instructions_file, tmp_path, request):
    """Scored once per (teacher, file, settings, code): a run from the cache then loads no teacher
    weights at all, even with eval.teacher on."""
    ev = [f"data.eval={{toy: {instructions_file}}}", "eval.teacher=true", f"cache_dir={tmp_path / 'c'}"]
    first = run_lm(_cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / "online", *ev), progress=False)
    assert set(first["teacher_scores"]["toy"]) >= {"rougeL", "bpb"}
    other = run_lm(_cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / "other", *ev, "eval.max_new_tokens=2"),
                   progress=False)  # other settings: scored again
    assert other["teacher_scores"]["toy"]["max_new_tokens"] == 2
    cached, _ = _cached_run(llama_lm, gpt2_lm, instructions_file, tmp_path, "cached", *ev,
                            guard=lambda: request.getfixturevalue("no_teacher_weights"))
    assert cached["teacher_scores"] == first["teacher_scores"]


def test_one_token_logit_cache_serves_every_token_level_method(llama_lm, gpt2_lm, instructions_file, tmp_path,
                                                                request):
    """ULD's cache holds the teacher's response logits, which MinED and MultiLevelOT read too: one
    build serves the three; SRA's span targets are its own and refuse it."""
    _, cache = _cached_run(llama_lm, gpt2_lm, instructions_file, tmp_path, "uld", "method=uld", "method_args={}")
    request.getfixturevalue("no_teacher_weights")
    for method in ("mined", "multilevel_ot"):
        m = run_lm(_cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / method, f"method={method}", "method_args={}",
                        f"data.teacher_cache={cache}"), progress=False)
        assert m["teacher_cache"]["folder"] == str(cache)
    with pytest.raises(LmdistillError, match="another configuration"):
        run_lm(_cfg(llama_lm, gpt2_lm, instructions_file, tmp_path / "sra", f"data.teacher_cache={cache}"),
               progress=False)
