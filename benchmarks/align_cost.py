"""Cost of span alignment against tokenisation itself, on real tokenizer pairs.

For each row of a MiniLLM JSONL file: both tokenizers encode prompt + response with offsets
(the collator's work), then the spans are computed. Reported: total seconds of each, and
alignment as a percentage of tokenisation. Writes benchmarks/results/align-cost-<time>.json.

    python benchmarks/align_cost.py [--rows 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmdistill import models  # noqa: E402
from lmdistill.align.spans import align_offsets, encode_with_offsets  # noqa: E402
from lmdistill.config import resolve_data_path  # noqa: E402
from lmdistill.data.readers import read_instructions  # noqa: E402
from lmdistill.report.records import environment  # noqa: E402

PAIRS = [("pkg:smollm2-135m-instruct", "pkg:gemma-3-270m")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--data", default="minillm_eval/dolly/valid.jsonl")
    args = ap.parse_args()
    rows = read_instructions(resolve_data_path(args.data), args.rows)
    out = {**environment(), "rows": len(rows), "data": args.data, "pairs": []}
    for s_ref, t_ref in PAIRS:
        s_tok, t_tok = models.load_tokenizer(s_ref), models.load_tokenizer(t_ref)
        enc, tok_s, al_s, spans = [], 0.0, 0.0, 0
        for r in rows:
            text = r.prompt + r.response
            t0 = time.perf_counter()
            s = encode_with_offsets(s_tok, text)
            t = encode_with_offsets(t_tok, text)
            t1 = time.perf_counter()
            al = align_offsets(s[1], t[1], len(r.prompt), len(text), s[2], t[2])
            t2 = time.perf_counter()
            tok_s += t1 - t0
            al_s += t2 - t1
            spans += len(al)
            enc.append(al.stats["ratio"])
        res = {"student": s_ref, "teacher": t_ref, "tokenise_s": round(tok_s, 4), "align_s": round(al_s, 4),
               "align_pct_of_tokenise": round(100 * al_s / tok_s, 2), "mean_spans": round(spans / len(rows), 1),
               "mean_ratio": round(sum(enc) / len(enc), 4)}
        out["pairs"].append(res)
        print(json.dumps(res))
    path = ROOT / "benchmarks" / "results" / f"align-cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
