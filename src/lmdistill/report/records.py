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


def fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    """``mean ± std`` (or ``-``)."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot_score_vs_cost(points: list[tuple[str, float, float]], xlabel: str, ylabel: str, title: str,
                       path: str | Path) -> Path:
    """A PNG: one point per method, score against seconds per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, x, y in points:
        ax.scatter([x], [y], s=36)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
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
