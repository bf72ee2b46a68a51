"""Cross-tokenizer LM quality benchmark: SRA against every LM baseline and its ablations.

Teacher Gemma-3-270M fine-tuned on Dolly (``lmdistill sft configs/sft-gemma270m-dolly.yaml``,
cached in runs/ and not counted in the time) -> student SmolLM2-135M-Instruct; equal steps
for all; ROUGE-L and bits per byte on Dolly valid and S-NI.

Presets:
  cpu   under 75 minutes on 2 CPU cores: 40 steps of 4 x 192 tokens (lr 5e-5 rather than the
        config's 2e-5, so that 40 steps move the student at all), the first 50 rows of
        each evaluation set, greedy decoding, 64 new tokens, one seed.
  cpu2  the protocol being rebuilt (issue: a benchmark that can tell the methods apart): the
        student pruned to 15 of its 30 blocks, 384 tokens, 100 steps, bits per byte on 500 rows
        of Dolly valid and S-NI, ROUGE-L on 200 rows of each, greedy.
  full  the literature's protocol for a GPU: 1 epoch (or more) on Dolly, full evaluation sets,
        sampling at temperature 1 with seeds 10/20/30/40/50, 256 new tokens.

    python benchmarks/lm_quality.py --preset cpu [--eval name=path ...] [--only sra,sft] [--seeds 42,43] [--set k=v]

The fair search, then the seeds (every method the same way):
    python benchmarks/lm_quality.py --preset cpu2 --search-lr 1,3,10 --only sft,sra,...
        each method once (seed 42) at its learning rate x 1, 3 and 10, scored only by bits per
        byte on the 100 held-out training rows (data.holdout; never reported) ->
        benchmarks/results/lm-search-cpu2-<time>.json
    python benchmarks/lm_quality.py --preset cpu2 --settings-from benchmarks/results/lm-search-cpu2-*.json \
        --seeds 42,43,44
        each method at the learning rate that won its search, on the reported sets
With --set data.teacher_cache=auto every method that can train from a teacher cache does (the
cache is built on its first run and read by every learning rate and seed); DSKD, which cannot,
trains online; each run records where its teacher came from (teacher_source).
    python benchmarks/lm_quality.py --preset cpu2 --cache-cost 64 --settings-from benchmarks/results/lm-search-cpu2-*.json
        SRA online against SRA from a teacher cache of the top 64 (one seed, the held-out rows):
        what the cache costs in quality, its size per row and in all, and its build time
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmdistill.bench.quality import LM_VARIANTS, Variant, run_benchmark  # noqa: E402

CONFIG = ROOT / "configs" / "sra-gemma270m-to-smollm2.yaml"
PRESETS = {
    "cpu": ["train.max_steps=40", "train.batch_size=4", "train.grad_accum=1", "train.lr=5e-5", "data.max_length=192",
            "data.eval_limit=50", "eval.greedy=true", "eval.max_new_tokens=64", "eval.batch_size=10",
            "train.save_steps=0", "train.logging_steps=10"],
    # v2 (the protocol being rebuilt): the student pruned to every other block (the first and the
    # last kept), so that the teacher is clearly better; 384 tokens (3.6% of Dolly training
    # responses cut, prompt capped at half); bits per byte on 500 rows of each set, ROUGE-L on 200
    "cpu2": ["student_layers=[0,2,4,6,8,10,12,14,16,18,20,22,24,26,29]", "train.max_steps=100", "train.batch_size=4",
             "train.grad_accum=1", "train.lr=1e-4", "data.max_length=384", "data.holdout=100",
             "data.eval_limit=500", "eval.rouge_limit=200",
             "eval.greedy=true", "eval.max_new_tokens=64", "eval.batch_size=10", "train.save_steps=0",
             "train.logging_steps=10"],
    "full": ["train.epochs=3", "train.max_steps=-1", "data.max_length=512", "data.eval_limit=null",
             "eval.greedy=false", "eval.seeds=[10,20,30,40,50]", "eval.max_new_tokens=256", "train.bf16=true"],
}


def cache_variant(k: int) -> Variant:
    """SRA trained from a teacher cache of the top ``k`` span log-probabilities."""
    return Variant(f"sra: from a teacher cache of the top {k}",
                   ["method=sra", "data.teacher_cache=auto", f"data.teacher_top_k={k}"], group="ablation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--eval", action="append", default=[], help="extra evaluation file: name=path (MiniLLM JSONL)")
    ap.add_argument("--only", default=None)
    ap.add_argument("--seeds", default="42", help="comma-separated training seeds (default 42; more seeds: e.g. 43,44)")
    ap.add_argument("--teacher", default=None, help="teacher folder (default: the config's fine-tuned teacher)")
    ap.add_argument("--keep-students", default=None, help="keep every trained student folder under this folder")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-lm"))
    ap.add_argument("--set", action="append", default=[], help="a further config override, key=value (recorded)")
    ap.add_argument("--search-lr", default=None,
                    help="search instead: comma-separated factors of each method's learning rate (e.g. 1,3,10), "
                         "scored on the held-out rows only")
    ap.add_argument("--settings-from", nargs="+", default=None,
                    help="search records: each method runs at the learning rate that won its search")
    ap.add_argument("--cache-cost", default=None,
                    help="comma-separated top-k values: SRA online against SRA from a teacher cache of each top k, at "
                         "SRA's chosen setting (--settings-from), on the held-out rows -> lm-cache-<preset>-<time>.json")
    args = ap.parse_args()
    overrides = list(PRESETS[args.preset]) + list(args.set)
    variants, name = LM_VARIANTS, None
    if args.cache_cost:  # what training from the cache costs in quality, against the online teacher
        variants = [Variant("sra", ["method=sra"])] + [cache_variant(int(k)) for k in args.cache_cost.split(",")]
        overrides.append("data.eval={}")
        name = f"lm-cache-{args.preset}"
    search = [float(x) for x in args.search_lr.split(",")] if args.search_lr else None
    if search:
        overrides.append("data.eval={}")  # the search sees only the held-out rows
    settings = None
    if args.settings_from:
        import json

        from lmdistill.bench.quality import current_names, select

        settings = {name: s["chosen"] for name, s in
                    select([current_names(json.loads(Path(f).read_text())) for f in args.settings_from]).items()}
    if args.teacher:
        overrides.append(f"teacher={args.teacher}")
    if args.eval and not search:
        from lmdistill.config import load_config

        evals = dict(load_config(CONFIG).data.eval)
        evals.update(dict(item.partition("=")[::2] for item in args.eval))
        overrides.append("data.eval={" + ", ".join(f"{k}: {v}" for k, v in evals.items()) + "}")
    only = args.only.split(",") if args.only else None
    seeds = [int(x) for x in args.seeds.split(",")]
    seeds = seeds[:1] if args.cache_cost else seeds
    out = run_benchmark("lm", str(CONFIG), args.preset, variants, seeds, overrides, ROOT / "benchmarks" / "results",
                        Path(args.work_dir), only, keep_students=Path(args.keep_students) if args.keep_students else None,
                        search_lr=search, settings=settings,
                        settings_from=[Path(f).name for f in args.settings_from or []], name=name)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
