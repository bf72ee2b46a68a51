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
                        tmp_path / "results", tmp_path / "work")
    rec = json.loads(out.read_text())
    assert rec["git_commit"] is not None and rec["machine"]["cpus"] >= 1 and rec["versions"]["torch"]
    rows = {r["variant"]: r for r in summarise(rec)}
    assert rows["talas"]["n_seeds"] == 2 and rows["teacher"]["n_seeds"] == 1
    assert set(rows["talas"]) >= {"toy", "again"}  # an extra evaluation file is one more column
    assert rows["broken"]["errors"] and "out of range" in rows["broken"]["errors"][0]
    png = plot_score_vs_cost([("a", 1.0, 2.0), ("b", 2.0, 3.0)], "x", "y", "t", tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert markdown_table(["a", "b"], [["1", "2"]]).splitlines()[1] == "|---|---|"
    readme = tmp_path / "R.md"
    readme.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\ny\n")
    update_readme(readme, "new table")
    assert readme.read_text() == "x\n<!-- results:start -->\nnew table\n<!-- results:end -->\ny\n"
