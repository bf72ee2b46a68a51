"""Tables, plots and the README's results section, generated from benchmarks/results/*.json.

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmdistill.bench.quality import current_names, differences, select, summarise  # noqa: E402
from lmdistill.report.records import fmt, markdown_table, plot_score_vs_cost, update_readme  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _protocol(rec: dict) -> dict:
    """What makes two records one protocol: their config, settings and overrides, with each
    evaluation file in ``data.eval`` named by its file name only. The embedding benchmark writes
    its evaluation subset (the first 1500 SICK-R pairs) into the run's work folder, which may differ
    between sessions of the same protocol (``--work-dir``)."""
    ov = [re.sub(r"(:\s*)[^,{}]*/([^/,{}]+)", r"\1\2", o) if o.startswith("data.eval=") else o
          for o in rec.get("overrides") or []]
    return {"config": rec.get("config"), "settings": rec.get("settings"), "overrides": ov}


def _merged(prefix: str, allow_dirty: bool = False, keep=None) -> dict | None:
    """The latest run of a benchmark, with the runs of earlier files of the same protocol (same
    config and overrides) merged in: seeds run in separate sessions make one table. A (variant,
    seed) measured twice keeps its latest result; a reference (teacher, untrained student) is
    deterministic and counted once. Each run carries the commit of its file and whether that
    tree was dirty; files from a dirty tree are left out unless ``allow_dirty``. ``keep``: a
    test on a record, for prefixes that hold two protocols (a learning-rate search and a knob
    search share ``embedding-search-cpu``)."""
    recs = _protocols(prefix, allow_dirty, keep)
    return recs[0] if recs else None


def _protocols(prefix: str, allow_dirty: bool = False, keep=None) -> list[dict]:
    """Every protocol of a benchmark (its records grouped by config, settings and overrides, e.g.
    one budget and another), each merged as ``_merged`` describes, the latest protocol first."""
    files = sorted(RESULTS.glob(f"{prefix}-*.json"))
    recs = []
    for f in files:
        rec = json.loads(f.read_text())
        if not prefix.startswith("lm-cache"):  # a cache record's "sra" is its own baseline, named in its table
            rec = current_names(rec)
        if keep is not None and not keep(rec):
            continue
        if rec.get("git_dirty") and not allow_dirty:
            print(f"[report] {f.name}: from a dirty tree (commit {str(rec.get('git_commit'))[:10]}), left out; "
                  "--allow-dirty takes it", file=sys.stderr)
            continue
        for run in rec.get("runs", []):
            run.setdefault("git_commit", rec.get("git_commit"))
            run.setdefault("git_dirty", rec.get("git_dirty"))
            run.setdefault("variant_names", rec.get("variant_names", 1))
        recs.append(rec)
    if recs and "runs" not in recs[-1]:  # the speed benchmark: one run is the whole measurement
        return [dict(recs[-1])]
    groups: list[list[dict]] = []
    for rec in reversed(recs):
        key = _protocol(rec)
        for g in groups:
            first = _protocol(g[0])
            if (all(first.get(k) == key.get(k) for k in ("config", "overrides"))
                    and _same_choices(first.get("settings"), key.get("settings"))):
                g.insert(0, rec)
                break
        else:
            groups.append([rec])
    return [_merge(same) for same in groups]


def _same_choices(a: dict | None, b: dict | None) -> bool:
    """Two records' search choices belong to one protocol when every variant both name has the same
    setting in both: a method searched later (or a run renamed out of a variant) adds a name, it
    does not start another protocol. Records without a search match only each other."""
    if a is None or b is None:
        return a is b
    return all(a[v] == b[v] for v in a.keys() & b.keys())


def _merge(same: list[dict]) -> dict:
    """One protocol's records (oldest first) as one: the latest's fields, every run."""
    base = dict(same[-1])
    seen, runs = set(), []
    for rec in reversed(same):
        for run in rec["runs"]:
            key = (run["variant"], run["seed"] if run.get("kind", "train") == "train" else None,
                   json.dumps(run.get("setting"), sort_keys=True))
            if key not in seen:
                seen.add(key)
                runs.append(run)
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for rec in same for r in rec["runs"]))}
    # the methods and references first, then ablations and knobs, then superseded runs (a method as it ran
    # before a fix), each in the order they were first run
    rank = {"ablation": 1, "knob": 1, "superseded": 2}
    base["runs"] = sorted(runs, key=lambda r: (rank.get(r.get("group"), 0), order[r["variant"]], r["seed"]))
    base["seeds"] = sorted({s for rec in same for s in rec["seeds"]})
    base["commits"] = list(dict.fromkeys(str(rec.get("git_commit"))[:10] + ("+dirty" if rec.get("git_dirty") else "")
                                         for rec in same))
    base["times"] = [rec["time"] for rec in same]
    if "search" in base:  # a search extended in a later file (one more learning rate) tried every factor of each
        base["search"] = {**base["search"], "lr_factors": sorted({f for rec in same for f in rec["search"]["lr_factors"]})}
    return base


def _stamp(rec: dict) -> str:
    m = rec["machine"]
    commits = ", ".join(rec.get("commits") or
                        [str(rec.get("git_commit"))[:10] + (" (from a dirty tree)" if rec.get("git_dirty") else "")])
    when = " and ".join(rec.get("times") or [rec["time"]])
    return (f"{when}, commit {commits}, {m['cpus']} CPUs"
            f"{', ' + m['gpu'] if m.get('gpu') else ''}, torch {rec['versions']['torch']}")


def _seeds(row: dict) -> str:
    """How many seeds a row averages, and how many failed (a failed seed is shown, not dropped)."""
    failed = len(row["errors"])
    return str(row["n_seeds"]) + (f" ({failed} failed: {'; '.join(row['errors'])[:120]})" if failed else "")


def _references(rows: list[dict], ev: str) -> list[tuple[str, float]]:
    """The reference rows (teacher, untrained student) of a table, as lines on its plot."""
    return [(r["variant"], r[ev][0]) for r in rows if r["group"] == "reference" and ev in r]


def embedding_section(rec: dict) -> str:
    rows = summarise(rec)
    meta = ("variant", "group", "n_seeds", "errors", "seconds_per_step", "commits")
    evals: list[str] = []
    for r in rows:
        evals += [k for k in r if k not in evals and k not in meta]
    table = []
    points = []
    for r in rows:
        table.append([r["variant"]] + [fmt(*r[e]) if e in r else "-" for e in evals]
                     + [fmt(r.get("seconds_per_step"), None, 2) if r.get("seconds_per_step") else "-", _seeds(r),
                        ", ".join(r["commits"]) or "-"])
        if r.get("seconds_per_step") and evals and evals[0] in r:
            points.append((r["variant"], r["seconds_per_step"], *r[evals[0]]))
    png = RESULTS / f"embedding-{rec['preset']}.png"
    if points:
        plot_score_vs_cost(points, "seconds per step", f"{evals[0]} Spearman x100",
                           f"Embedding distillation ({rec['preset']} preset)", png, _references(rows, evals[0]))
    md = markdown_table(["variant"] + [f"{e} Spearman" for e in evals] + ["s/step", "seeds", "commit"], table)
    return (f"### Sentence embeddings: all-mpnet-base-v2 -> MiniLM-L6 layers 0,2,4 ({rec['preset']} preset)\n\n"
            f"{_stamp(rec)}. Mean ± standard deviation over seeds {rec['seeds']}; variants run: "
            f"{len({r['variant'] for r in rec['runs']})} of the benchmark's list (a stopped run keeps what it measured). "
            f"Overrides: `{' '.join(rec['overrides'][:6])}`.\n\n"
            f"{md}\n\n![score against cost](benchmarks/results/{png.name})\n")


def lm_section(rec: dict) -> str:
    rows_r = summarise(rec, "rougeL")
    rows_b = summarise(rec, "bpb")
    meta = ("variant", "group", "n_seeds", "errors", "seconds_per_step", "commits")
    # every set but the selection rows ("holdout"), which a search chose on and are never reported
    evals = [k for r in rows_b for k in r if k not in meta and k != "holdout"] if rows_b else []
    evals = list(dict.fromkeys(evals))
    table, points = [], []
    for r, b in zip(rows_r, rows_b):
        cells = [r["variant"]]
        for e in evals:
            cells += [fmt(*r[e]) if e in r else "-", fmt(b[e][0], b[e][1], 3) if e in b else "-"]
        cells += [fmt(r.get("seconds_per_step")) if r.get("seconds_per_step") else "-", _seeds(r),
                  ", ".join(r["commits"]) or "-"]
        table.append(cells)
        if r.get("seconds_per_step") and evals and evals[0] in r:
            points.append((r["variant"], r["seconds_per_step"], *r[evals[0]]))
    rc = rec["resolved_config"]
    steps = (rc.get("train") or {}).get("max_steps")
    png = RESULTS / (f"lm-{rec['preset']}" + (f"-{steps}steps" if steps and steps > 0 else "")
                     + ("-searched" if rec.get("settings") else "") + ".png")
    if points:
        plot_score_vs_cost(points, "seconds per step", f"{evals[0]} ROUGE-L", f"Cross-tokenizer LM ({png.stem[3:]})", png,
                           _references(rows_r, evals[0]))
    header = ["variant"] + [h for e in evals for h in (f"{e} ROUGE-L", f"{e} bits/byte")] + ["s/step", "seeds", "commit"]
    diffs = _to_sft(rec, evals)
    layers = rc.get("student_layers")
    student = "SmolLM2-135M" + (f" pruned to {len(layers)} of its 30 blocks" if layers else "")
    rouge_rows = (rc.get("eval") or {}).get("rouge_limit") or rc["data"]["eval_limit"]
    tuned = "each method at its searched setting" if rec.get("settings") else "every method at the preset's learning rate"
    return (f"### Cross-tokenizer LM: Gemma-3-270M -> {student} ({rec['preset']} preset, "
            f"{f'{steps} steps, ' if steps and steps > 0 else ''}{tuned})\n\n{_stamp(rec)}. "
            f"Training seeds {', '.join(map(str, rec['seeds']))} (mean ± standard deviation where a variant ran more "
            f"than one; the seeds column says how many); ROUGE-L over the first {rouge_rows} rows of each set, "
            f"bits per byte over the first {rc['data']['eval_limit']}. "
            f"Overrides: `{' '.join(rec['overrides'])}`.{_settings(rec)} Lower bits per byte is better.\n\n"
            f"{markdown_table(header, table)}\n\n{diffs}![score against cost](benchmarks/results/{png.name})\n")


def _settings(rec: dict) -> str:
    """The settings each variant ran at, from the search records named (empty without a search)."""
    ran = {r["variant"] for r in rec["runs"] if r.get("kind", "train") == "train"}
    chosen = [f"{v}: " + ", ".join(f"{k.split('.')[-1]} {val}" for k, val in st.items())
              for v, st in (rec.get("settings") or {}).items() if v in ran and st]
    return (f" Settings chosen by the search ({len(rec.get('settings_from') or [])} records): "
            + "; ".join(chosen) + ".") if chosen else ""


def _to_sft(rec: dict, evals: list[str]) -> str:
    """Each method's difference to SFT, paired by seed (mean ± sd over the seeds both ran)."""
    d_r, d_b = differences(rec, "sft", "rougeL"), {r["variant"]: r for r in differences(rec, "sft", "bpb")}
    if not d_r:
        return ""
    rows = [[r["variant"]] + [c for e in evals for c in (fmt(*r[e], 2, signed=True) if e in r else "-",
                                                          fmt(*d_b[r["variant"]][e], 3, signed=True)
                                                          if e in d_b[r["variant"]] else "-")]
            + [str(r["n_pairs"])] for r in d_r]
    header = ["variant"] + [h for e in evals for h in (f"{e} ROUGE-L", f"{e} bits/byte")] + ["seeds paired"]
    return ("Difference to SFT at the same seed (the variant minus SFT; mean ± sd over the seeds both ran; "
            "higher ROUGE-L and lower bits per byte are better):\n\n" + markdown_table(header, rows) + "\n\n")


def search_section(rec: dict) -> str:
    """What each method's search tried and chose (the selection set is never reported)."""
    ok = [r for r in rec["runs"] if r.get("scores")]
    if not ok:
        return ""
    on = next(iter(ok[0]["scores"]))
    lm = rec["kind"] == "lm"
    chosen = select([rec], on=on, metric="bpb" if lm else None, higher_is_better=not lm)
    keys = list(dict.fromkeys(k for c in chosen.values() for st, _ in c["tried"] for k in st))
    digits = 3 if lm else 2
    rows = []
    for name, c in chosen.items():
        c["tried"].sort(key=lambda p: float(p[0].get("train.lr", 0)))  # in learning-rate order, whichever file held it
        tried = "; ".join(f"{' '.join(str(v) for v in st.values())}: {fmt(sc, None, digits) if sc is not None else 'failed'}"
                          for st, sc in c["tried"])
        rows.append([name, tried, " ".join(str(v) for v in c["chosen"].values()), fmt(c["score"], None, digits)])
    rc = rec["resolved_config"]
    factors = ", ".join(f"{f:g}" for f in rec["search"]["lr_factors"])
    inits = rec["search"].get("projector_inits")
    where = (f"bits per byte on {rc['data']['holdout']} training rows held out of every run (the teacher's "
             "fine-tuning included)" if lm else f"Spearman on {on}")
    title = "cross-tokenizer LM" if lm else "sentence embeddings"
    score = "bits/byte" if lm else "Spearman"
    return (f"### Hyperparameter search, {title} ({rec['preset']} preset)\n\n{_stamp(rec)}. Each method "
            f"once (seed {rec['seeds'][0]}) at its learning rate times {factors}"
            f"{', crossed with projector init ' + ' / '.join(inits) + ' where it has projectors' if inits else ''}; "
            f"selected by {where}, never reported. Searched: {', '.join(keys)} (the tried column: the points each "
            "variant ran).\n\n"
            f"{markdown_table(['variant', f'tried ({score} on the selection set)', 'chosen', 'best'], rows)}\n")


def knob_section(rec: dict) -> str:
    """A method's own knobs, each once at the method's chosen setting, against the method itself
    in the same run, on the selection set (never reported)."""
    ok = [r for r in rec["runs"] if r.get("scores")]
    if not ok:
        return ""
    on = next(iter(ok[0]["scores"]))
    base = {r["variant"]: r["scores"][on] for r in ok if r["group"] != "knob"}
    rows = []
    for r in rec["runs"]:
        score = (r.get("scores") or {}).get(on)
        ref = base.get(r["variant"].partition(":")[0].strip())
        rows.append([r["variant"], fmt(score, None, 2) if score is not None else "failed: " + str(r.get("error"))[:60],
                     fmt(score - ref, None, 2) if score is not None and ref is not None and r["group"] == "knob" else "-",
                     fmt(r.get("seconds_per_step"), None, 2)])
    at = "; ".join(f"{k}: {' '.join(f'{a}={b}' for a, b in v.items())}" for k, v in rec["search"]["knobs_at"].items()
                   if k in base)
    return (f"### Knob search, sentence embeddings ({rec['preset']} preset)\n\n{_stamp(rec)}. Seed "
            f"{rec['seeds'][0]}, each knob once at its method's chosen setting ({at}); Spearman on {on}, never "
            "reported; the difference is to the method itself in the same run.\n\n"
            f"{markdown_table(['variant', f'{on} Spearman', 'difference', 's/step'], rows)}\n")


def cache_section(rec: dict) -> str:
    """SRA from a teacher cache against SRA online: quality on the selection rows, size, build time.
    Each row names its span logit KL reduction and commit: records from before the averaged
    default (variant names v2) ran the summed KL."""
    rc = rec["resolved_config"]
    explicit = (rc.get("method_args") or {}).get("logit_reduction")
    rows = []
    for r in rec["runs"]:
        reduction = explicit or ("mean" if r.get("variant_names", 1) >= 2 else "sum")
        commit = str(r.get("git_commit"))[:7]
        if not r.get("scores"):
            rows.append([r["variant"], reduction, "-", "failed: " + str(r.get("error"))[:80], "-", "-", "-", commit])
            continue
        c = r.get("teacher_cache") or {}
        size = f"{c['bytes_per_row'] / 2**10:.0f} KB a row, {c['bytes'] / 2**20:.0f} MB for {c['rows']} rows" if c else "-"
        build = fmt(c["build_seconds"] / 60, None, 1) if c.get("build_seconds") else "-"
        rows.append([r["variant"], reduction, r.get("teacher_source") or "-", fmt(r["scores"]["holdout"]["bpb"], None, 3),
                     fmt(r.get("seconds_per_step"), None, 2), size, build, commit])
    chosen = (rec.get("settings") or {}).get("sra", {})
    setting = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "the preset's"
    header = ["variant", "span logit KL", "teacher", "bits/byte", "s/step", "cache size", "cache build (min)", "commit"]
    return (f"### SRA from the teacher cache against the online teacher ({rec['preset']} preset)\n\n{_stamp(rec)}. "
            f"One seed ({rec['seeds'][0]}) at SRA's chosen setting ({setting}); each row names its span logit KL "
            "reduction (before 2026-12-07 SRA's default summed it over spans; compare rows of one reduction); "
            f"bits per byte on the {rc['data']['holdout']} held-out selection rows; the cache stores span CoMs and "
            f"log-probabilities in {rc['data']['teacher_cache_dtype']}.\n\n{markdown_table(header, rows)}\n")


def speed_section(rec: dict) -> str:
    to_sft = any("ratio_to_sft" in r for r in rec["methods"].values())
    paired = rec.get("paired") or {}
    pair_cols = (["x floor, paired"] + (["x SFT, paired"] if to_sft else [])) if paired else []

    def paired_cells(name: str) -> list[str]:
        if not paired:
            return []
        p = paired.get(name, {})
        cells = [fmt(p.get("ratio"), p.get("ratio_sd")) if name != "floor" else "1.00"]
        if to_sft:
            cells.append(fmt(p.get("ratio_to_sft"), p.get("ratio_to_sft_sd")) if name != "floor" else "-")
        return cells

    rows = [["floor", fmt(rec["floor"]["s_per_step"], rec["floor"].get("s_per_step_sd"), 3),
             fmt(rec["floor"]["peak_mb"], None, 0), "1.00"] + (["-", "-"] if to_sft else []) + paired_cells("floor")]
    for name, r in rec["methods"].items():
        rows.append([name, fmt(r["s_per_step"], r.get("s_per_step_sd"), 3), fmt(r["peak_mb"], None, 0),
                     fmt(r["ratio"], r.get("ratio_sd"))]
                    + ([fmt(r.get("ratio_to_sft"), r.get("ratio_to_sft_sd")), fmt(r.get("peak_to_sft"))] if to_sft else [])
                    + paired_cells(name))
    header = ["method", "s/step", "peak MB", "x floor"] + (["x SFT", "peak x SFT"] if to_sft else []) + pair_cols
    floor = ("teacher forward without LM head + student SFT step" if rec["pair"] == "lm"
             else "student step with a cached teacher (cosine KD, AdamW)")
    rows_only = ", selected rows, a run of their own" if rec.get("selected") else ""
    rounds = rec.get("rounds", 1)
    spread = (f"; {rounds} rounds in alternating order, each row a fresh process each round: s/step is the mean over "
              "rounds ± the sd of the round means, a ratio the median of its per-round ratios ± their sd"
              if rounds > 1 else "; one round: ± is the sd over timed steps")
    if paired:
        spread += (f". Paired columns: every row set up in one further process, the rows taking their {rec['steps']} "
                   "steps in turn; a ratio is the median over steps of the row's step over the floor's (SFT's) step "
                   "of the same cycle ± their sd")
    return (f"### Cost, {rec['pair']} pair ({rec['device']}, batch {rec['floor']['batch']}, {rec['steps']} timed "
            f"steps{' per round' if rounds > 1 else ''}{rows_only})\n\n"
            f"{_stamp(rec)}. Floor: {floor}. Peak memory on the CPU is the peak resident set of a fresh process "
            f"per method (model loading included){spread}.\n\n"
            f"{markdown_table(header, rows)}\n")


def dirty_section() -> str:
    """Every committed record that came from an uncommitted tree, marked, with what it holds."""
    rows = []
    for f in sorted(RESULTS.glob("*.json")):
        rec = json.loads(f.read_text())
        if rec.get("git_dirty"):
            held = (sorted({r["variant"] for r in rec["runs"]}) if "runs" in rec else list(rec.get("methods", {}))
                    or [f"{len(rec.get('pairs', []))} tokenizer pairs"])
            rows.append([f.name, str(rec.get("git_commit"))[:10] + "+dirty", ", ".join(held)[:160]])
    if not rows:
        return ""
    return ("### Records from uncommitted trees (marked; not re-run from a clean commit)\n\n"
            "Left out of the tables above unless `report.py --allow-dirty`; what they hold is quoted in the text "
            "only with this mark.\n\n" + markdown_table(["record", "commit", "holds"], rows) + "\n")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allow-dirty", action="store_true", help="also merge results from a dirty tree (marked so)")
    args = ap.parse_args()
    parts = []
    def knobs(rec):
        return bool(rec.get("search", {}).get("knobs_at"))

    for prefix, fn, keep in (("embedding-search-cpu", search_section, lambda r: not knobs(r)),
                             ("embedding-search-cpu", knob_section, knobs), ("embedding-cpu", embedding_section, None),
                             ("embedding-demo", embedding_section, None), ("embedding-full", embedding_section, None),
                             ("lm-search-cpu2", search_section, None), ("lm-cpu", lm_section, None),
                             ("lm-cpu2", lm_section, None), ("lm-full", lm_section, None),
                             ("lm-cache-cpu2", cache_section, None), ("speed-embedding", speed_section, None),
                             ("speed-lm", speed_section, None), ("speed-rows-lm", speed_section, None)):
        # the LM tables: every protocol (before and after the search, each budget), the latest first
        for rec in (_protocols if prefix == "lm-cpu2" else lambda *a: [_merged(*a)])(prefix, args.allow_dirty, keep):
            if rec and (part := fn(rec)):
                parts.append(part)
    if part := dirty_section():
        parts.append(part)
    section = "\n".join(parts) if parts else "(no benchmark results yet)"
    (RESULTS / "RESULTS.md").write_text("# Benchmark results\n\n" + section.replace("benchmarks/results/", ""))
    update_readme(ROOT / "README.md", section)
    print(section)


if __name__ == "__main__":
    main()
