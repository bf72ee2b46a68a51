"""The demo: TALAS from all-mpnet-base-v2 into all-MiniLM-L6-v2 cut to layers 0, 2, 4.

Runs ``configs/talas-mpnet-to-minilm-l3.yaml`` (the same recipe is built in here, so the
demo also works from an installed package) and prints the student's STS-B and SICK-R test
Spearman before and after, next to the teacher's. Without a local data folder, the same
data sets come from the hub.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmdistill.config import data_dir, load_config

REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "talas-mpnet-to-minilm-l3.yaml"
HUB_DATA = {
    "train": ["sentence-transformers/stsb:train", "sentence-transformers/sick:train"],
    "eval": {"stsb_test": "sentence-transformers/stsb:test", "sickr_test": "sentence-transformers/sick:test"},
}


def demo_config(output_dir: str, extra: list[str] | tuple[str, ...] = ()):
    """The demo's config: the repository's recipe, with hub data when no local data folder exists
    (``extra``: further ``key=value`` overrides, applied last; the tests run the demo on tiny models)."""
    overrides = [f"output_dir={output_dir}"]
    if REPO_CONFIG.exists():
        cfg = load_config(REPO_CONFIG, overrides + list(extra))
    else:  # installed without the repository: the same recipe
        cfg = load_config(None, [
            "task=embedding", "method=talas", "teacher=pkg:all-mpnet-base-v2", "student=pkg:all-minilm-l6-v2",
            "student_layers=[0,2,4]", "data.max_examples=8000", "data.max_length=64", "train.epochs=3",
            "train.batch_size=32", "train.lr=3e-4", "train.projector_lr=3e-3", "train.save_steps=50",
            "data.train=[ud_ewt_text/en_ewt-train.txt,stsb/stsb-en-train.csv,sick/SICK_train.txt]",
            "data.eval={stsb_test: stsb/stsb-en-test.csv, sickr_test: sick/SICK_test_annotated.txt}",
        ] + overrides + list(extra))
    if data_dir(cfg) is None and not any(e.startswith("data.") for e in extra):
        cfg.data.train = list(HUB_DATA["train"])
        cfg.data.eval = dict(HUB_DATA["eval"])
    return cfg


def run_demo(output_dir: str = "runs/demo", extra: list[str] | tuple[str, ...] = ()) -> dict:
    """Run the demo and print its result table."""
    from lmdistill.train.embedding import run_embedding

    cfg = demo_config(output_dir, extra)
    print(f"lmdistill demo: TALAS, teacher {cfg.teacher} -> student {cfg.student} layers {cfg.student_layers}")
    print(f"  {cfg.data.max_examples} training sentences, {cfg.train.epochs:g} epoch(s), batch {cfg.train.batch_size}, "
          f"max length {cfg.data.max_length}, optimizer {cfg.train.optimizer}")
    t0 = time.time()
    m = run_embedding(cfg)
    rows = [("teacher", m.get("teacher_scores", {})), ("student before", m.get("before", {})),
            ("student after", m.get("after", {}))]
    names = list(cfg.data.eval)
    print()
    print(f"{'STS Spearman x100':20s}" + "".join(f"{n:>14s}" for n in names))
    for label, scores in rows:
        print(f"{label:20s}" + "".join(f"{scores.get(n, {}).get('spearman', float('nan')):14.2f}" for n in names))
    gain = {n: m["after"][n]["spearman"] - m["before"][n]["spearman"] for n in names}
    print(f"{'gain':20s}" + "".join(f"{gain[n]:+14.2f}" for n in names))
    print()
    print(f"student saved to {m['student_dir']} (loads with SentenceTransformer(path))")
    print(f"{m['steps']} steps at {m['seconds_per_step']:.2f} s/step; whole demo {time.time() - t0:.0f} s")
    return m
