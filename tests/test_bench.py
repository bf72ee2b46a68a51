import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmdistill.bench.quality import Variant, run_benchmark, summarise
from lmdistill.report.records import markdown_table, plot_score_vs_cost, update_readme

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_json(gpt2_lm, llama_lm, instructions_file):
    r = subprocess.run([sys.executable, "-m", "lmdistill", "bench", "speed", "--pair", "lm", "--methods",
                        "sft,sra,sra+cache,uld+cache,sft+gc",
                        "--steps", "2", "--json", "--set", f"student={gpt2_lm}", "--set", f"teacher={llama_lm}",
                        "--set", f"data.train=[{instructions_file}]"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert set(res["methods"]) == {"sft", "sra", "sra+cache", "uld+cache", "sft+gc"}
    assert all(m["ratio_to_sft"] > 0 and m["peak_to_sft"] > 0 for m in res["methods"].values())
    assert res["floor"]["s_per_step"] > 0 and res["floor"]["peak_mb"] > 0
    for m in res["methods"].values():
        assert m["ratio"] > 0 and m["peak_mb"] > 0 and m["s_per_step_sd"] is not None and m["s_min"] <= m["s_max"]


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
