"""Quality benchmarks: every method on the same teacher, student, data and budget, in one run.

A benchmark is a list of *variants* (a method with its options, or an ablation), each trained
once per seed with equal steps, then evaluated on every evaluation file. Results are written
to ``benchmarks/results/<kind>-<preset>-<time>.json`` after every run, so a stopped benchmark
keeps what it measured; ``report`` turns the JSON files into tables, plots and the README
section. Evaluation files are configurable (``--eval name=path``): any file of a supported
format is a new column, with no code change.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmdistill.config import load_config
from lmdistill.report.records import environment


@dataclass
class Variant:
    """One row of a benchmark table."""

    name: str
    overrides: list[str] = field(default_factory=list)
    kind: str = "train"  # train | student (untrained) | teacher
    group: str = "method"  # method | ablation | reference


# TALAS's specified task term and ASAM at every step, with the authors' code's no clipping: the
# three settings in which configs/talas-authors-mpnet-to-minilm-l3.yaml differs from the recipe
TALAS_AUTHORS = ["method_args.w_task=0.001", "train.asam_interval=1", "train.clip=none"]

EMBEDDING_VARIANTS = [
    Variant("teacher", kind="teacher", group="reference"),
    Variant("student (untrained)", kind="student", group="reference"),
    Variant("talas", ["method=talas"]),
    Variant("embed_kd (mse)", ["method=embed_kd", "method_args={loss: mse}", "train.optimizer=adamw"]),
    Variant("embed_kd (cosine)", ["method=embed_kd", "method_args={loss: cosine}", "train.optimizer=adamw"]),
    Variant("all_layer", ["method=all_layer", "method_args={}", "train.optimizer=adamw"]),
    Variant("rkd", ["method=rkd", "method_args={}", "train.optimizer=adamw"]),
    Variant("stella", ["method=stella", "method_args={}", "train.optimizer=adamw"]),
    Variant("talas: AdamW instead of ASAM", ["method=talas", "train.optimizer=adamw"], group="ablation"),
    Variant("talas: no layer-aligned term", ["method=talas", "method_args.w_lasd=0.0"], group="ablation"),
    Variant("talas: detach_upper", ["method=talas", "method_args.detach_upper=true"], group="ablation"),
    Variant("talas: K=1", ["method=talas", "method_args.k=1"], group="ablation"),
    Variant("talas: K=3", ["method=talas", "method_args.k=3"], group="ablation"),
    # the settings the shipped recipe changed (configs/talas-authors-mpnet-to-minilm-l3.yaml)
    Variant("talas: authors' settings", ["method=talas", *TALAS_AUTHORS], group="ablation"),
    # TALAS's own knobs, searched on the dev split at TALAS's chosen learning rate and init
    *[Variant(f"talas: rho {r}", ["method=talas", f"train.rho={r}"], group="knob") for r in (0.2, 0.5, 1.0)],
    Variant("talas: eta 0.1", ["method=talas", "train.eta=0.1"], group="knob"),
    *[Variant(f"talas: clip {c}", ["method=talas", f"train.clip={c}"], group="knob") for c in ("per_group", "none")],
    Variant("talas: start_layer 1", ["method=talas", "method_args.start_layer=1"], group="knob"),
    # (the knobs "no task term", "ASAM every 2nd step" and both, searched in
    # embedding-search-cpu-20261202-054417.json, are the recipe now: run as they were, they are TALAS)
]

# SRA as the authors' scripts run it (sonho4ng/SRAv4, mistral_tinyllama.sh): LoRA r 32, alpha 64,
# dropout 0.1 on q/k/v; lr 1e-3; three layer pairs two layers apart ending at the final layers;
# the hard-label weight 0.5. configs/sra-authors-gemma270m-to-smollm2.yaml is the same regime.
SRA_AUTHORS = {
    "lora": "{r: 32, lora_alpha: 64, lora_dropout: 0.1, target_modules: [q_proj, k_proj, v_proj]}",
    "lr": "1e-3",
    "method_args": {"n_pairs": 3, "pair_stride": 2, "alpha": 0.5, "logit_reduction": "sum"},
}

# SRA's span logit KL summed over spans, as the paper specifies it: the default until the dev split
# at 200 steps chose the mean over spans (README, "SRA's defaults")
SRA_SUMMED = "sra: span logit KL summed over spans (as specified)"

# DSKD as it ran before its teacher embeddings were divided by their own std (they were divided by
# the embedding table's std: 25 times too large for Gemma, whose module scales the rows by sqrt(d))
DSKD_BEFORE_FIX = "dskd: teacher embeddings 25x too large (before the fix; superseded)"

# Versions of the LM benchmark's variant names; a record carries the version it was written under
# ("variant_names", none before version 2) and ``current_names`` reads it under today's names.
# Version 2: "sra" is SRA at its defaults, now the averaged span logit KL; records before named the
# summed form "sra" and the averaged one "sra: span logit KL averaged over spans".
# Version 3: "dskd" is DSKD with its teacher embeddings at unit scale; earlier DSKD runs are kept
# under their own name (their numbers are not today's method's).
VARIANT_NAMES = 3
RENAMED = {
    2: {"sra": (SRA_SUMMED, "ablation"), "sra: span logit KL averaged over spans": ("sra", "method")},
    3: {"dskd": (DSKD_BEFORE_FIX, "superseded")},
}


def current_names(rec: dict) -> dict:
    """An LM quality or search record under today's variant names (a copy; newer records as they are)."""
    version = rec.get("variant_names", 1)
    if rec.get("kind") != "lm" or version >= VARIANT_NAMES:
        return rec
    rec = dict(rec, variant_names=VARIANT_NAMES, runs=list(rec.get("runs", [])))
    for v in range(version + 1, VARIANT_NAMES + 1):
        renamed = RENAMED[v]
        rec["runs"] = [dict(r, variant=renamed[r["variant"]][0], group=renamed[r["variant"]][1])
                       if r.get("variant") in renamed else r for r in rec["runs"]]
        if rec.get("settings"):
            rec["settings"] = {renamed.get(k, (k, None))[0]: s for k, s in rec["settings"].items()}
    return rec


LM_VARIANTS = [
    Variant("teacher (fine-tuned)", kind="teacher", group="reference"),
    Variant("student (undistilled)", kind="student", group="reference"),
    Variant("sra", ["method=sra"]),
    Variant("sft", ["method=sft", "method_args={}"]),
    Variant("uld", ["method=uld", "method_args={}"]),
    Variant("mined", ["method=mined", "method_args={}"]),
    Variant("dskd", ["method=dskd", "method_args={}", "train.projector_lr=1e-3"]),
    Variant("multilevel_ot", ["method=multilevel_ot", "method_args={}"]),
    Variant("sra: uniform token weights (mean pooling)", ["method=sra", "method_args.weighting=uniform"], group="ablation"),
    Variant("sra: uniform span weights", ["method=sra", "method_args.span_weighting=uniform"], group="ablation"),
    Variant("sra: no geometric term", ["method=sra", "method_args.lambda_geo=0.0"], group="ablation"),
    Variant("sra: no span logit term", ["method=sra", "method_args.w_logit=0.0"], group="ablation"),
    Variant(SRA_SUMMED, ["method=sra", "method_args.logit_reduction=sum"], group="ablation"),
    Variant("sra: authors' regime", ["method=sra", *[f"method_args.{k}={v}" for k, v in SRA_AUTHORS["method_args"].items()],
                                     f"train.lora={SRA_AUTHORS['lora']}", f"train.lr={SRA_AUTHORS['lr']}"],
            group="ablation"),
]


def _scores(metrics: dict, key: str) -> dict:
    return {name: res for name, res in metrics.get(key, {}).items()}


def lr_grid(config: str, overrides: list[str], variant: Variant, factors: list[float],
            inits: list[str] | None = None) -> list[dict[str, str]]:
    """The search points of one variant: its own learning rate (the preset's, or the variant's
    where it sets one, e.g. a LoRA regime) times each factor; with ``inits``, crossed with each
    projector initialisation where the method has projectors (``method_args.projector_init``).
    The same factors for every method, so every method gets the same search around its start."""
    from lmdistill.registry import get_method

    cfg = load_config(config, list(overrides) + variant.overrides)
    points = [{"train.lr": f"{cfg.train.lr * f:.3g}"} for f in factors]
    has_init = inits and "projector_init" in getattr(get_method(cfg.method, cfg.task).Options, "__dataclass_fields__", {})
    if has_init:
        points = [{**p, "method_args.projector_init": i} for p in points for i in inits]
    return points


def _score(run: dict, on: str, metric: str | None):
    if "error" in run:
        return None
    v = (run.get("scores") or {}).get(on)
    return v.get(metric) if isinstance(v, dict) else v


def select(records: list[dict], on: str = "holdout", metric: str | None = "bpb",
           higher_is_better: bool = False) -> dict[str, dict]:
    """Per variant, the best search point on the selection set ``on`` (never reported): the
    lowest bits per byte for the LM search, the highest Spearman (``metric=None``,
    ``higher_is_better``) for the embedding one. ``{"chosen": setting, "score": best,
    "tried": [[setting, score], ...]}``; failed points are listed with None."""
    tried: dict[str, list] = {}
    for rec in records:
        for r in rec["runs"]:
            tried.setdefault(r["variant"], []).append([r.get("setting", {}), _score(r, on, metric)])
    out = {}
    for name, pts in tried.items():
        ok = [p for p in pts if p[1] is not None]
        if ok:
            best = (max if higher_is_better else min)(ok, key=lambda p: p[1])
            out[name] = {"chosen": best[0], "score": best[1], "tried": pts}
    return out


def run_benchmark(kind: str, config: str, preset: str, variants: list[Variant], seeds: list[int],
                  overrides: list[str], results_dir: Path, work_dir: Path, only: list[str] | None = None,
                  keep_students: Path | None = None, search_lr: list[float] | None = None,
                  settings: dict[str, dict[str, str]] | None = None, settings_from: list[str] | None = None,
                  search_inits: list[str] | None = None,
                  selection: str = "lowest bits per byte on the held-out rows", name: str | None = None) -> Path:
    """Train and evaluate every variant for every seed; returns the result JSON's path.

    ``keep_students``: every trained student folder is kept there as ``<variant>-s<seed>``
    (plain transformers / sentence-transformers folders, for evaluations of one's own).
    ``search_lr``: a search instead: every trained variant once (the first seed) at each of
    ``lr_grid``'s points (``search_inits``: crossed with projector initialisations); the record
    is ``<kind>-search-<preset>-<time>.json`` and ``select`` reads the choice from it.
    ``settings``: per variant, the overrides chosen by a search (``settings_from`` names the
    search records, kept in the record). ``name``: the record's file name before its time stamp
    (default ``<kind>-<preset>``)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = name or (f"{kind}-search-{preset}" if search_lr else f"{kind}-{preset}")
    out_path = results_dir / f"{name}-{stamp}.json"
    record = {"kind": kind, "preset": preset, "config": config, "overrides": overrides, "seeds": seeds,
              **environment(), "runs": []}
    if kind == "lm":
        record["variant_names"] = VARIANT_NAMES
    if search_lr:
        record["search"] = {"lr_factors": search_lr, "projector_inits": search_inits, "selection": selection}
        if settings:  # the knobs of a search run at their base method's choice
            record["search"].update(knobs_at=settings, settings_from=settings_from or [])
    elif settings:
        record["settings"] = settings
        record["settings_from"] = settings_from or []
    base = load_config(config, overrides)
    record["resolved_config"] = base.to_dict()

    from lmdistill import models

    repo = str(Path(__file__).resolve().parents[3]) + "/"
    work = str(Path(work_dir).resolve()) + "/"
    cache = str(models.cache_root(base.cache_dir).resolve()) + "/"

    def save():  # no machine's paths: the repository's are relative to it, the work and cache folders named
        text = json.dumps(record, indent=1, default=str)
        text = text.replace(work, "<work-dir>/") if not work.startswith(repo) else text
        out_path.write_text(text.replace(cache, "<cache>/").replace(repo, ""))

    for v in variants:
        if only and v.name not in only or search_lr and v.kind != "train":
            continue
        if v.group == "knob" and not only:  # a knob runs only when named (at its base method's chosen setting)
            continue
        if search_lr and not (v.group == "knob" and settings):
            points = lr_grid(config, overrides, v, search_lr, search_inits)
        else:
            points = [setting_for(v, settings)]
        run_seeds = [seeds[0]] if v.kind != "train" or search_lr else seeds
        for setting, seed in [(p, s) for p in points for s in run_seeds]:
            tag = "".join(f"-{k.split('.')[-1]}{val}" for k, val in setting.items())
            slug = v.name.replace(' ', '_').replace(':', '').replace('(', '').replace(')', '').replace("'", "")
            run_dir = work_dir / f"{slug}{tag}-s{seed}"
            ov = list(overrides) + v.overrides + [f"{k}={val}" for k, val in setting.items()]
            ov += [f"output_dir={run_dir}", f"train.seed={seed}"]
            t0 = time.time()
            entry = {"variant": v.name, "group": v.group, "seed": seed, "kind": v.kind}
            if setting:
                entry["setting"] = setting
            try:
                entry.update(_run_one(kind, config, ov, v.kind))
            except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
                entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["wall_seconds"] = round(time.time() - t0, 1)
            if keep_students is not None and (run_dir / "student").is_dir():
                kept = Path(keep_students) / run_dir.name
                shutil.rmtree(kept, ignore_errors=True)
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(run_dir / "student"), str(kept))
                entry["student_kept"] = str(kept)
            record["runs"].append(entry)
            save()
            shutil.rmtree(run_dir, ignore_errors=True)
            brief = {k: entry.get(k) for k in ("setting", "scores", "seconds_per_step", "error")}
            print(f"[bench] {v.name} seed {seed}: {json.dumps(brief)}", flush=True)
    return out_path


def setting_for(v: Variant, settings: dict[str, dict[str, str]] | None) -> dict[str, str]:
    """A variant's chosen setting: its own search's, or, for an ablation or knob of a method
    (named ``"method: ..."``) that was not searched itself, its method's."""
    settings = settings or {}
    if v.name in settings:
        return settings[v.name]
    base, sep, _ = v.name.partition(":")
    return settings.get(base.strip(), {}) if sep and v.group != "method" else {}


def _run_one(kind: str, config: str, ov: list[str], vkind: str) -> dict:
    if kind == "embedding":
        from lmdistill import models
        from lmdistill.config import resolve_data_path
        from lmdistill.train.embedding import evaluate_sts, run_embedding, teacher_scores

        cfg = load_config(config, ov)
        evals = {n: resolve_data_path(p, cfg) for n, p in cfg.data.eval.items()}
        if vkind == "teacher":
            return {"scores": {n: r["spearman"] for n, r in teacher_scores(cfg, evals, progress=False).items()}}
        if vkind == "student":
            st = models.load_sentence_model(cfg.student, cfg.student_layers, cfg.cache_dir)
            return {"scores": {n: r["spearman"] for n, r in evaluate_sts(st, evals, cfg.eval.batch_size, False).items()}}
        cfg.eval.before = False
        cfg.eval.teacher = False
        m = run_embedding(cfg, progress=False)
        return {"scores": {n: r["spearman"] for n, r in m["after"].items()}, **_train_facts(m)}
    from lmdistill.config import resolve_data_path
    from lmdistill.train.lm import run_lm

    cfg = load_config(config, ov)
    if vkind in ("teacher", "student"):
        from lmdistill.train.lm import evaluate_lm, teacher_lm_scores

        sets = {n: resolve_data_path(p, cfg) for n, p in cfg.data.eval.items()}
        if vkind == "teacher":  # scored once per teacher, file, settings and evaluation code (cached)
            res = teacher_lm_scores(cfg, sets, None, lambda ref, tok, todo: evaluate_lm(cfg, todo, ref, tok, False))
        else:
            ref, tok = cfg.student, None
            if cfg.student_layers:  # the pruned student, as training starts from it
                from lmdistill import models
                from lmdistill.train.lm import load_student_lm

                ref, tok = load_student_lm(cfg).to(models.default_device()).eval(), models.load_tokenizer(cfg.student)
            res = evaluate_lm(cfg, sets, ref, tok, False)
        return {"scores": {n: {k: r.get(k) for k in ("rougeL", "bpb", "bpb_pooled", "n")} for n, r in res.items()}}
    cfg.eval.before = False
    cfg.eval.teacher = False
    teacher_source = _lm_teacher_source(cfg)
    m = run_lm(cfg, progress=False)
    scores = {n: {k: r.get(k) for k in ("rougeL", "bpb", "bpb_pooled", "n")} for n, r in m["after"].items()}
    out = {"scores": scores, **_train_facts(m), "teacher_source": teacher_source}
    for key in ("shared_vocab", "teacher_cache"):
        if key in m:
            out[key] = m[key]
    return out


def _lm_teacher_source(cfg) -> str | None:
    """With ``data.teacher_cache`` set, a method that can train from a cache does, its cache built
    first if it is not there yet (once: every learning rate and seed reads the same one); a method
    that cannot (DSKD) trains online. Returns where the run's teacher came from (None: no teacher)."""
    from lmdistill.registry import get_method

    cls = get_method(cfg.method, "lm")
    if not cls.needs_teacher:
        return None
    if cfg.data.teacher_cache is None or cls.cache_form is None:
        cfg.data.teacher_cache = None
        return "online"
    from lmdistill.train.lm_cache import build_lm_teacher_cache

    build_lm_teacher_cache(cfg, progress=False)
    return "cache"


def _train_facts(m: dict) -> dict:
    """What a trained run keeps in the record besides its scores: cost, and every logged loss term
    per logging step (``log_history``), so that statements about the terms can be checked."""
    terms = [{k: v for k, v in e.items() if k not in ("epoch",)} for e in m.get("log_history", [])]
    return {"seconds_per_step": m["seconds_per_step"], "steps": m["steps"], "train_loss": m["train_loss"],
            "nonfinite_steps": m.get("nonfinite_steps", 0), "log_history": terms}


def _commit_label(run: dict) -> str | None:
    """``abcdef1234`` (or ``abcdef1234+dirty``) of the tree a run came from."""
    commit = run.get("git_commit")
    if not commit:
        return None
    return str(commit)[:10] + ("+dirty" if run.get("git_dirty") else "")


def _scores(run: dict, metric: str | None) -> dict:
    """A run's score per evaluation set (``metric`` of each, where the sets hold several); a set
    without that metric (ROUGE-L on the selection rows, which get bits per byte only) is left out."""
    out = {ev: v if metric is None else v.get(metric) for ev, v in run["scores"].items()}
    return {ev: v for ev, v in out.items() if v is not None}


def _mean_sd(vals: list[float]) -> tuple[float, float | None]:
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else None


def summarise(record: dict, metric: str | None = None) -> list[dict]:
    """Per variant: mean and standard deviation over seeds of every score, and seconds per step."""
    by: dict[str, list[dict]] = {}
    order: list[str] = []
    for r in record["runs"]:
        if r["variant"] not in by:
            order.append(r["variant"])
        by.setdefault(r["variant"], []).append(r)
    rows = []
    for name in order:
        runs = [r for r in by[name] if "scores" in r]
        row = {"variant": name, "group": by[name][0]["group"], "n_seeds": len(runs),
               "errors": [f"seed {r['seed']}: {r['error']}" for r in by[name] if "error" in r],
               "commits": sorted({_commit_label(r) for r in by[name] if _commit_label(r)})}
        if runs:
            per_run = [_scores(r, metric) for r in runs]
            for ev in runs[0]["scores"]:
                if vals := [s[ev] for s in per_run if ev in s]:
                    row[ev] = _mean_sd(vals)
            sps = [r["seconds_per_step"] for r in runs if r.get("seconds_per_step")]
            row["seconds_per_step"] = statistics.mean(sps) if sps else None
        rows.append(row)
    return rows


def differences(record: dict, base: str = "sft", metric: str | None = None) -> list[dict]:
    """Per trained variant other than ``base``: its score minus ``base``'s at the same seed, as
    mean and standard deviation over the seeds both ran (paired: one seed is one data order for
    both). ``{"variant", "n_pairs", <set>: (mean, sd)}``; empty where ``base`` has no scores."""
    ref = {r["seed"]: _scores(r, metric) for r in record["runs"] if r["variant"] == base and "scores" in r}
    if not ref:
        return []
    by: dict[str, dict[int, dict]] = {}
    for r in record["runs"]:
        if r["variant"] != base and r.get("kind", "train") == "train" and "scores" in r and r["seed"] in ref:
            by.setdefault(r["variant"], {})[r["seed"]] = _scores(r, metric)
    rows = []
    for name, per_seed in by.items():
        row: dict = {"variant": name, "n_pairs": len(per_seed)}
        for ev in ref[next(iter(per_seed))]:
            if d := [s[ev] - ref[seed][ev] for seed, s in per_seed.items() if ev in s and ev in ref[seed]]:
                row[ev] = _mean_sd(d)
        rows.append(row)
    return rows
