"""One text laid out as its shared spans, as a self-contained HTML page (``lmdistill align --html``).

Silent misalignment (unicode, whitespace, BOS) is the usual failure of cross-tokenizer
distillation, and it cannot be seen in a loss curve. The page shows, for one text:

* the text with each span boxed, and every character that no span covers marked;
* per span, its characters and the student's and the teacher's tokens as the tokenizers
  hold them (``Ġ``/``▁`` markers, byte-fallback pieces), side by side;
* each token's shared-vocabulary status (paired with a token of the other side, byte
  fallback, special, or not shared): the span logit term only sees paired tokens;
* given the teacher model, each span's attention mass, which is its weight in SRA
  (the final layer's attention row at the last text token, as training computes it).

No script, font or style is fetched: the page works offline.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from lmdistill.align.spans import align_offsets, encode_with_offsets
from lmdistill.align.vocab import is_byte_fallback

VISIBLE = {" ": "·", "\n": "↵\n", "\t": "→", "\r": "␍"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; } h2 { font-size: 1.05em; margin-top: 1.5em; }
.text { font-family: monospace; font-size: 15px; line-height: 2.1; white-space: pre-wrap; word-break: break-all;
        border: 1px solid #ccc; padding: .6em; }
.span { border: 1px solid #4a7; border-radius: 3px; padding: 1px 0; }
.span.odd { background: #e6f4ea; } .span.even { background: #e8eefc; border-color: #47a; }
.gap { background: #f8c8c8; color: #900; outline: 1px dashed #c00; }
.ws { color: #999; }
table { border-collapse: collapse; font-size: 13px; margin-top: .5em; }
td, th { border: 1px solid #ddd; padding: 2px 6px; vertical-align: top; text-align: left; }
td.num { text-align: right; font-family: monospace; }
.tok { font-family: monospace; display: inline-block; margin: 1px; padding: 0 3px; border-radius: 3px;
       background: #eee; white-space: pre; }
.tok.shared { background: #d7f0d7; } .tok.unshared { background: #f3e3c2; }
.tok.fallback { background: #f5c6c6; } .tok.special { background: #ddd; color: #666; font-style: italic; }
.bar { display: inline-block; height: 10px; background: #d95; vertical-align: middle; }
.legend span { margin-right: 1em; }
"""

# marks, after layout, how many span boxes the browser drew with a size (tests read it from the DOM)
LAYOUT_PROBE = """
<script>
addEventListener("load", () => {
  const drawn = [...document.querySelectorAll(".text .span")].filter(e => {
    const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; }).length;
  document.body.dataset.spansDrawn = drawn;
});
</script>
"""


def _show(s: str, inline: bool = False) -> str:
    """Text with whitespace made visible, escaped for HTML (``inline``: a newline does not break the line)."""
    out = []
    for ch in s:
        if ch in VISIBLE:
            mark = VISIBLE[ch].rstrip("\n") if inline else VISIBLE[ch]
            out.append(f'<span class="ws">{html.escape(mark)}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def teacher_span_weights(model, tokenizer, text: str, spans_t: np.ndarray) -> np.ndarray:
    """SRA's span weights ``W_k`` for one text: the teacher's final-layer attention row at its
    last text token, summed over heads, normalised over the real tokens, summed per span,
    normalised over the spans (docs/methods.md 1.2-1.3)."""
    from lmdistill.methods.llm.base import num_layers
    from lmdistill.methods.llm.sra import span_matrix, span_weights, token_weights
    from lmdistill.models.attention import RowCapture

    ids, offsets, keep = encode_with_offsets(tokenizer, text)
    real = np.flatnonzero(keep & (offsets[:, 1] > offsets[:, 0]))
    layer = num_layers(model)
    capture = RowCapture(model, [layer])
    device = next(model.parameters()).device
    input_ids = torch.as_tensor(ids, device=device).unsqueeze(0)
    mask = torch.ones_like(input_ids)
    capture.prepare(mask, torch.tensor([int(real[-1]) if len(real) else len(ids) - 1], device=device))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask)
    rows = capture.rows()[layer]
    w = token_weights(rows, mask, "last_token")
    span_mask = torch.ones(1, len(spans_t), device=device)
    M = span_matrix(torch.as_tensor(spans_t, device=device).unsqueeze(0), span_mask, input_ids.size(1))
    mass = torch.bmm(M, w.unsqueeze(-1).float()).squeeze(-1)
    return span_weights(mass, span_mask).squeeze(0).cpu().numpy()


def span_page(text: str, student_tokenizer, teacher_tokenizer, *, response_start: int = 0, max_spans: int = 1024,
              shared: np.ndarray | None = None, teacher_model=None, names: tuple[str, str] = ("student", "teacher"),
              ) -> tuple[str, dict]:
    """``(html, summary)`` for one text. ``shared``: the ``[n, 2]`` shared-vocabulary pairs
    (student id, teacher id), for each token's status; ``teacher_model``: for SRA's span weights."""
    sides = {}
    for side, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        ids, offsets, keep = encode_with_offsets(tok, text)
        pieces = tok.convert_ids_to_tokens(ids.tolist())
        sides[side] = {"ids": ids, "offsets": offsets, "keep": keep, "pieces": pieces}
    al = align_offsets(sides["student"]["offsets"], sides["teacher"]["offsets"], response_start, len(text),
                       sides["student"]["keep"], sides["teacher"]["keep"], max_spans)
    paired = {"student": set(), "teacher": set()}
    if shared is not None:
        paired = {"student": set(shared[:, 0].tolist()), "teacher": set(shared[:, 1].tolist())}
    weights = teacher_span_weights(teacher_model, teacher_tokenizer, text, al.teacher) if teacher_model is not None \
        else None

    def token(side: str, i: int) -> str:
        s = sides[side]
        piece, tid = s["pieces"][i], int(s["ids"][i])
        if not s["keep"][i] or s["offsets"][i, 1] <= s["offsets"][i, 0]:
            kind, why = "special", "special or empty-offset token: in no span"
        elif is_byte_fallback(piece):
            kind, why = "fallback", "byte-fallback piece"
        elif shared is None:
            kind, why = "", ""
        elif tid in paired[side]:
            kind, why = "shared", "in the shared vocabulary"
        else:
            kind, why = "unshared", "not in the shared vocabulary"
        return f'<span class="tok {kind}" title="id {tid}: {html.escape(why)}">{_show(piece, inline=True)}</span>'

    covered = np.zeros(len(text), dtype=bool)
    for a, b in al.chars:
        covered[a:b] = True
    # the text: spans boxed, uncovered characters marked
    body, pos = [], 0
    for k, (a, b) in enumerate(al.chars.tolist()):
        if pos < a:
            body.append(_gap(text, pos, a, response_start))
        body.append(f'<span class="span {"odd" if k % 2 else "even"}" title="span {k}" id="s{k}">{_show(text[a:b])}</span>')
        pos = b
    if pos < len(text):
        body.append(_gap(text, pos, len(text), response_start))
    rows = []
    for k, ((a, b), (i, j), (t0, t1)) in enumerate(zip(al.chars.tolist(), al.student.tolist(), al.teacher.tolist())):
        w = ""
        if weights is not None:
            w = (f'<td class="num">{weights[k]:.3f}</td>'
                 f'<td><span class="bar" style="width:{max(1, round(300 * weights[k] / weights.max()))}px"></span></td>')
        s_toks = "".join(token("student", x) for x in range(i, j))
        t_toks = "".join(token("teacher", x) for x in range(t0, t1))
        rows.append(f'<tr><td class="num">{k}</td><td class="num">{a}-{b}</td>'
                    f'<td class="text-cell">{_show(text[a:b], inline=True)}</td><td>{s_toks}</td><td>{t_toks}</td>{w}</tr>')
    gaps = int((~covered[response_start:]).sum())
    summary = {"spans": len(al), "characters": len(text), "uncovered_characters": gaps,
               "uncovered_before_response": int(response_start), **al.stats}
    if shared is not None:
        for side in ("student", "teacher"):
            s = sides[side]
            real = [int(x) for x, k in zip(s["ids"], s["keep"]) if k]
            summary[f"{side}_tokens_shared"] = f"{sum(x in paired[side] for x in real)}/{len(real)}"
    head = "".join(f"<th>{h}</th>" for h in
                   ["span", "chars", "text", f"{names[0]} tokens", f"{names[1]} tokens"]
                   + (["SRA weight", ""] if weights is not None else []))
    facts = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in summary.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lmdistill spans</title><style>{CSS}</style></head>
<body>
<h1>Shared spans: {html.escape(names[0])} / {html.escape(names[1])}</h1>
<ul>{facts}</ul>
<p class="legend"><span class="span even">span</span> <span class="gap">character in no span</span>
<span class="tok shared">shared token</span> <span class="tok unshared">not shared</span>
<span class="tok fallback">byte fallback</span> <span class="tok special">special</span>
(whitespace shown as · ↵ →)</p>
<div class="text">{"".join(body)}</div>
<h2>Spans</h2>
<table><tr>{head}</tr>{"".join(rows)}</table>
{LAYOUT_PROBE}
</body></html>
"""
    return page, summary


def _gap(text: str, a: int, b: int, response_start: int) -> str:
    if a < response_start < b:
        return _gap(text, a, response_start, response_start) + _gap(text, response_start, b, response_start)
    why = "context (before the response start)" if b <= response_start else "no span covers these characters"
    cls = "ctx" if b <= response_start else "gap"
    return f'<span class="{cls}" title="{why}">{_show(text[a:b])}</span>'


def write_span_page(path: str | Path, page: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
