"""A run's loss curves as a PNG, from its logged history (``lmdistill report RUN_DIR``).

The history is ``metrics.json``'s ``log_history`` for a finished run, or the latest
checkpoint's ``trainer_state.json`` for one still training (or stopped): no TensorBoard is
needed to look at a run.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmdistill.errors import LmdistillError

# logged beside the loss terms, drawn in panels of their own (or not at all)
NOT_TERMS = {"epoch", "step", "learning_rate", "grad_norm", "nonfinite_steps", "shared_mass", "align_ratio"}


def run_history(run_dir: str | Path) -> tuple[list[dict], str]:
    """``(log_history, where it came from)`` of a run folder."""
    from lmdistill.train.base import latest_checkpoint

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text()).get("log_history", []), str(metrics)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt:
        state = Path(ckpt) / "trainer_state.json"
        return json.loads(state.read_text()).get("log_history", []), str(state)
    raise LmdistillError(f"{str(run_dir)!r} has no metrics.json and no checkpoint: give a run's output_dir")


def loss_terms(history: list[dict]) -> list[str]:
    """The logged loss terms, ``loss`` first, in the order they first appear."""
    names: dict[str, None] = {}
    for entry in history:
        if "loss" not in entry:  # the end-of-training summary and evaluation entries
            continue
        for k, v in entry.items():
            if k not in NOT_TERMS and isinstance(v, (int, float)):
                names[k] = None
    return sorted(names, key=lambda k: k != "loss")


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> tuple[Path, list[str]]:
    """Draw every loss term against the optimizer step (one line each), with the gradient
    norm and the learning rate below; ``(png path, terms drawn)``. Default path:
    ``RUN_DIR/loss_curves.png``, next to ``metrics.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, source = run_history(run_dir)
    rows = [e for e in history if "loss" in e and "step" in e]
    terms = loss_terms(rows)
    if not rows:
        raise LmdistillError(f"{source} has no logged training steps yet: lower train.logging_steps or wait")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.0, 6.0), dpi=120, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.4]})
    values = []
    for name in terms:
        pts = [(e["step"], e[name]) for e in rows if isinstance(e.get(name), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None,
                lw=2.0 if name == "loss" else 1.2, label=name)
        values += [p[1] for p in pts]
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 50:
        ax.set_yscale("log")  # terms on very different scales (e.g. a summed KL beside the CE)
    ax.set_ylabel("loss term")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    ax.set_title(f"{Path(run_dir).name}: loss terms per logging step", fontsize=10)
    steps = [e["step"] for e in rows]
    if any("grad_norm" in e for e in rows):
        ax2.plot([e["step"] for e in rows if "grad_norm" in e], [e["grad_norm"] for e in rows if "grad_norm" in e],
                 color="tab:gray", label="grad_norm")
        ax2.set_ylabel("grad norm")
    if any("learning_rate" in e for e in rows):
        lr_ax = ax2.twinx()
        lr_ax.plot(steps, [e.get("learning_rate", float("nan")) for e in rows], color="tab:green", ls="--",
                   label="learning_rate")
        lr_ax.set_ylabel("learning rate")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path) if path else Path(run_dir) / "loss_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path, terms
