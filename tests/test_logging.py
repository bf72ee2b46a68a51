"""Training logs where users look for them: TensorBoard scalars per loss term, and `lmdistill report`."""

import json
from pathlib import Path

import pytest

from lmdistill.cli import main
from lmdistill.errors import LmdistillError

ROOT = Path(__file__).resolve().parents[1]
SRA_TERMS = {"loss", "ce", "span", "geo", "logit"}


@pytest.fixture(scope="module")
def sra_run(gpt2_lm, llama_lm, instructions_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", str(ROOT / "configs/tiny/sra-tiny.yaml"), f"student={llama_lm}", f"teacher={gpt2_lm}",
               f"data.train=[{instructions_file}]", "data.eval={}", "train.max_steps=4", "train.logging_steps=1",
               "train.save_steps=2", "train.report_to=[tensorboard]", f"output_dir={out}"])
    assert rc == 0
    return out


def test_tensorboard_gets_every_loss_term_as_its_own_scalar(sra_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((sra_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no event file in OUTPUT_DIR/tensorboard"
    acc = EventAccumulator(str(sra_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{t}" for t in SRA_TERMS | {"grad_norm", "learning_rate"}} <= tags, tags
    logged = [h for h in json.loads((sra_run / "metrics.json").read_text())["log_history"] if "loss" in h]
    span = [e.value for e in acc.Scalars("train/span")]
    assert span == pytest.approx([h["span"] for h in logged], rel=1e-5)  # the same numbers as metrics.json


def test_report_draws_each_logged_term_from_metrics_or_the_latest_checkpoint(sra_run, tmp_path, capsys):
    from lmdistill.report.curves import plot_run

    assert main(["report", str(sra_run)]) == 0
    png = sra_run / "loss_curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in capsys.readouterr().out
    _, terms = plot_run(sra_run, tmp_path / "a.png")
    assert set(terms) == SRA_TERMS and terms[0] == "loss"
    # a run still training (no metrics.json yet): the latest checkpoint's history, up to its step
    (sra_run / "metrics.json").rename(tmp_path / "metrics.json")
    try:
        _, terms = plot_run(sra_run, tmp_path / "b.png")
        assert set(terms) == SRA_TERMS
    finally:
        (tmp_path / "metrics.json").rename(sra_run / "metrics.json")
    with pytest.raises(LmdistillError, match="no metrics.json and no checkpoint"):
        plot_run(tmp_path / "empty")


def test_tensorboard_missing_is_a_clear_error(monkeypatch, gpt2_lm, llama_lm, instructions_file, tmp_path):
    import lmdistill.train.base as base

    monkeypatch.setattr(base, "is_tensorboard_available", lambda: False)
    from lmdistill.config import load_config
    from lmdistill.train.lm import run_lm

    cfg = load_config(ROOT / "configs/tiny/sra-tiny.yaml", [
        f"student={llama_lm}", f"teacher={gpt2_lm}", f"data.train=[{instructions_file}]", "data.eval={}",
        "train.max_steps=1", "train.report_to=tensorboard", f"output_dir={tmp_path}"])
    with pytest.raises(LmdistillError, match=r"pip install 'lmdistill\[tensorboard\]'"):
        run_lm(cfg, progress=False)
