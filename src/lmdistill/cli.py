"""The ``lmdistill`` command: train, cache, eval, align, sft, bench, demo.

Errors a user can fix print one line on stderr (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lmdistill.errors import LmdistillError


def _json_out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _quiet_libraries() -> None:
    """Keep stdout for results: library chatter goes to stderr or is silenced."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # the libraries' deprecation notices are for us, not for users; every other warning shows
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|sentence_transformers|torch|peft|"
                                r"accelerate|datasets|mteb)(\.|$)")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def cmd_train(args) -> int:
    from lmdistill.config import load_config

    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if cfg.task == "embedding":
        from lmdistill.train.embedding import run_embedding

        metrics = run_embedding(cfg)
    else:
        from lmdistill.train.lm import run_lm

        metrics = run_lm(cfg)
    if "rank" in metrics:  # a non-main process of a distributed run
        return 0
    summary = {k: metrics[k] for k in ("method", "steps", "seconds_per_step", "before", "after", "teacher_scores",
                                       "student_dir") if k in metrics}
    print(json.dumps(summary, indent=2))
    print(f"metrics: {Path(cfg.output_dir) / 'metrics.json'}", file=sys.stderr)
    return 0


def cmd_cache(args) -> int:
    from lmdistill.config import load_config
    from lmdistill.train.embedding import teacher_cache, training_sentences

    cfg = load_config(args.config, list(args.overrides))
    if cfg.task == "lm":
        from lmdistill.train.lm_cache import build_lm_teacher_cache

        if cfg.data.teacher_cache is None:
            cfg.data.teacher_cache = "auto"
        folder = build_lm_teacher_cache(cfg)
        m = json.loads((folder / "manifest.json").read_text())
        print(f"teacher cache ready: {folder} ({m['rows']} rows, {m['bytes'] / 2**20:.1f} MB, "
              f"{m['bytes'] / max(m['rows'], 1) / 1024:.0f} KB per row); train from it with data.teacher_cache="
              f"{'auto' if cfg.data.teacher_cache == 'auto' else folder}")
        return 0
    sentences = training_sentences(cfg)
    emb = teacher_cache(cfg, sentences)
    print(f"teacher cache ready: {emb.shape[0]} sentences x {emb.shape[1]} dims")
    return 0


def cmd_eval_sts(args) -> int:
    from lmdistill.config import resolve_data_path
    from lmdistill.data.readers import read_sts
    from lmdistill.eval.sts import sts_spearman
    from lmdistill.models import load_sentence_model

    pairs = read_sts(resolve_data_path(args.data))
    model = load_sentence_model(args.model, trust_remote_code=args.trust_remote_code)
    res = sts_spearman(model, pairs, args.batch_size, progress=True)
    if args.json:
        _json_out(res)
    else:
        print(f"STS Spearman {res['spearman']:.2f} on {res['n']} pairs")
    return 0


def cmd_eval_mteb(args) -> int:
    from lmdistill.config import resolve_data_path
    from lmdistill.eval.mteb_local import mteb_sts
    from lmdistill.models import load_sentence_model

    model = load_sentence_model(args.model, trust_remote_code=args.trust_remote_code)
    res = mteb_sts(model, resolve_data_path(args.data), args.task)
    _json_out(res) if args.json else print(f"MTEB {res['task']} cosine Spearman {res['spearman']:.2f} ({res['n']} pairs)")
    return 0


def cmd_eval_rouge(args) -> int:
    from lmdistill.config import resolve_data_path
    from lmdistill.eval.generation import rouge_eval

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [10]
    res = rouge_eval(args.model, resolve_data_path(args.data), max_new_tokens=args.max_new_tokens, seeds=seeds,
                     greedy=args.greedy, limit=args.limit, batch_size=args.batch_size,
                     trust_remote_code=args.trust_remote_code)
    if args.json:
        _json_out(res)
    else:
        print(f"ROUGE-L {res['rougeL']:.2f} (per seed {res['per_seed']}) on {res['n']} rows")
    return 0


def cmd_eval_bpb(args) -> int:
    from lmdistill.config import resolve_data_path
    from lmdistill.eval.bpb import bpb_eval

    res = bpb_eval(args.model, resolve_data_path(args.data), limit=args.limit, batch_size=args.batch_size,
                   trust_remote_code=args.trust_remote_code)
    if args.json:
        _json_out(res)
    else:
        print(f"bits per byte {res['bpb']:.4f} (pooled {res['bpb_pooled']:.4f}) on {res['n']} rows")
    return 0


def cmd_align(args) -> int:
    from lmdistill.align.spans import align_text
    from lmdistill.models import load_tokenizer

    s_tok = load_tokenizer(args.student, trust_remote_code=args.trust_remote_code)
    t_tok = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
    if args.text_file:
        args.text = Path(args.text_file).read_text(encoding="utf-8")
    if args.text is None:
        raise LmdistillError("give the text to align: --text '...' or --text-file FILE")
    if args.html:
        return _align_html(args, s_tok, t_tok)
    res = align_text(args.text, s_tok, t_tok, response_start=args.response_start, max_spans=args.max_spans)
    if args.json:
        _json_out(res)
    else:
        for sp in res["spans"]:
            a, b = sp["chars"]
            print(f"{a:5d}-{b:<5d} {args.text[a:b]!r:30} student {sp['student']} teacher {sp['teacher']}")
        print(json.dumps(res["stats"]))
    return 0


def _align_html(args, s_tok, t_tok) -> int:
    from lmdistill import models
    from lmdistill.align.viewer import span_page, write_span_page
    from lmdistill.align.vocab import shared_vocab

    shared = shared_vocab(s_tok, t_tok, args.vocab_match, models.cache_root(None))
    teacher = None
    if args.attention:
        teacher = models.load_causal_lm(args.teacher, None, args.trust_remote_code).eval()
    page, summary = span_page(args.text, s_tok, t_tok, response_start=args.response_start, max_spans=args.max_spans,
                              shared=shared, teacher_model=teacher, names=(args.student, args.teacher))
    path = write_span_page(args.html, page)
    print(json.dumps(summary))
    print(f"spans page: {path}")
    return 0


def cmd_sft(args) -> int:
    from lmdistill.config import load_config
    from lmdistill.train.lm import run_lm

    cfg = load_config(args.config, list(args.overrides) + ["method=sft"])
    metrics = run_lm(cfg, teacher_needed=False)
    print(json.dumps({k: metrics.get(k) for k in ("steps", "seconds_per_step", "after", "student_dir")}, indent=2))
    return 0


def cmd_bench_speed(args) -> int:
    from lmdistill.bench.speed import speed_benchmark

    methods = args.methods.split(",") if args.methods else None
    res = speed_benchmark(args.pair, methods=methods, steps=args.steps, preset=args.preset, overrides=args.set,
                          rounds=args.rounds, paired=args.paired)
    if args.json:
        _json_out(res)
    else:
        f = res["floor"]
        print(f"floor: {f['s_per_step']:.3f} s/step, {f['peak_mb']:.0f} MB")
        for name, r in res["methods"].items():
            print(f"{name:14s} {r['s_per_step']:.3f} s/step  {r['peak_mb']:.0f} MB  x{r['ratio']:.2f}")
    return 0


def cmd_report(args) -> int:
    from lmdistill.report.curves import plot_run

    path, terms = plot_run(args.run_dir, args.output)
    print(f"loss curves ({', '.join(terms)}): {path}")
    return 0


def cmd_demo(args) -> int:
    from lmdistill.demo import run_demo

    run_demo(output_dir=args.output_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lmdistill`` command."""
    p = argparse.ArgumentParser(prog="lmdistill", description="Distil language models into smaller ones.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student with a config")
    t.add_argument("config", help="a YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10 output_dir=runs/x")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("cache", help="run the teacher once into a cache: embeddings (embedding configs) or the "
                                     "method's targets (LM configs; train from it with data.teacher_cache=auto)")
    c.add_argument("config", help="a config: embedding, or LM with a method that can train from a cache")
    c.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    c.set_defaults(func=cmd_cache)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="metric", required=True)
    for name, func, helptext, batch in (
        ("sts", cmd_eval_sts, "STS cosine Spearman", 64),
        ("mteb", cmd_eval_mteb, "STS through MTEB on a local file", 64),
        ("rouge", cmd_eval_rouge, "generation ROUGE-L on an instruction JSONL file", 8),
        ("bpb", cmd_eval_bpb, "bits per byte of the reference responses", 8),
    ):
        s = esub.add_parser(name, help=helptext)
        s.add_argument("--model", required=True, help="a model folder, hub name or pkg: name")
        s.add_argument("--data", required=True, help="the evaluation file (STS TSV/CSV or MiniLLM JSONL)")
        s.add_argument("--batch-size", type=int, default=batch, help=f"rows per forward (default {batch})")
        s.add_argument("--json", action="store_true", help="print the result as JSON")
        s.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (hub models)")
        if name == "mteb":
            s.add_argument("--task", default="STSBenchmark", help="the MTEB task whose format the file has")
        if name in ("rouge", "bpb"):
            s.add_argument("--limit", type=int, default=None, help="the first N rows only")
        if name == "rouge":
            s.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per row")
            s.add_argument("--seeds", default="10", help="comma-separated sampling seeds (averaged)")
            s.add_argument("--greedy", action="store_true", help="greedy decoding (then one pass, whatever the seeds)")
        s.set_defaults(func=func)

    a = sub.add_parser("align", help="spans shared by two tokenizations of a text")
    a.add_argument("--student", required=True, help="the student's model or tokenizer (folder, hub name, pkg:)")
    a.add_argument("--teacher", required=True, help="the teacher's model or tokenizer")
    a.add_argument("--text", default=None, help="the text to cut into shared spans")
    a.add_argument("--text-file", default=None, help="read the text from this file instead")
    a.add_argument("--html", default=None, metavar="FILE",
                   help="write a self-contained page: the text as its spans, each span's tokens side by side, "
                        "uncovered characters marked, shared-vocabulary status")
    a.add_argument("--attention", action="store_true",
                   help="with --html: --teacher is a model; show each span's attention mass (its SRA weight)")
    a.add_argument("--vocab-match", default="normalised", choices=["normalised", "exact"],
                   help="shared-vocabulary rule for --html (as method_args.vocab_match)")
    a.add_argument("--response-start", type=int, default=0, help="character where the response starts")
    a.add_argument("--max-spans", type=int, default=1024, help="at most this many spans (as method_args.max_spans)")
    a.add_argument("--json", action="store_true", help="print the spans as JSON")
    a.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizers' own code")
    a.set_defaults(func=cmd_align)

    s = sub.add_parser("sft", help="fine-tune a causal LM (e.g. the teacher) on instruction data")
    s.add_argument("config", help="an LM config (see configs/sft-gemma270m-dolly.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    s.set_defaults(func=cmd_sft)

    r = sub.add_parser("report", help="a run's loss curves (every logged term) as a PNG next to its metrics.json")
    r.add_argument("run_dir", help="a run's output_dir (finished, or still training: its latest checkpoint)")
    r.add_argument("--output", default=None, help="PNG path (default RUN_DIR/loss_curves.png)")
    r.set_defaults(func=cmd_report)

    be = sub.add_parser("bench", help="benchmarks")
    bsub = be.add_subparsers(dest="bench", required=True)
    sp = bsub.add_parser("speed", help="seconds per step and peak memory of each method")
    sp.add_argument("--pair", choices=["lm", "embedding"], required=True, help="which teacher/student pair")
    sp.add_argument("--methods", default=None, help="comma-separated methods (default all of the pair's)")
    sp.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
    sp.add_argument("--rounds", type=int, default=1,
                    help="time every row this many times, in alternating order; ratios within a round, then the median")
    sp.add_argument("--paired", action="store_true",
                    help="also time every row in one process (all in memory at once), steps in turn: per-step ratios "
                         "to the floor")
    sp.add_argument("--preset", choices=["cpu"], default="cpu", help="batch and length preset")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set teacher=my/teacher --set student=my/student")
    sp.add_argument("--json", action="store_true", help="print the result as JSON")
    sp.set_defaults(func=cmd_bench_speed)

    d = sub.add_parser("demo", help="TALAS on the bundled models and data: the student before and after")
    d.add_argument("--output-dir", default="runs/demo", help="where the demo's student and metrics go")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lmdistill`` command, callable from Python: returns the exit code."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except LmdistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        _close_distributed()


def run() -> None:
    """The ``lmdistill`` console command and ``python -m lmdistill``: ``main``, then ``finish``."""
    finish(main())


def finish(rc: int = 0) -> None:
    """End the process as the command does; a script that trains under torchrun ends with it too.

    The process group is closed; then a replica of a distributed launch (torchrun sets
    WORLD_SIZE) ends at once, skipping the interpreter's shutdown: even with its process group
    destroyed, a replica on a loaded machine still aborted now and then during that shutdown
    (SIGABRT with no Python frame left), after its work and metrics were written, and torchrun then
    failed the whole job. ``main`` itself never ends the process, so it stays safe to call from Python.
    """
    _close_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now(rc)
    sys.exit(rc)


def _exit_now(rc: int) -> None:
    """Flush the logs and streams, then end the process with ``rc`` without finalising the interpreter."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _close_distributed() -> None:
    """Tear the process group down before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can be destroyed while still joinable,
    which aborts a replica (SIGABRT, "terminate called without an active exception") after
    its work is done and fails the whole torchrun job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    run()
