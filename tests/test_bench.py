import json
import subprocess
import sys
from pathlib import Path

from lmdistill.bench.quality import Variant, run_benchmark, summarise
from lmdistill.report.records import markdown_table, plot_score_vs_cost, update_readme

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_json(gpt2_lm, llama_lm, instructions_file):
    r = subprocess.run([sys.executable, "-m", "lmdistill", "bench", "speed", "--pair", "lm", "--methods", "sra,uld,sft+gc",
                        "--steps", "2", "--json", "--set", f"student={gpt2_lm}", "--set", f"teacher={llama_lm}",
                        "--set", f"data.train=[{instructions_file}]"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert set(res["methods"]) == {"sra", "uld", "sft+gc"}
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
    png = plot_score_vs_cost([("a", 1.0, 2.0), ("b", 2.0, 3.0)], "x", "y", "t", tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert markdown_table(["a", "b"], [["1", "2"]]).splitlines()[1] == "|---|---|"
    readme = tmp_path / "R.md"
    readme.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\ny\n")
    update_readme(readme, "new table")
    assert readme.read_text() == "x\n<!-- results:start -->\nnew table\n<!-- results:end -->\ny\n"


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
