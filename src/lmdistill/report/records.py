"""Benchmark records.

Each benchmark run writes one JSON file (machine, versions, git commit, config, every
number); tables, plots and the README's results section are generated from those files only.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

START = "<!-- results:start -->"
END = "<!-- results:end -->"


def environment() -> dict:
    """Machine, library versions and the git commit of the working tree."""
    import torch
    import transformers

    try:
        import sentence_transformers

        st_version = sentence_transformers.__version__
    except ImportError:  # pragma: no cover
        st_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).resolve().parent).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "sentence_transformers": st_version},
        "git_commit": commit, "git_dirty": dirty,
    }


def fmt(mean: float | None, std: float | None = None, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` (or ``-``); ``signed``: with its sign always (``+0.12``), for differences."""
    if mean is None:
        return "-"
    return f"{mean:{'+' if signed else ''}.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def spread_labels(ys: list[float], min_gap: float, xs: list[float] | None = None, x_gap: float = 0.0) -> list[float]:
    """Label heights near ``ys`` with at least ``min_gap`` between neighbours (order kept), so
    that labels of close points do not overlap. With ``xs``, only points closer than ``x_gap``
    in x (chains of them) are spread against each other; the others keep their height."""
    n = len(ys)
    group = [0] * n if xs is None else list(range(n))
    if xs is not None:
        by_x = sorted(range(n), key=lambda i: xs[i])
        for a, b in zip(by_x, by_x[1:]):
            if xs[b] - xs[a] < x_gap:
                group[b] = group[a]
    out = list(ys)
    for g in set(group):
        members = sorted((i for i in range(n) if group[i] == g), key=lambda i: ys[i])
        placed = {members[0]: ys[members[0]]}
        for prev, i in zip(members, members[1:]):
            placed[i] = max(ys[i], placed[prev] + min_gap)
        shift = sum(placed[i] - ys[i] for i in members) / len(members)  # centred on the points again
        for i in members:
            out[i] = placed[i] - shift
    return out


def plot_score_vs_cost(points: list[tuple], xlabel: str, ylabel: str, title: str, path: str | Path,
                       references: list[tuple[str, float]] = ()) -> Path:
    """A PNG: one point per method, score against seconds per step, with its spread over seeds
    as an error bar (``(name, x, y)`` or ``(name, x, y, sd)``), and each reference (the teacher,
    the untrained student) as a labelled horizontal line. Labels are spread so they do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    ys = [p[2] for p in points] + [y for _, y in references]
    span = (max(ys) - min(ys)) if len(ys) > 1 else 1.0
    for _, y in references:
        ax.axhline(y, ls="--", lw=1, color="0.45")
    for p in points:
        sd = p[3] if len(p) > 3 else None
        ax.errorbar([p[1]], [p[2]], yerr=[sd] if sd else None, fmt="o", ms=5, capsize=3)
    xs = [p[1] for p in points]
    x_range = (max(xs) - min(xs)) if xs else 0.0
    label_y = spread_labels([p[2] for p in points], 0.045 * (span or 1.0), xs, 0.12 * x_range)
    for p, ly in zip(points, label_y):
        ax.annotate(p[0], (p[1], p[2]), xytext=(p[1] + 0.025 * (x_range or 1.0), ly), textcoords="data", fontsize=7.5,
                    xycoords="data", ha="left", va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.6"} if abs(ly - p[2]) > 1e-12 else None)
    if references:
        ref_y = spread_labels([y for _, y in references], 0.045 * (span or 1.0))
        for (name, _), ly in zip(references, ref_y):
            ax.annotate(name, (1.0, ly), xycoords=("axes fraction", "data"), xytext=(-3, 2), textcoords="offset points",
                        ha="right", va="bottom", fontsize=7.5, color="0.3")
    if xs:  # room on the right for the labels
        lo, hi = min(xs), max(xs)
        pad = (hi - lo) or max(hi, 1e-9)
        ax.set_xlim(lo - 0.1 * pad, hi + 0.6 * pad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def update_readme(readme: str | Path, section: str) -> None:
    """Replace the text between the results markers of the README with ``section``."""
    readme = Path(readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + section.strip() + "\n" + END + tail)


def load_results(folder: str | Path, kind: str) -> list[dict]:
    """Every result JSON of ``kind`` in ``folder``, oldest first."""
    out = []
    for f in sorted(Path(folder).glob(f"{kind}-*.json")):
        out.append(json.loads(f.read_text()))
    return out
