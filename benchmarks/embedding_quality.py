"""Embedding quality benchmark: TALAS against every embedding baseline and its ablations.

Teacher all-mpnet-base-v2 -> student all-MiniLM-L6-v2 cut to layers 0, 2, 4; the demo's
training sentences; equal steps for all; STS-B test and SICK-R test Spearman; 3 seeds.

Presets:
  cpu   fits in under 75 minutes on 2 CPU cores: 2000 training sentences, 80 steps of 32,
        STS-B test (all 1379 pairs) and the first 1500 pairs of SICK-R test.
  demo  the demo's budget (`make demo`): its 8000 training sentences, 3 epochs of 32 (750 steps),
        the cpu preset's evaluation sets; each method at the setting its cpu-preset search chose.
  full  the whole protocol for a GPU: all training sentences, 2 epochs, full test sets.

    python benchmarks/embedding_quality.py --preset cpu [--eval name=path ...] [--only talas,rkd]

The fair search, then the seeds (every method the same way):
    python benchmarks/embedding_quality.py --preset cpu --search-lr 0.5,1,2 --search-init normal,xavier
        each method once (the first seed) at its learning rate x each factor, crossed with each
        projector initialisation where it has projectors; scored only on STS-B dev (never
        reported) -> benchmarks/results/embedding-search-cpu-<time>.json
    python benchmarks/embedding_quality.py --preset cpu --settings-from benchmarks/results/embedding-search-cpu-*.json
        each method at the setting that won its search, on STS-B test and SICK-R test
TALAS's own knobs (rho, eta, clipping, start_layer: the "knob" variants) run only
when named, at TALAS's chosen setting, on the same dev split:
    python benchmarks/embedding_quality.py --preset cpu --search-lr 1 --set train.lr=<chosen> \
        --only "talas,talas: rho 0.2,talas: rho 0.5,..."
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmdistill.bench.quality import EMBEDDING_VARIANTS, run_benchmark  # noqa: E402
from lmdistill.config import load_config, resolve_data_path  # noqa: E402
from lmdistill.data.readers import read_sts  # noqa: E402

CONFIG = ROOT / "configs" / "talas-mpnet-to-minilm-l3.yaml"
DEV = "stsb/stsb-en-dev.csv"  # the selection split: never reported
PRESETS = {
    "cpu": {"overrides": ["data.max_examples=2000", "train.max_steps=80", "train.batch_size=32", "train.save_steps=0",
                          "train.logging_steps=20"], "sick_pairs": 1500, "seeds": [0, 1, 2]},
    "demo": {"overrides": ["data.max_examples=8000", "train.epochs=3", "train.max_steps=-1", "train.batch_size=32",
                           "train.save_steps=0", "train.logging_steps=50"], "sick_pairs": 1500, "seeds": [0, 1, 2]},
    "full": {"overrides": ["data.max_examples=null", "train.epochs=2", "train.max_steps=-1", "train.batch_size=64",
                           "train.save_steps=500"], "sick_pairs": None, "seeds": [0, 1, 2]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--eval", action="append", default=[], help="extra evaluation file: name=path (any STS format)")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--keep-students", default=None, help="keep every trained student folder under this folder")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-embedding"))
    ap.add_argument("--set", action="append", default=[], help="a further config override, key=value (recorded)")
    ap.add_argument("--search-lr", default=None, help="search instead: comma-separated factors of each method's lr")
    ap.add_argument("--search-init", default=None, help="with --search-lr: projector inits to try (e.g. normal,xavier)")
    ap.add_argument("--settings-from", nargs="+", default=None,
                    help="search records: each method runs at the setting that won its search")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(CONFIG, p["overrides"])
    evals = dict(cfg.data.eval)
    if p["sick_pairs"]:
        pairs = read_sts(resolve_data_path(evals["sickr_test"], cfg))[: p["sick_pairs"]]
        sub = work / f"sickr_test_first{p['sick_pairs']}.tsv"
        sub.write_text("".join(f"{q.score}\t{q.s1}\t{q.s2}\n" for q in pairs))
        evals["sickr_test"] = str(sub)
    for item in args.eval:
        name, _, path = item.partition("=")
        evals[name] = path
    search = [float(x) for x in args.search_lr.split(",")] if args.search_lr else None
    if search:  # the search sees only the dev split
        evals = {"stsb_dev": DEV}
    ev = "{" + ", ".join(f"{k}: {v}" for k, v in evals.items()) + "}"
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else p["seeds"]
    only = args.only.split(",") if args.only else None
    settings = None
    if args.settings_from:
        import json

        from lmdistill.bench.quality import select

        settings = {name: c["chosen"] for name, c in select([json.loads(Path(f).read_text()) for f in args.settings_from],
                                                            on="stsb_dev", metric=None, higher_is_better=True).items()}
    out = run_benchmark("embedding", str(CONFIG), args.preset, EMBEDDING_VARIANTS, seeds,
                        p["overrides"] + list(args.set) + [f"data.eval={ev}"], ROOT / "benchmarks" / "results", work,
                        only, keep_students=Path(args.keep_students) if args.keep_students else None,
                        search_lr=search, search_inits=args.search_init.split(",") if args.search_init else None,
                        settings=settings, settings_from=[Path(f).name for f in args.settings_from or []],
                        selection="highest Spearman on STS-B dev")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
