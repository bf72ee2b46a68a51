"""Cost benchmark: seconds per step and peak memory of every method against its floor, for
both pairs, written to benchmarks/results/speed-<pair>-<time>.json.

    python benchmarks/speed.py [--pair lm|embedding|both] [--steps 10] [--rounds 3] [--methods sft,sra,sra+cache]

Every row is timed in each of ``--rounds`` rounds (a fresh process each time, the order reversed
every other round); a ratio is taken within its round and the record keeps the median and the
spread over rounds, so a machine that drifts during the run cannot make a method beat its floor.
With ``--paired`` every row is also set up in one process and the rows take their steps in turn:
each step's ratio to the floor's step of the same cycle, median and spread over the steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmdistill.bench.speed import speed_benchmark  # noqa: E402
from lmdistill.report.records import environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pair", choices=["lm", "embedding", "both"], default="both")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; ratios are medians over them")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--teacher", default=None, help="LM teacher override (cost does not depend on fine-tuning)")
    ap.add_argument("--methods", default=None, help="comma-separated rows (default: all of the pair's)")
    ap.add_argument("--paired", action="store_true",
                    help="also time every row in one process, steps in turn (per-step ratios; see speed_benchmark)")
    args = ap.parse_args()
    for pair in (["embedding", "lm"] if args.pair == "both" else [args.pair]):
        ov = [f"teacher={args.teacher}"] if (args.teacher and pair == "lm") else []
        methods = args.methods.split(",") if args.methods else None
        res = speed_benchmark(pair, methods, steps=args.steps, preset=args.preset, overrides=ov, rounds=args.rounds,
                              paired=args.paired)
        res.update(environment())
        res["overrides"] = ov
        res["selected"] = bool(methods)  # some rows only: a record of its own, beside the full table
        name = f"speed-rows-{pair}" if methods else f"speed-{pair}"
        out = ROOT / "benchmarks" / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(json.dumps({"floor": res["floor"], "methods": res["methods"]}, indent=1))
        print(f"results: {out}")


if __name__ == "__main__":
    main()
