import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmdistill.bench.quality import Variant, run_benchmark, summarise
from lmdistill.errors import LmdistillError
from lmdistill.report.records import markdown_table, plot_score_vs_cost, update_readme

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_json(gpt2_lm, llama_lm, instructions_file):
    r = subprocess.run([sys.executable, "-m", "lmdistill", "bench", "speed", "--pair", "lm", "--methods",
                        "sft,sra,sra+cache,sra (no span logit term)+cache,uld+cache,sft+gc",
                        "--steps", "2", "--json", "--set", f"student={gpt2_lm}", "--set", f"teacher={llama_lm}",
                        "--set", f"data.train=[{instructions_file}]"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert set(res["methods"]) == {"sft", "sra", "sra+cache", "sra (no span logit term)+cache", "uld+cache", "sft+gc"}
    assert all(m["ratio_to_sft"] > 0 and m["peak_to_sft"] > 0 for m in res["methods"].values())
    assert res["floor"]["s_per_step"] > 0 and res["floor"]["peak_mb"] > 0
    for m in res["methods"].values():
        assert m["ratio"] > 0 and m["peak_mb"] > 0 and m["s_per_step_sd"] is not None and m["s_min"] <= m["s_max"]


def test_speed_benchmark_times_talas_with_its_options(tiny_st, tiny_st_student, sentences_file):
    from lmdistill.bench.speed import OPTION_ROWS, speed_benchmark

    rows = ["talas", "talas (authors' settings)"]
    res = speed_benchmark("embedding", rows, steps=2, overrides=[f"teacher={tiny_st}", f"student={tiny_st_student}",
                                                                 "student_layers=null", f"data.train=[{sentences_file}]"])
    assert list(res["methods"]) == rows and all(r["s_per_step"] > 0 for r in res["methods"].values())
    from lmdistill.bench.quality import TALAS_AUTHORS

    assert OPTION_ROWS[rows[1]] == TALAS_AUTHORS


def test_speed_benchmark_rounds_take_each_ratio_within_its_round(tiny_st, tiny_st_student, sentences_file, monkeypatch):
    from lmdistill.bench import speed

    # a machine that slows down 2x after the first round, and one slow talas round: the ratio is
    # the median of the per-round ratios (3, 3, 6), not the ratio of the means (4.2)
    calls = {"n": 0, "talas": 0}

    def fake(pair, method, floor, steps, ov, targets=None):
        calls["n"] += 1
        calls["talas"] += method == "talas"
        slow = (2.0 if calls["n"] > 3 else 1.0) * (2.0 if method == "talas" and calls["talas"] == 3 else 1.0)
        t = slow * (1.0 if floor else {"rkd": 1.5, "talas": 3.0}[method])
        return {"s_per_step": t, "s_per_step_sd": 0.0, "s_min": t, "s_max": t, "peak_mb": 10.0, "optimizer": "x",
                "batch": 2}

    monkeypatch.setattr(speed, "_run_isolated", lambda *a, fn=None: fake(*a))
    res = speed.speed_benchmark("embedding", ["rkd", "talas"], steps=2, rounds=3,
                                overrides=[f"teacher={tiny_st}", f"student={tiny_st_student}"])
    assert calls["n"] == 9 and res["rounds"] == 3
    assert res["methods"]["talas"]["ratio"] == 3.0 and res["methods"]["talas"]["ratio_sd"] > 1.0
    assert res["methods"]["rkd"]["s_per_step_rounds"] == [1.5, 3.0, 3.0]  # the drift is in the times, not the ratio
    with pytest.raises(LmdistillError, match="rounds=0"):
        speed.speed_benchmark("embedding", ["rkd"], rounds=0)


def test_paired_speed_ratios_are_taken_step_by_step(tiny_st, tiny_st_student, sentences_file):
    from lmdistill.bench import speed

    # a machine that slows down 4x over three cycles: each step's ratio to the floor's step of the
    # same cycle stays 1.1 (and 1.375 to SFT's); the median steps move with the drift
    summary = speed.paired_summary({"floor": [1.0, 2.0, 4.0], "sft": [0.8, 1.6, 3.2], "sra": [1.1, 2.2, 4.4]})
    assert summary["sra"]["ratio"] == 1.1 and summary["sra"]["ratio_sd"] == 0.0
    assert summary["sra"]["ratio_to_sft"] == 1.375 and summary["sft"]["ratio"] == 0.8
    assert summary["floor"]["s_per_step_median"] == 2.0 and "ratio" not in summary["floor"]

    # the real thing on the tiny embedding pair: one further process, every row's steps recorded
    res = speed.speed_benchmark("embedding", ["rkd"], steps=2, paired=True,
                                overrides=[f"teacher={tiny_st}", f"student={tiny_st_student}", "student_layers=null",
                                           f"data.train=[{sentences_file}]"])
    assert set(res["paired"]) == {"floor", "rkd"} and len(res["paired"]["rkd"]["steps"]) == 2
    assert res["paired"]["rkd"]["ratio"] > 0 and res["methods"]["rkd"]["peak_mb"] > 0

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    section = report.speed_section({**res, "time": "t0", "git_commit": "a" * 40, "git_dirty": False,
                                    "machine": {"cpus": 2}, "versions": {"torch": "x"}})
    assert "| x floor, paired |" in section and f"| {res['paired']['rkd']['ratio']:.2f} ± " in section


def test_quality_benchmark_records_and_report(tiny_st, tiny_st_student, sentences_file, sts_file, tmp_path):
    variants = [Variant("teacher", kind="teacher", group="reference"), Variant("student", kind="student"),
                Variant("talas", ["method=talas"]), Variant("rkd", ["method=rkd", "method_args={}"]),
                Variant("broken", ["method=talas", "method_args.k=9"])]
    out = run_benchmark("embedding", str(ROOT / "configs/tiny/talas-tiny.yaml"), "test", variants, [0, 1],
                        [f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]",
                         f"data.eval={{toy: {sts_file}, again: {sts_file}}}", "train.max_steps=2"],
                        tmp_path / "results", tmp_path / "work", keep_students=tmp_path / "students")
    rec = json.loads(out.read_text())
    assert rec["git_commit"] is not None and rec["machine"]["cpus"] >= 1 and rec["versions"]["torch"]
    rows = {r["variant"]: r for r in summarise(rec)}
    assert rows["talas"]["n_seeds"] == 2 and rows["teacher"]["n_seeds"] == 1
    assert set(rows["talas"]) >= {"toy", "again"}  # an extra evaluation file is one more column
    assert rows["broken"]["errors"] and "out of range" in rows["broken"]["errors"][0]
    assert rows["broken"]["errors"][0].startswith("seed 0:")  # a failed seed is named, not dropped
    kept = sorted(p.name for p in (tmp_path / "students").iterdir())  # --keep-students
    assert kept == ["rkd-s0", "rkd-s1", "talas-s0", "talas-s1"]
    assert all((tmp_path / "students" / k / "modules.json").exists() for k in kept)
    # every trained run keeps its per-term loss history
    terms = {"talas": {"anchor", "lasd"}, "rkd": {"angle"}}
    for run in rec["runs"]:
        if run["kind"] == "train" and "error" not in run:
            hist = [h for h in run["log_history"] if "loss" in h]
            assert len(hist) == 2 and all(terms[run["variant"]] <= set(h) for h in hist), hist
    png = plot_score_vs_cost([("a", 1.0, 2.0), ("b", 2.0, 3.0, 0.4), ("c", 2.1, 3.01, None)], "x", "y", "t",
                             tmp_path / "p.png", references=[("teacher", 4.0), ("student (untrained)", 1.0)])
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert markdown_table(["a", "b"], [["1", "2"]]).splitlines()[1] == "|---|---|"
    readme = tmp_path / "R.md"
    readme.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\ny\n")
    update_readme(readme, "new table")
    assert readme.read_text() == "x\n<!-- results:start -->\nnew table\n<!-- results:end -->\ny\n"


def test_embedding_search_crosses_projector_inits_and_selects_the_highest(tiny_st, tiny_st_student, sentences_file,
                                                                          sts_file, tmp_path):
    from lmdistill.bench.quality import select

    variants = [Variant("talas", ["method=talas"]), Variant("rkd", ["method=rkd", "method_args={}"])]
    out = run_benchmark("embedding", str(ROOT / "configs/tiny/talas-tiny.yaml"), "test", variants, [0, 1],
                        [f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]",
                         f"data.eval={{dev: {sts_file}}}", "train.max_steps=2"], tmp_path / "results",
                        tmp_path / "work", search_lr=[1, 2], search_inits=["normal", "xavier"],
                        selection="highest Spearman on dev")
    rec = json.loads(out.read_text())
    assert rec["search"] == {"lr_factors": [1, 2], "projector_inits": ["normal", "xavier"],
                             "selection": "highest Spearman on dev"}
    talas = [r["setting"] for r in rec["runs"] if r["variant"] == "talas"]
    assert len(talas) == 4 and {s["method_args.projector_init"] for s in talas} == {"normal", "xavier"}
    assert all("method_args.projector_init" not in r["setting"] for r in rec["runs"] if r["variant"] == "rkd")
    chosen = select([rec], on="dev", metric=None, higher_is_better=True)
    assert chosen["talas"]["score"] == max(r["scores"]["dev"] for r in rec["runs"] if r["variant"] == "talas")


def test_a_knob_variant_runs_only_when_named(tiny_st, tiny_st_student, sentences_file, sts_file, tmp_path):
    variants = [Variant("rkd", ["method=rkd", "method_args={}"]),
                Variant("talas: rho 0.5", ["method=talas", "train.rho=0.5"], group="knob")]
    common = ("embedding", str(ROOT / "configs/tiny/talas-tiny.yaml"), "test", variants, [0])
    ov = [f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]",
          f"data.eval={{dev: {sts_file}}}", "train.max_steps=1"]
    everything = json.loads(run_benchmark(*common, ov, tmp_path / "r1", tmp_path / "w").read_text())
    assert [r["variant"] for r in everything["runs"]] == ["rkd"]
    named = json.loads(run_benchmark(*common, ov, tmp_path / "r2", tmp_path / "w", only=["talas: rho 0.5"]).read_text())
    assert [r["variant"] for r in named["runs"]] == ["talas: rho 0.5"] and "error" not in named["runs"][0]
    # in a search given the methods' choices, a knob runs once at its method's; a method runs its grid
    chosen = {"talas": {"train.lr": "0.0005", "method_args.projector_init": "xavier"}}
    rec = json.loads(run_benchmark(*common, ov, tmp_path / "r3", tmp_path / "w", only=["rkd", "talas: rho 0.5"],
                                   search_lr=[1, 2], settings=chosen, settings_from=["s.json"]).read_text())
    assert [(r["variant"], r["setting"]) for r in rec["runs"]] == [
        ("rkd", {"train.lr": "0.001"}), ("rkd", {"train.lr": "0.002"}), ("talas: rho 0.5", chosen["talas"])]
    assert rec["search"]["knobs_at"] == chosen and "settings" not in rec


def test_report_keeps_a_knob_search_apart_from_the_learning_rate_search(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    def run(variant, group, score, lr="0.001"):
        return {"variant": variant, "group": group, "seed": 0, "kind": "train", "setting": {"train.lr": lr},
                "scores": {"dev": score}, "seconds_per_step": 1.0}

    common = {"kind": "embedding", "preset": "t", "config": "c", "overrides": ["o"], "seeds": [0], "git_commit": "a" * 40,
              "git_dirty": False, "machine": {"cpus": 2}, "versions": {"torch": "x"}}
    lr = {**common, "time": "t0", "search": {"lr_factors": [1, 2]}, "runs": [run("talas", "method", 70.0),
                                                                              run("talas", "method", 71.0, "0.002")]}
    knob = {**common, "time": "t1", "search": {"lr_factors": [1], "knobs_at": {"talas": {"train.lr": "0.002"}}},
            "runs": [run("talas", "method", 71.5, "0.002"), run("talas: rho 0.5", "knob", 72.0, "0.002")]}
    (tmp_path / "embedding-search-t-20260101.json").write_text(json.dumps(lr))
    (tmp_path / "embedding-search-t-20260102.json").write_text(json.dumps(knob))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    searched = report._merged("embedding-search-t", keep=lambda r: not r["search"].get("knobs_at"))
    assert [r["setting"]["train.lr"] for r in searched["runs"]] == ["0.001", "0.002"]  # the later knob file is not it
    section = report.knob_section(report._merged("embedding-search-t", keep=lambda r: bool(r["search"].get("knobs_at"))))
    assert "| talas: rho 0.5 | 72.00 | 0.50 | 1.00 |" in section and "| talas | 71.50 | - | 1.00 |" in section
    assert "talas: train.lr=0.002" in section


def test_report_merges_a_search_extended_by_a_later_file_in_learning_rate_order(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    def record(time, factors, points):
        return {"kind": "lm", "preset": "t", "config": "c", "overrides": ["o"], "seeds": [42], "git_commit": "a" * 40,
                "git_dirty": False, "time": time, "machine": {"cpus": 2}, "versions": {"torch": "x"},
                "search": {"lr_factors": factors}, "resolved_config": {"data": {"holdout": 100}},
                "runs": [{"variant": "sft", "group": "method", "seed": 42, "kind": "train", "setting": {"train.lr": lr},
                          "scores": {"holdout": {"bpb": bpb}}, "seconds_per_step": 1.0} for lr, bpb in points]}

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "lm-search-t-20260101.json").write_text(json.dumps(record("t0", [1, 3], [("0.0001", 2.0),
                                                                                       ("0.0003", 1.8)])))
    (tmp_path / "lm-search-t-20260102.json").write_text(json.dumps(record("t1", [30], [("0.003", 1.7)])))
    section = report.search_section(report._merged("lm-search-t"))
    assert "times 1, 3, 30;" in section and "the points each variant ran" in section
    assert "| sft | 0.0001: 2.000; 0.0003: 1.800; 0.003: 1.700 | 0.003 | 1.700 |" in section


def test_cache_report_names_each_rows_span_logit_reduction_and_commit(tmp_path, monkeypatch):
    """A cache record from before the averaged default (no variant_names: the summed KL) merged
    with a later one: each row says which reduction it ran, so rows of different defaults are not
    read as one comparison."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    def record(time, commit, runs, **extra):
        return {"kind": "lm", "preset": "t", "config": "c", "overrides": ["o"], "seeds": [42], "git_commit": commit * 40,
                "git_dirty": False, "time": time, "machine": {"cpus": 2}, "versions": {"torch": "x"},
                "settings": {"sra": {"train.lr": "0.001"}}, "runs": runs,
                "resolved_config": {"method_args": {}, "data": {"holdout": 100, "teacher_cache_dtype": "float16"}}, **extra}

    def run(variant, bpb, k=None):
        cache = {"bytes_per_row": 2048, "bytes": 2**21, "rows": 900, "build_seconds": 600} if k else None
        return {"variant": variant, "group": "ablation" if k else "method", "seed": 42, "kind": "train",
                "setting": {"train.lr": "0.001"}, "scores": {"holdout": {"bpb": bpb}}, "seconds_per_step": 1.0,
                "teacher_source": "cache" if k else "online", **({"teacher_cache": cache} if k else {})}

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "lm-cache-t-20260101.json").write_text(json.dumps(record("t0", "a", [run("sra: top 64", 1.9, 64)])))
    (tmp_path / "lm-cache-t-20260102.json").write_text(json.dumps(record(
        "t1", "b", [run("sra", 1.8), run("sra: top 256", 1.85, 256)], variant_names=3)))
    section = report.cache_section(report._merged("lm-cache-t"))
    assert "| sra: top 64 | sum | cache | 1.900 |" in section and section.count("| aaaaaaa |") == 1
    assert "| sra | mean | online | 1.800 |" in section and "| sra: top 256 | mean | cache | 1.850 |" in section
    assert "2 KB a row, 2 MB for 900 rows | 10.0 | bbbbbbb |" in section


def test_lm_report_shows_each_methods_difference_to_sft_paired_by_seed(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    def run(variant, seed, rouge, bpb, kind="train"):
        return {"variant": variant, "group": "reference" if kind != "train" else "method", "seed": seed, "kind": kind,
                "scores": {"dolly": {"rougeL": rouge, "bpb": bpb}, "holdout": {"rougeL": None, "bpb": bpb + 0.01}},
                **({"seconds_per_step": 1.0} if kind == "train" else {})}

    runs = [run("teacher (fine-tuned)", 42, 25.0, 0.8, "teacher"), run("sft", 42, 10.0, 2.0), run("sft", 43, 12.0, 1.9),
            run("mined", 42, 11.0, 1.8), run("mined", 43, 14.0, 1.8), run("uld", 44, 30.0, 0.1)]
    rec = {"kind": "lm", "preset": "t", "config": "c", "overrides": ["o"], "seeds": [42, 43, 44], "git_commit": "a" * 40,
           "git_dirty": False, "time": "t0", "machine": {"cpus": 2}, "versions": {"torch": "x"}, "runs": runs,
           "resolved_config": {"student_layers": None, "eval": {"rouge_limit": 2}, "data": {"eval_limit": 2}}}
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    section = report.lm_section(rec)
    # mined - sft at seeds 42 and 43: ROUGE-L +1, +2 (mean +1.50, sd 0.71); bits/byte -0.2, -0.1 (-0.150 ± 0.071)
    assert "| mined | +1.50 ± 0.71 | -0.150 ± 0.071 | 2 |" in section
    # uld ran only a seed SFT did not: nothing to pair, no row; references are never differenced
    assert "| uld | +" not in section and "| teacher (fine-tuned) | +" not in section
    # the selection rows (bits per byte only, ROUGE-L None) are what the search chose on: never reported
    assert "holdout" not in section


    # another budget is another protocol: both tables, the latest first, each with its own plot
    long = {**rec, "time": "t1", "overrides": ["o", "train.max_steps=200"], "settings": {"sft": {"train.lr": "0.0003"}},
            "settings_from": ["s.json"], "resolved_config": {**rec["resolved_config"], "train": {"max_steps": 200}}}
    (tmp_path / "lm-t-20260101.json").write_text(json.dumps(rec))
    (tmp_path / "lm-t-20260102.json").write_text(json.dumps(long))
    first, second = report._protocols("lm-t")
    assert first["time"] == "t1" and second["time"] == "t0"
    text = report.lm_section(first)
    assert "200 steps, each method at its searched setting" in text and "sft: lr 0.0003" in text
    assert (tmp_path / "lm-t-200steps-searched.png").exists() and (tmp_path / "lm-t.png").exists()


def test_report_merges_seeds_whose_evaluation_subset_lived_in_another_work_folder(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    def record(seed, sick, cfg="c"):
        return {"kind": "embedding", "preset": "t", "config": cfg, "seeds": [seed], "git_commit": "a" * 40,
                "git_dirty": False, "time": f"t{seed}", "machine": {"cpus": 2}, "versions": {"torch": "x"},
                "overrides": ["train.max_steps=80", f"data.eval={{stsb_test: stsb/test.csv, sickr_test: {sick}}}"],
                "runs": [{"variant": "talas", "group": "method", "seed": seed, "kind": "train",
                          "scores": {"toy": 70.0 + seed}, "seconds_per_step": 1.0}]}

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    for i, sick in enumerate(["runs/bench-embedding/sick_first1500.tsv", "/elsewhere/w2/sick_first1500.tsv"]):
        (tmp_path / f"embedding-t-2026010{i}.json").write_text(json.dumps(record(i, sick)))
    assert [r["seed"] for r in report._merged("embedding-t")["runs"]] == [0, 1]
    # another evaluation file is another protocol: only the latest record's runs
    (tmp_path / "embedding-t-20260103.json").write_text(json.dumps(record(2, "/w3/sick_all.tsv")))
    assert [r["seed"] for r in report._merged("embedding-t")["runs"]] == [2]


def test_an_ablation_takes_its_methods_setting_unless_searched_itself():
    from lmdistill.bench.quality import setting_for

    chosen = {"sra": {"train.lr": "0.001"}, "sra: authors' regime": {"train.lr": "0.003"}}
    assert setting_for(Variant("sra: no geometric term", group="ablation"), chosen) == chosen["sra"]
    assert setting_for(Variant("sra: authors' regime", group="ablation"), chosen) == chosen["sra: authors' regime"]
    assert setting_for(Variant("sft"), chosen) == {} and setting_for(Variant("sra: x", group="ablation"), None) == {}


def test_plot_labels_are_spread_apart_in_order():
    from lmdistill.report.records import spread_labels

    ys = [3.0, 3.01, 1.0, 3.02]
    out = spread_labels(ys, 0.1)
    order = sorted(range(4), key=lambda i: ys[i])
    assert [out[i] for i in order] == sorted(out)  # the order of the points is kept
    assert all(b - a >= 0.1 - 1e-9 for a, b in zip(sorted(out), sorted(out)[1:]))
    assert spread_labels([1.0, 2.0], 0.1) == [1.0, 2.0]  # far enough apart: left where they are
    assert spread_labels([1.0, 1.0], 0.1, xs=[0.0, 5.0], x_gap=1.0) == [1.0, 1.0]  # far apart in x


def test_report_shows_commits_and_refuses_dirty_records(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    def record(commit, dirty, seed, score, error=None):
        run = {"variant": "talas", "group": "method", "seed": seed, "kind": "train"}
        run.update({"error": error} if error else {"scores": {"toy": score}, "seconds_per_step": 1.0})
        return {"kind": "embedding", "preset": "t", "config": "c", "overrides": ["o"], "seeds": [seed],
                "git_commit": commit, "git_dirty": dirty, "time": f"t{seed}", "machine": {"cpus": 2},
                "versions": {"torch": "x"}, "runs": [run]}

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    for i, (commit, dirty, err) in enumerate([("a" * 40, False, None), ("b" * 40, True, None), ("c" * 40, False, "boom")]):
        (tmp_path / f"embedding-t-2026010{i}.json").write_text(json.dumps(record(commit, dirty, i, 70.0 + i, err)))
    clean = report._merged("embedding-t")
    assert [r["seed"] for r in clean["runs"]] == [0, 2] and "dirty tree" in capsys.readouterr().err
    rows = summarise(clean)
    assert rows[0]["n_seeds"] == 1 and rows[0]["errors"] == ["seed 2: boom"]
    assert rows[0]["commits"] == ["aaaaaaaaaa", "cccccccccc"]
    both = report._merged("embedding-t", allow_dirty=True)
    assert "bbbbbbbbbb+dirty" in summarise(both)[0]["commits"]
    section = report.embedding_section(both)
    assert "bbbbbbbbbb+dirty" in section and "1 failed: seed 2: boom" in section


def test_lm_search_selects_on_the_holdout_and_the_seeds_run_at_the_choice(gpt2_lm, llama_lm, instructions_file,
                                                                         tmp_path, monkeypatch):
    from lmdistill.bench.quality import select

    variants = [Variant("teacher", kind="teacher", group="reference"), Variant("sft", ["method=sft", "method_args={}"]),
                Variant("sft lora", ["method=sft", "method_args={}", "train.lr=1e-3",
                                     "train.lora={r: 2, lora_alpha: 4, target_modules: [q_proj]}"])]
    common = [f"teacher={gpt2_lm}", f"student={llama_lm}", f"data.train=[{instructions_file}]", "data.holdout=1",
              "train.max_steps=3", "train.logging_steps=1", "train.warmup_ratio=0", "train.lr=1e-4"]
    cfg = str(ROOT / "configs/tiny/sra-tiny.yaml")
    out = run_benchmark("lm", cfg, "test", variants, [7, 8], [*common, "data.eval={}"], tmp_path / "results",
                        tmp_path / "work", search_lr=[1, 10])
    assert out.name.startswith("lm-search-test-")
    rec = json.loads(out.read_text())
    pts = [(r["variant"], r["setting"]["train.lr"], r["seed"]) for r in rec["runs"]]
    # no reference rows, one seed, each variant's own learning rate times each factor
    assert pts == [("sft", "0.0001", 7), ("sft", "0.001", 7), ("sft lora", "0.001", 7), ("sft lora", "0.01", 7)]
    assert all(set(r["scores"]) == {"holdout"} for r in rec["runs"])
    chosen = select([rec])
    for name in ("sft", "sft lora"):
        scores = [r["scores"]["holdout"]["bpb"] for r in rec["runs"] if r["variant"] == name]
        assert chosen[name]["score"] == min(scores) and len(chosen[name]["tried"]) == 2
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    monkeypatch.setattr(report, "RESULTS", out.parent)
    merged = report._merged("lm-search-test", allow_dirty=True)  # the points of one seed are not merged into one
    assert len(merged["runs"]) == 4
    section = report.search_section(merged)
    assert f"| sft | 0.0001: {chosen['sft']['tried'][0][1]:.3f}; 0.001: " in section
    assert "times 1, 10" in section and "on 1 training rows held out" in section
    # a failed point is listed, not chosen
    rec["runs"][0] = {**rec["runs"][0], "error": "boom"}
    assert select([rec])["sft"]["chosen"] == rec["runs"][1]["setting"]
    settings = {"sft": {"train.lr": "0.0005"}}
    out2 = run_benchmark("lm", cfg, "test", variants[:2], [7], [*common, f"data.eval={{toy: {instructions_file}}}"],
                         tmp_path / "results", tmp_path / "work", settings=settings, settings_from=[out.name])
    rec2 = json.loads(out2.read_text())
    assert rec2["settings"] == settings and rec2["settings_from"] == [out.name]
    run = next(r for r in rec2["runs"] if r["variant"] == "sft")
    assert run["setting"] == settings["sft"] and set(run["scores"]) == {"toy", "holdout"}
    first = next(r for r in rec["runs"] if r["variant"] == "sft")  # the learning rate really was changed
    lr = [h["learning_rate"] for h in run["log_history"] if "learning_rate" in h]
    lr0 = [h["learning_rate"] for h in first["log_history"] if "learning_rate" in h]
    assert lr and lr[0] == pytest.approx(lr0[0] * 5)


def test_lm_benchmark_with_a_teacher_cache_builds_it_once_and_trains_dskd_online(gpt2_lm, llama_lm, instructions_file,
                                                                                tmp_path, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "cache"))  # data.teacher_cache=auto puts it there
    variants = [Variant("uld", ["method=uld", "method_args={}"]), Variant("dskd", ["method=dskd", "method_args={}"]),
                Variant("sft", ["method=sft", "method_args={}"])]
    common = [f"teacher={gpt2_lm}", f"student={llama_lm}", f"data.train=[{instructions_file}]", "data.holdout=1",
              "train.max_steps=2", "train.warmup_ratio=0", "data.eval={}", "data.teacher_cache=auto"]
    out = run_benchmark("lm", str(ROOT / "configs/tiny/sra-tiny.yaml"), "test", variants, [7], common,
                        tmp_path / "results", tmp_path / "work", search_lr=[1, 2])
    text = out.read_text()
    assert str(tmp_path / "cache") not in text and str(tmp_path / "work") not in text  # no machine's paths
    runs = json.loads(text)["runs"]
    assert all("error" not in r for r in runs), [r.get("error") for r in runs]
    source = {(r["variant"], r["setting"]["train.lr"]): r["teacher_source"] for r in runs}
    assert set(source.values()) == {"cache", "online", None}
    assert [s for (v, _), s in source.items() if v == "uld"] == ["cache", "cache"]
    assert [s for (v, _), s in source.items() if v == "dskd"] == ["online", "online"]
    uld = [r["teacher_cache"] for r in runs if r["variant"] == "uld"]
    assert uld[0] == uld[1] and uld[0]["rows"] >= 1 and uld[0]["bytes"] > 0  # one cache, read by both points
    assert uld[0]["folder"].startswith("<cache>/lm-teacher/token-level-")


def test_every_row_name_can_be_named_on_the_command_line():
    """--only and --methods split on commas: no variant or speed row may contain one."""
    from lmdistill.bench.quality import EMBEDDING_VARIANTS, LM_VARIANTS
    from lmdistill.bench.speed import EMB_METHODS, LM_METHODS

    names = [v.name for v in LM_VARIANTS + EMBEDDING_VARIANTS] + EMB_METHODS + LM_METHODS
    assert not [n for n in names if "," in n]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import lm_quality

    assert "," not in lm_quality.cache_variant(64).name


def test_records_before_the_default_changed_are_read_under_todays_names(tmp_path, monkeypatch):
    """Until variant names v2 "sra" was the summed span logit KL; the averaged form is now SRA's
    default and takes the name: an old record must not be read as today's default."""
    from lmdistill.bench.quality import SRA_SUMMED, current_names

    def run(variant, group, bpb):
        return {"variant": variant, "group": group, "seed": 42, "kind": "train", "setting": {"train.lr": "0.001"},
                "scores": {"holdout": {"rougeL": None, "bpb": bpb}}, "seconds_per_step": 1.0}

    old = {"kind": "lm", "settings": {"sra": {"train.lr": "0.001"}, "sft": {"train.lr": "0.0003"}},
           "runs": [run("sra", "method", 1.56), run("sra: span logit KL averaged over spans", "ablation", 1.54),
                    run("sra: no span logit term", "ablation", 1.61)]}
    now = current_names(old)
    assert [(r["variant"], r["group"]) for r in now["runs"]] == [
        (SRA_SUMMED, "ablation"), ("sra", "method"), ("sra: no span logit term", "ablation")]
    assert now["settings"] == {SRA_SUMMED: {"train.lr": "0.001"}, "sft": {"train.lr": "0.0003"}}
    assert old["runs"][0]["variant"] == "sra"  # the record read is not changed
    assert current_names(now) is now  # a record under today's names stays as it is
    embedding = {"kind": "embedding", "runs": [run("sra", "method", 1.0)]}
    assert current_names(embedding) is embedding

    # the report reads the old names as today's: "sra" is the averaged form, the summed one is named
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    common = {"preset": "t", "config": "c", "overrides": ["o"], "seeds": [42], "git_commit": "a" * 40,
              "git_dirty": False, "time": "t0", "machine": {"cpus": 2}, "versions": {"torch": "x"}}
    (tmp_path / "lm-search-t-20260101.json").write_text(json.dumps({**common, **old, "search": {"lr_factors": [1]}}))
    merged = report._merged("lm-search-t")
    assert [r["variant"] for r in merged["runs"]] == ["sra", SRA_SUMMED, "sra: no span logit term"]  # methods first


def test_dskd_runs_from_before_its_embedding_scale_fix_keep_a_name_of_their_own():
    """Variant names v3: "dskd" is DSKD with unit-scale teacher embeddings. A DSKD run of an older
    record, v1 or v2, is read under its own name, in its own group, and so is its search's choice."""
    from lmdistill.bench.quality import DSKD_BEFORE_FIX, SRA_SUMMED, VARIANT_NAMES, current_names, select

    def run(variant, bpb):
        return {"variant": variant, "group": "method", "seed": 42, "kind": "train", "setting": {"train.lr": "0.001"},
                "scores": {"holdout": {"rougeL": None, "bpb": bpb}}}

    v2 = {"kind": "lm", "variant_names": 2, "settings": {"dskd": {"train.lr": "0.001"}},
          "runs": [run("dskd", 1.92), run("sra", 1.78)]}
    v1 = {"kind": "lm", "runs": [run("sra", 1.86), run("dskd", 1.99)]}
    for rec, want in ((v2, [DSKD_BEFORE_FIX, "sra"]), (v1, [SRA_SUMMED, DSKD_BEFORE_FIX])):
        now = current_names(rec)
        assert [r["variant"] for r in now["runs"]] == want and now["variant_names"] == VARIANT_NAMES
        assert {r["variant"]: r["group"] for r in now["runs"]}[DSKD_BEFORE_FIX] == "superseded"
    assert current_names(v2)["settings"] == {DSKD_BEFORE_FIX: {"train.lr": "0.001"}}
    v3 = {"kind": "lm", "variant_names": 3, "runs": [run("dskd", 1.70)]}
    chosen = select([current_names(r) for r in (v1, v2, v3)])
    assert chosen["dskd"]["score"] == 1.70 and chosen[DSKD_BEFORE_FIX]["score"] == 1.92  # never mixed


def test_sra_defaults_to_the_averaged_span_kl_and_the_authors_regime_keeps_the_sum():
    """The default is the dev split's choice; the authors' regime (config and benchmark row) is the
    paper's summed span logit KL, and the config is the recipe with exactly the row's settings."""
    from lmdistill.bench.quality import LM_VARIANTS, SRA_AUTHORS, SRA_SUMMED
    from lmdistill.config import load_config
    from lmdistill.methods.llm.sra import SRAOptions

    assert SRAOptions().logit_reduction == "mean"
    assert SRA_AUTHORS["method_args"]["logit_reduction"] == "sum"
    assert "method_args.logit_reduction=sum" in {v.name: v for v in LM_VARIANTS}[SRA_SUMMED].overrides
    configs = ROOT / "configs"
    authors = load_config(configs / "sra-authors-gemma270m-to-smollm2.yaml").to_dict()
    row = {v.name: v for v in LM_VARIANTS}["sra: authors' regime"].overrides
    recipe = load_config(configs / "sra-gemma270m-to-smollm2.yaml", row).to_dict()
    assert authors.pop("output_dir") != recipe.pop("output_dir")
    assert authors == recipe


def test_a_method_searched_later_joins_its_protocols_table(tmp_path, monkeypatch):
    """Records of one protocol written before and after a method's (re)search differ in their
    settings by that method only: they make one table. A record whose choice for a variant they
    share differs is another protocol."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    common = {"kind": "lm", "variant_names": 3, "preset": "t", "config": "c", "overrides": ["o"], "seeds": [42],
              "git_commit": "a" * 40, "git_dirty": False, "machine": {"cpus": 2}, "versions": {"torch": "x"}}

    def rec(stamp, settings, variant):
        run = {"variant": variant, "group": "method", "seed": 42, "kind": "train",
               "scores": {"holdout": {"rougeL": None, "bpb": 1.5}}}
        (tmp_path / f"lm-t-{stamp}.json").write_text(json.dumps({**common, "time": stamp, "settings": settings,
                                                                 "runs": [run]}))

    rec("20260101", {"sft": {"train.lr": "0.0003"}}, "sft")
    rec("20260102", {"sft": {"train.lr": "0.0003"}, "dskd": {"train.lr": "0.001"}}, "dskd")
    rec("20260103", {"sft": {"train.lr": "0.001"}}, "sft")
    tables = report._protocols("lm-t")
    assert [sorted(r["variant"] for r in t["runs"]) for t in tables] == [["sft"], ["dskd", "sft"]]
