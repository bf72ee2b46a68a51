import json
import subprocess
import sys

import numpy as np
import pytest
import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lmdistill.align import kernel
from lmdistill.align.spans import align_batch, align_offsets, align_text, encode_with_offsets
from lmdistill.errors import LmdistillError

PAIRS = [(tiny.GPT2, tiny.LLAMA), (tiny.LLAMA, tiny.GPT2), (tiny.GPT2, tiny.MISTRAL), (tiny.TINYLLAMA, tiny.MISTRAL)]
_TOKS: dict = {}
# both backends of align_batch; the compiled one needs numba (installed by `make`)
BACKENDS = ["numpy", pytest.param("compiled", marks=pytest.mark.skipif(not kernel.COMPILED, reason="numba not installed"))]


def tok(path):
    if path not in _TOKS:
        _TOKS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKS[path]


def real_pair():
    """The SmolLM2 / Gemma-3 tokenizers (from the installed packages, tokenizers only)."""
    if "real" not in _TOKS:
        from lmdistill import models

        _TOKS["real"] = (models.load_tokenizer("pkg:smollm2-135m-instruct", tiny.REAL_CACHE),
                         models.load_tokenizer("pkg:gemma-3-270m", tiny.REAL_CACHE))
    return _TOKS["real"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_specified_example(backend):
    # student Hello| world|wide vs teacher Hel|lo| worldwide
    text = "Hello worldwide"
    s = np.array([[0, 5], [5, 11], [11, 15]])
    t = np.array([[0, 3], [3, 5], [5, 15]])
    al = align_offsets(s, t, 0, backend=backend)
    assert al.chars.tolist() == [[0, 5], [5, 15]]
    assert al.student.tolist() == [[0, 1], [1, 3]]
    assert al.teacher.tolist() == [[0, 2], [2, 3]]
    assert [text[a:b] for a, b in al.chars] == ["Hello", " worldwide"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_specials_truncation_and_subsampling(backend):
    # BOS (0,0) on the teacher, EOS on the student; the teacher is truncated after "Hello wor"
    s = np.array([[0, 5], [5, 11], [11, 15], [0, 0]])
    t = np.array([[0, 0], [0, 3], [3, 5], [5, 9]])
    al = align_offsets(s, t, 0, 15, backend=backend)
    assert al.chars.tolist() == [[0, 5]] and al.teacher.tolist() == [[1, 3]]
    assert al.stats["ratio"] == pytest.approx(5 / 15, abs=1e-4)
    many = np.array([[i, i + 1] for i in range(50)])
    sub = align_offsets(many, many, 0, max_spans=10, backend=backend)
    assert len(sub) == 10 and sub.stats["subsampled"] and sub.stats["n_spans"] == 50
    assert sub.chars[0].tolist() == [0, 1] and sub.chars[-1].tolist() == [49, 50]


@pytest.mark.parametrize("backend", BACKENDS)
def test_response_only(backend):
    s = np.array([[0, 2], [2, 4], [4, 6]])
    t = np.array([[0, 3], [3, 6]])
    al = align_offsets(s, t, response_start=3, backend=backend)
    # the first common cut at or after 3 is 6: nothing to align
    assert len(al) == 0
    assert len(align_offsets(s, t, response_start=2, backend=backend)) == 0
    al = align_offsets(s, t, response_start=0, backend=backend)
    assert al.chars.tolist() == [[0, 6]] and al.student.tolist() == [[0, 3]] and al.teacher.tolist() == [[0, 2]]


def _same(a, b):
    """Two alignments (one row, or a batch) are the same, statistics included."""
    assert a.chars.tolist() == b.chars.tolist()
    assert a.student.tolist() == b.student.tolist()
    assert a.teacher.tolist() == b.teacher.tolist()
    assert a.stats == b.stats
    if hasattr(a, "mask"):
        assert a.mask.tolist() == b.mask.tolist()


def _check_invariants(text, r, s_tok, t_tok):
    s_ids, s_off, s_keep = encode_with_offsets(s_tok, text)
    t_ids, t_off, t_keep = encode_with_offsets(t_tok, text)
    al = align_offsets(s_off, t_off, r, len(text), s_keep, t_keep)
    _same(al, align_offsets(s_off, t_off, r, len(text), s_keep, t_keep, backend="numpy"))
    if len(al) == 0:
        return al
    # spans are contiguous, in order, inside the response
    assert al.chars[0, 0] >= r
    assert (al.chars[1:, 0] == al.chars[:-1, 1]).all()
    assert (al.chars[:, 1] > al.chars[:, 0]).all()
    for side_rng, off, keep in ((al.student, s_off, s_keep), (al.teacher, t_off, t_keep)):
        assert (side_rng[:, 1] > side_rng[:, 0]).all()
        assert (side_rng[1:, 0] >= side_rng[:-1, 1]).all()
        side_cov = set()
        for k in range(len(off)):
            if keep[k]:
                side_cov.update(range(off[k, 0], off[k, 1]))
        for (a, b), (i, j) in zip(al.chars, side_rng):
            real = [k for k in range(i, j) if keep[k] and off[k, 1] > off[k, 0]]
            assert real, "every span has tokens on both sides"
            assert max(off[k, 1] for k in real) == b
            covered = set()
            for k in real:
                covered.update(range(off[k, 0], off[k, 1]))
            # exactly the span's characters that this tokenizer covers at all (it may drop a
            # space into a word-boundary marker; such a gap belongs to the following token)
            assert covered == set(range(a, b)) & side_cov, (a, b, sorted(covered))
    return al


TEXTS = [
    "Hello worldwide 😀 漢字 1234   end",
    "The year 2024 had 366 days.\n\n  Indented\tline — with ‘quotes’ and emoji 👩‍👩‍👧!",
    "日本語のテキストと English mixed 混合 123,456.78",
    "   leading spaces and trailing   ",
    "",
]


@pytest.mark.parametrize("s_path,t_path", PAIRS)
@pytest.mark.parametrize("text", TEXTS)
def test_invariants_on_real_tokenizer_pairs(s_path, t_path, text):
    prompt = "### Instruction:\nRespond.\n\n### Response:\n"
    _check_invariants(prompt + text, len(prompt), tok(s_path), tok(t_path))


alphabet = st.sampled_from(list("ab cde  fgh\n\t0123456789.,!?'") + ["é", "ß", "😀", "漢", "字", "👍🏽", "ー", "  "])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(alphabet, min_size=0, max_size=40).map("".join), st.sampled_from(PAIRS))
def test_property_partition(response, pair):
    prompt = "Q: say it\nA:"
    s_tok, t_tok = tok(pair[0]), tok(pair[1])
    al = _check_invariants(prompt + response, len(prompt), s_tok, t_tok)
    if len(al):
        assert al.stats["aligned_chars"] == al.chars[-1, 1] - al.chars[0, 0]
        assert 0 < al.stats["ratio"] <= 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(alphabet, min_size=0, max_size=40).map("".join))
def test_property_partition_smollm2_gemma(response):
    pair = real_pair()
    _check_invariants("Instruction: go\nResponse:" + response, len("Instruction: go\nResponse:"), *pair)


def test_empty_response_has_no_spans():
    r = align_text("prompt only", tok(tiny.GPT2), tok(tiny.LLAMA), response_start=len("prompt only"))
    assert r["spans"] == [] and r["stats"]["n_spans"] == 0


def test_cli_align_json(gpt2_lm, llama_lm):
    out = subprocess.run([sys.executable, "-m", "lmdistill", "align", "--student", str(gpt2_lm), "--teacher",
                          str(llama_lm), "--text", "Q: hi\nA: Hello worldwide", "--response-start", "6", "--json"],
                         capture_output=True, text=True, check=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert {"spans", "stats"} <= set(obj)
    assert all(set(sp) == {"chars", "student", "teacher"} for sp in obj["spans"])
    assert obj["spans"][-1]["chars"][1] == len("Q: hi\nA: Hello worldwide")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(alphabet, min_size=0, max_size=30).map("".join), min_size=1, max_size=5),
       st.sampled_from(PAIRS), st.sampled_from([3, 1024]))
def test_batch_alignment_equals_row_by_row(responses, pair, max_spans):
    """One call for the batch gives, row for row, what each row gives alone (subsampling too)."""
    prompt = "Q: say it\nA:"
    s_tok, t_tok = tok(pair[0]), tok(pair[1])
    s_enc = [encode_with_offsets(s_tok, prompt + r) for r in responses]
    t_enc = [encode_with_offsets(t_tok, prompt + r) for r in responses]
    starts, ends = [len(prompt)] * len(responses), [len(prompt + r) for r in responses]
    batch = align_batch([e[1] for e in s_enc], [e[1] for e in t_enc], starts, ends,
                        [e[2] for e in s_enc], [e[2] for e in t_enc], max_spans)
    _same(batch, align_batch([e[1] for e in s_enc], [e[1] for e in t_enc], starts, ends,
                             [e[2] for e in s_enc], [e[2] for e in t_enc], max_spans, backend="numpy"))
    assert batch.mask.shape[0] == len(responses)
    for i, (se, te) in enumerate(zip(s_enc, t_enc)):
        alone = align_offsets(se[1], te[1], starts[i], ends[i], se[2], te[2], max_spans)
        _same(batch.row(i), alone)
        assert not batch.mask[i, len(alone):].any()


def _odd_offsets(rng, length):
    """Token offsets as tokenizers give them, and worse: empty (specials), repeated (byte tokens of
    one character), skipping characters, overlapping or out of order."""
    out, prev = [], 0
    for c in np.sort(rng.choice(length + 1, size=min(int(rng.integers(0, 2 + length)), length + 1), replace=False)):
        kind = rng.random()
        if kind < 0.1:
            out.append((0, 0))
        elif kind < 0.2 and out:
            out.append(out[-1])
        elif kind < 0.3:
            out.append(tuple(int(x) for x in rng.integers(0, length + 1, size=2)))
        else:
            out.append((prev + int(rng.integers(0, 2)) if prev < c else prev, int(c)))
        prev = int(c)
    return np.array(out, dtype=np.int64).reshape(-1, 2)


@pytest.mark.skipif(not kernel.COMPILED, reason="numba not installed")
def test_backends_agree_on_odd_offsets():
    """The compiled merge pass and the numpy path give the same spans, masks and statistics on
    4,000 random batches of odd offsets, with and without keep masks, subsampling included."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        b, length = int(rng.integers(1, 5)), int(rng.choice([rng.integers(0, 15), rng.integers(15, 200)]))
        s, t = [_odd_offsets(rng, length) for _ in range(b)], [_odd_offsets(rng, length) for _ in range(b)]
        starts = rng.integers(0, length + 2, size=b)
        s_keep = [rng.random(len(x)) > 0.1 for x in s] if rng.random() < 0.5 else None
        t_keep = [rng.random(len(x)) > 0.1 for x in t] if rng.random() < 0.5 else None
        max_spans = int(rng.integers(1, 6))
        _same(align_batch(s, t, starts, None, s_keep, t_keep, max_spans, backend="compiled"),
              align_batch(s, t, starts, None, s_keep, t_keep, max_spans, backend="numpy"))


@pytest.mark.skipif(not kernel.COMPILED, reason="numba not installed")
def test_backends_agree_on_dolly():
    """Both backends on 96 real Dolly rows (long responses, hundreds of tokens), SmolLM2 / Gemma-3
    tokenizers, in batches as the collator makes them, cut at 256 tokens and whole."""
    from lmdistill.data.collate import encode_batch
    from lmdistill.data.readers import read_instructions

    rows = read_instructions(tiny.DATA / "minillm_eval" / "dolly" / "valid.jsonl", 96)
    s_tok, t_tok = real_pair()
    for max_length, batch in ((256, 8), (8192, 3)):
        for i in range(0, len(rows), batch):
            prompts, responses = [r.prompt for r in rows[i:i + batch]], [r.response for r in rows[i:i + batch]]
            s, t = encode_batch(s_tok, prompts, responses, max_length), encode_batch(t_tok, prompts, responses, max_length)
            args = ([e[2] for e in s], [e[2] for e in t], [len(p) for p in prompts],
                    [len(p) + len(r) for p, r in zip(prompts, responses)], [e[3] for e in s], [e[3] for e in t])
            for max_spans in (1024, 17):
                _same(align_batch(*args, max_spans=max_spans, backend="compiled"),
                      align_batch(*args, max_spans=max_spans, backend="numpy"))


def test_backend_errors(monkeypatch):
    s = np.array([[0, 5]])
    with pytest.raises(LmdistillError, match="auto, compiled or numpy"):
        align_offsets(s, s, backend="fast")
    monkeypatch.setattr(kernel, "COMPILED", False)
    with pytest.raises(LmdistillError, match="needs numba"):
        align_offsets(s, s, backend="compiled")
    assert align_offsets(s, s).chars.tolist() == [[0, 5]]  # auto falls back to numpy
    monkeypatch.undo()
    for bad in (dict(student_keep=[True, False]), dict(teacher_offsets=np.array([0, 5]))):
        args = dict(student_offsets=s, teacher_offsets=s) | bad
        with pytest.raises(LmdistillError, match="offsets \\[n, 2\\] and a keep mask"):
            align_offsets(**args)
