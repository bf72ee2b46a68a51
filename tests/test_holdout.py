"""The held-out selection split (``data.holdout``): one fixed draw, never trained on, scored by bits per byte."""

import json
from pathlib import Path

import pytest

from lmdistill.config import load_config
from lmdistill.data.readers import read_instructions
from lmdistill.errors import LmdistillError
from lmdistill.train.lm import run_lm, split_holdout

ROOT = Path(__file__).resolve().parents[1]


def test_the_draw_is_fixed_disjoint_and_keeps_order():
    rows = list(range(50))
    train, held = split_holdout(rows, 10)
    assert split_holdout(rows, 10) == (train, held)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == rows
    assert train == sorted(train) and held != list(range(10))  # a draw, not the first rows


@pytest.mark.parametrize("n", [0, 4, 5])
def test_holding_out_everything_or_nothing_is_refused(n):
    with pytest.raises(LmdistillError, match="hold out fewer"):
        split_holdout(list(range(4)), n)


def test_a_run_never_trains_on_the_holdout_and_scores_it(gpt2_lm, llama_lm, instructions_file, tmp_path):
    runs = {}
    for seed in (1, 2):
        out = tmp_path / f"s{seed}"
        cfg = load_config(ROOT / "configs/tiny/sra-tiny.yaml", [
            f"student={llama_lm}", f"teacher={gpt2_lm}", f"data.train=[{instructions_file}]", "data.holdout=1",
            "method=sft", "method_args={}",
            f"data.eval={{toy: {instructions_file}}}", f"output_dir={out}", "train.max_steps=1",
            f"train.seed={seed}"])
        runs[seed] = (run_lm(cfg, progress=False), read_instructions(out / "holdout.jsonl"))
    m, held = runs[1]
    assert runs[2][1] == held  # the same split whatever the training seed
    assert m["n_train"] == 3 and len(held) == 1
    assert held[0] in read_instructions(instructions_file)
    assert set(m["after"]["holdout"]) >= {"bpb"} and "rougeL" not in m["after"]["holdout"]
    assert "rougeL" in m["after"]["toy"]  # the reported sets keep ROUGE-L
    assert json.loads((tmp_path / "s1" / "metrics.json").read_text())["after"]["holdout"] == m["after"]["holdout"]
