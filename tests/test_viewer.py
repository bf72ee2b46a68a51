"""The span viewer (`lmdistill align --html`): one text as its shared spans, checked in a real browser."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from lmdistill.align.spans import align_text
from lmdistill.align.viewer import span_page, write_span_page
from lmdistill.align.vocab import shared_vocab
from lmdistill.cli import main
from lmdistill.models import load_causal_lm, load_tokenizer

TEXT = "Hi 😀 — 你好世界!   three spaces\tand a tab\nnew line"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def pair(llama_lm, gpt2_lm):
    return load_tokenizer(str(llama_lm)), load_tokenizer(str(gpt2_lm))


def test_the_page_lays_out_every_span_with_both_sides_tokens(pair, gpt2_lm, tmp_path):
    s_tok, t_tok = pair
    shared = shared_vocab(s_tok, t_tok, cache_dir=tmp_path)
    teacher = load_causal_lm(str(gpt2_lm)).eval()
    page, summary = span_page(TEXT, s_tok, t_tok, shared=shared, teacher_model=teacher)
    spans = align_text(TEXT, s_tok, t_tok)["spans"]
    assert summary["spans"] == len(spans) and summary["uncovered_characters"] == 0
    assert len(re.findall(r'<span class="span (?:odd|even)" title="span \d+" id="s\d+"', page)) == len(spans)
    assert page.count("<tr><td") == len(spans)  # one table row per span
    assert "你" in page and "😀" in page and "·" in page and "→" in page  # whitespace made visible
    assert "&lt;0xF0&gt;" in page and 'class="tok fallback"' in page  # the Llama side spells the emoji in bytes
    assert 'class="tok shared"' in page and 'class="tok special"' in page  # Llama's BOS is in no span
    weights = [float(x) for x in re.findall(r'<td class="num">(\d\.\d{3})</td>', page)]
    assert len(weights) == len(spans) and abs(sum(weights) - 1) < 5e-3  # SRA's span weights sum to one
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched: it works offline


def test_characters_no_span_covers_are_marked(pair):
    s_tok, t_tok = pair
    page, summary = span_page(TEXT, s_tok, t_tok, max_spans=3)  # subsampled: gaps between the spans kept
    assert summary["spans"] == 3 and summary["uncovered_characters"] > 0
    assert 'class="gap" title="no span covers these characters"' in page
    page, summary = span_page(TEXT, s_tok, t_tok, response_start=3)
    assert 'class="ctx" title="context (before the response start)"' in page


def test_cli_writes_the_page(llama_lm, gpt2_lm, tmp_path, capsys):
    out = tmp_path / "spans.html"
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    assert main(["align", "--student", str(llama_lm), "--teacher", str(gpt2_lm), "--text-file", str(text_file),
                 "--html", str(out), "--attention"]) == 0
    assert "SRA weight" in out.read_text(encoding="utf-8") and str(out) in capsys.readouterr().out
    assert main(["align", "--student", str(llama_lm), "--teacher", str(gpt2_lm), "--html", str(out)]) == 2


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (CI installs Debian's chromium where it can)")
def test_a_real_browser_renders_the_spans(pair, tmp_path):
    from matplotlib.image import imread

    s_tok, t_tok = pair
    page, summary = span_page(TEXT, s_tok, t_tok, shared=shared_vocab(s_tok, t_tok, cache_dir=tmp_path))
    path = write_span_page(tmp_path / "spans.html", page)
    base = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    drawn = re.search(r'data-spans-drawn="(\d+)"', dom)
    assert drawn, dom[:500]
    assert int(drawn.group(1)) == summary["spans"]  # every span box was laid out with a size
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1100,900", path.as_uri()], capture_output=True,
                   timeout=120)
    img = imread(shot)
    assert img.shape[0] == 900 and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20  # not a blank page
