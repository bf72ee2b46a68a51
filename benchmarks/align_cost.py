"""Cost of span alignment against tokenisation itself, on real tokenizer pairs.

Rows of a MiniLLM JSONL file are taken in batches, as the training collator takes them: both
tokenizers encode prompt + response with offsets (one call per batch and tokenizer, labels
included), then one ``align_batch`` call computes the spans of the whole batch, once per backend (the
compiled merge pass, and the numpy path used without numba). Reported: total seconds of each,
and alignment as a percentage of tokenisation, per batch size and backend. Writes
benchmarks/results/align-cost-<time>.json.

    python benchmarks/align_cost.py [--rows 512] [--batch-sizes 1,4,8,32] [--max-lengths 256,8192]
                                    [--backends compiled,numpy]
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
from lmdistill.align.spans import align_batch  # noqa: E402
from lmdistill.config import resolve_data_path  # noqa: E402
from lmdistill.data.collate import encode_batch  # noqa: E402
from lmdistill.data.readers import read_instructions  # noqa: E402
from lmdistill.report.records import environment  # noqa: E402

PAIRS = [("pkg:smollm2-135m-instruct", "pkg:gemma-3-270m")]


def measure(rows, s_tok, t_tok, batch: int, max_length: int, backends: list[str]) -> dict:
    tok_s, al_s = 0.0, dict.fromkeys(backends, 0.0)
    spans, ratios = 0, []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts, responses = [r.prompt for r in chunk], [r.response for r in chunk]
        t0 = time.perf_counter()
        s = encode_batch(s_tok, prompts, responses, max_length)
        t = encode_batch(t_tok, prompts, responses, max_length)
        tok_s += time.perf_counter() - t0
        args = ([e[2] for e in s], [e[2] for e in t], [len(p) for p in prompts],
                [len(p) + len(r) for p, r in zip(prompts, responses)], [e[3] for e in s], [e[3] for e in t])
        # backends take turns going first after the tokenizers (the first one meets colder caches)
        for backend in backends[(i // batch) % len(backends):] + backends[:(i // batch) % len(backends)]:
            t1 = time.perf_counter()
            al = align_batch(*args, backend=backend)
            al_s[backend] += time.perf_counter() - t1
        spans += int(al.mask.sum())
        ratios += [st["ratio"] for st in al.stats]
    out = {"batch_size": batch, "tokenise_s": round(tok_s, 4)}
    for backend in backends:
        out[f"align_{backend}_s"] = round(al_s[backend], 4)
        out[f"align_{backend}_pct_of_tokenise"] = round(100 * al_s[backend] / tok_s, 2)
    return {**out, "mean_spans": round(spans / len(rows), 1), "mean_ratio": round(sum(ratios) / len(ratios), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--data", default="minillm_eval/dolly/valid.jsonl")
    ap.add_argument("--batch-sizes", default="1,4,8,32")
    ap.add_argument("--max-lengths", default="256,8192",
                    help="truncation lengths: the SRA config's 256, and 8192 (no Dolly row is cut)")
    ap.add_argument("--backends", default="compiled,numpy", help="alignment backends to time (align_batch's backend)")
    args = ap.parse_args()
    backends = args.backends.split(",")
    rows = read_instructions(resolve_data_path(args.data), args.rows)
    out = {**environment(), "rows": len(rows), "data": args.data, "pairs": []}
    for s_ref, t_ref in PAIRS:
        s_tok, t_tok = models.load_tokenizer(s_ref), models.load_tokenizer(t_ref)
        measure(rows[:32], s_tok, t_tok, 8, 256, backends)  # warm-up (and numba's compilation)
        for max_length in (int(m) for m in args.max_lengths.split(",")):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                res = {"student": s_ref, "teacher": t_ref, "max_length": max_length,
                       **measure(rows, s_tok, t_tok, batch, max_length, backends)}
                out["pairs"].append(res)
                print(json.dumps(res))
    path = ROOT / "benchmarks" / "results" / f"align-cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
