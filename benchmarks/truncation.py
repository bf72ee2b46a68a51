"""How many responses a max_length cuts, through the collator's own encoding (prompt capped at
``data.prompt_max_fraction`` of max_length, no EOS on a cut response), for both tokenizers of
the LM pair. Writes ``benchmarks/results/truncation-<time>.json``.

    python benchmarks/truncation.py [--lengths 192,256,384,512]
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
from lmdistill.config import data_dir  # noqa: E402
from lmdistill.data.collate import encode_batch  # noqa: E402
from lmdistill.data.readers import read_instructions  # noqa: E402
from lmdistill.report.records import environment  # noqa: E402

FILES = {"dolly_train": "minillm_eval/dolly/dev.jsonl", "dolly_valid": "minillm_eval/dolly/valid.jsonl",
         "sni": "minillm_eval/sinst/11_/valid.jsonl"}
TOKENIZERS = {"smollm2": "pkg:smollm2-135m-instruct", "gemma3": "pkg:gemma-3-270m"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="192,256,384,512")
    ap.add_argument("--prompt-max-fraction", type=float, default=0.5)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    root = data_dir()
    record = {"kind": "truncation", "prompt_max_fraction": args.prompt_max_fraction, **environment(), "shares": {}}
    for tname, ref in TOKENIZERS.items():
        tok = models.load_tokenizer(ref)
        for fname, rel in FILES.items():
            rows = read_instructions(root / rel)
            prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
            for L in lengths:
                enc = encode_batch(tok, prompts, responses, L, args.prompt_max_fraction)
                cut = sum(1 for ids, labels, _, _ in enc if tok.eos_token_id not in labels)
                empty = sum(1 for ids, labels, _, _ in enc if all(x == -100 for x in labels))
                record["shares"][f"{tname}/{fname}/{L}"] = {"rows": len(rows), "cut": round(100 * cut / len(rows), 2),
                                                           "no_response": round(100 * empty / len(rows), 2)}
                print(f"{tname:8s} {fname:12s} {L:4d}: {100 * cut / len(rows):5.1f}% of responses cut, "
                      f"{100 * empty / len(rows):4.1f}% with no response token", flush=True)
    out = ROOT / "benchmarks" / "results" / f"truncation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
