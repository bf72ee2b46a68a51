import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmdistill", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT)


def one_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_train_cache_and_eval_end_to_end(tiny_st, tiny_st_student, sentences_file, sts_file, tmp_path):
    common = [f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]"]
    r = run("cache", "configs/tiny/talas-tiny.yaml", *common)
    assert r.returncode == 0, r.stderr
    assert "teacher cache ready: 64 sentences x 48 dims" in r.stdout
    out = tmp_path / "run"
    r = run("train", "configs/tiny/talas-tiny.yaml", *common, f"output_dir={out}", f"data.eval={{toy: {sts_file}}}")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "after" in metrics and (out / "student" / "modules.json").exists()
    assert "%|" in r.stderr  # progress bars
    r = run("eval", "sts", "--model", out / "student", "--data", sts_file, "--json")
    assert r.returncode == 0, r.stderr
    res = one_json(r.stdout)
    assert res["n"] == 6 and -100 <= res["spearman"] <= 100
    assert res["spearman"] == metrics["after"]["toy"]["spearman"]


def test_lm_commands_end_to_end(gpt2_lm, llama_lm, instructions_file, tmp_path):
    r = run("train", "configs/tiny/sra-tiny.yaml", f"student={gpt2_lm}", f"teacher={llama_lm}",
            f"data.train=[{instructions_file}]", f"data.eval={{toy: {instructions_file}}}", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and {"rougeL", "bpb", "bpb_pooled"} <= set(metrics["after"]["toy"])
    assert metrics["shared_vocab"]["pairs"] > 1000
    assert 0 < metrics["shared_vocab"]["teacher_mass_in_shared"] <= 1
    r = run("eval", "rouge", "--model", tmp_path / "student", "--data", instructions_file, "--max-new-tokens", "4",
            "--seeds", "10,20", "--limit", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = one_json(r.stdout)
    assert res["n"] == 2 and len(res["per_seed"]) == 2
    r = run("eval", "bpb", "--model", tmp_path / "student", "--data", instructions_file, "--json")
    assert r.returncode == 0, r.stderr
    res = one_json(r.stdout)
    assert set(res) == {"bpb", "bpb_pooled", "n"} and res["bpb"] > 0
    r = run("sft", "configs/tiny/sra-tiny.yaml", f"student={gpt2_lm}", f"data.train=[{instructions_file}]",
            f"output_dir={tmp_path / 'sft'}", "data.eval={}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sft" / "student" / "config.json").exists()


def test_errors_are_one_line_and_nonzero(tmp_path, sentences_file):
    cases = [
        (["train", "configs/tiny/talas-tiny.yaml", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train", tmp_path / "missing.yaml"], "not found"),
        (["train", "configs/tiny/talas-tiny.yaml", "method=nope"], "unknown embedding method 'nope'"),
        (["eval", "sts", "--model", tmp_path, "--data", tmp_path / "none.tsv"], "not found"),
        (["train", "configs/tiny/talas-tiny.yaml", f"data.train=[{tmp_path / 'absent.txt'}]"], "not found"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and message in err[0], r.stderr


def test_demo_code_path_on_tiny_models(tiny_st, tiny_st_student, sentences_file, sts_file, tmp_path, capsys):
    """`make demo` runs run_demo(): the same code on tiny models, 4 steps, its table printed."""
    from lmdistill.demo import demo_config, run_demo

    cfg = demo_config(str(tmp_path))
    assert cfg.method == "talas" and cfg.student_layers == [0, 2, 4] and cfg.teacher == "pkg:all-mpnet-base-v2"
    m = run_demo(str(tmp_path), [f"teacher={tiny_st}", f"student={tiny_st_student}", "student_layers=[0,2]",
                                 f"data.train=[{sentences_file}]", f"data.eval={{stsb_test: {sts_file}}}",
                                 "data.max_examples=null", "train.max_steps=4", "train.epochs=1", "train.save_steps=0"])
    out = capsys.readouterr().out
    assert m["steps"] == 4 and (tmp_path / "student" / "modules.json").exists()
    for label in ("teacher", "student before", "student after", "gain"):
        assert label in out
    after = m["after"]["stsb_test"]["spearman"]
    assert f"{after:.2f}" in out and f"student saved to {m['student_dir']}" in out


def test_the_student_folder_carries_a_model_card_that_matches_the_metrics(gpt2_lm, llama_lm, instructions_file,
                                                                         tmp_path):
    import yaml

    from lmdistill.config import load_config
    from lmdistill.report.card import file_sha256
    from lmdistill.train.lm import run_lm

    cfg = load_config(ROOT / "configs/tiny/sra-tiny.yaml", [
        f"student={llama_lm}", f"teacher={gpt2_lm}", f"data.train=[{instructions_file}]",
        f"data.eval={{toy: {instructions_file}}}", f"output_dir={tmp_path}", "train.max_steps=2", "eval.before=true"])
    m = run_lm(cfg, progress=False)
    card = (tmp_path / "student" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(llama_lm) and front["library_name"] == "transformers"
    assert "lmdistill" in front["tags"] and "lmdistill-sra" in front["tags"]
    assert m["data_files"] == {str(instructions_file): file_sha256(instructions_file)}
    assert file_sha256(instructions_file) in card and f"{m['steps']} optimizer steps" in card
    for key in ("rougeL", "bpb"):  # every score, before and after, as metrics.json has it
        row = next(line for line in card.splitlines() if line.startswith(f"| toy | {key} |"))
        assert f"| {m['before']['toy'][key]} | {m['after']['toy'][key]} |" in row
    assert '"alpha": 0.5' in card and "AutoModelForCausalLM.from_pretrained" in card
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data_files"] == m["data_files"]


def test_a_distributed_replica_exits_at_once_with_its_commands_code(monkeypatch, tmp_path, capsys):
    """Under a distributed launch (WORLD_SIZE > 1) the command ends the process at once with the
    command's own exit code, skipping interpreter shutdown (where a replica aborted now and then
    after its work was saved); a plain process exits normally, and main() never exits."""
    from lmdistill import cli

    exits = []

    class Exited(Exception):
        pass

    def exit_now(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(cli, "_exit_now", exit_now)
    monkeypatch.setattr(sys, "argv", ["lmdistill", "train", str(tmp_path / "missing.yaml")])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as plain:
        cli.run()
    assert plain.value.code == 2 and exits == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited):
        cli.run()
    assert exits == [2]
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2 and exits == [2]  # main only returns
    assert "error:" in capsys.readouterr().err
