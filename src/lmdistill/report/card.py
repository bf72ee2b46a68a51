"""The model card written next to every trained student (``OUTPUT_DIR/student/README.md``), as
sentence-transformers and TRL write theirs: YAML front matter the hub renders (``base_model``,
``library_name``, ``tags``), then what a reader needs to trust and reuse the student: teacher,
method and options, data files with their hashes, budget, every score before and after next
to the teacher's, the lmdistill version and commit, and how to load it without lmdistill.
Everything on the card is read from the run's ``metrics.json`` dictionary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

# hub ids of the models that ship in packages (``pkg:NAME``)
HUB_IDS = {
    "pkg:all-mpnet-base-v2": "sentence-transformers/all-mpnet-base-v2",
    "pkg:all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "pkg:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "pkg:gemma-3-270m": "google/gemma-3-270m",
}


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a local file (``None`` for a hub dataset name)."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_file_hashes(cfg) -> dict[str, str | None]:
    """``{training file as configured: sha256}`` of a run's training data."""
    from lmdistill.config import resolve_data_path

    return {str(src): file_sha256(resolve_data_path(src, cfg)) for src in cfg.data.train}


def _hub(ref: str | None) -> str | None:
    return HUB_IDS.get(ref or "", ref)


def _scores_table(metrics: dict) -> str:
    rows = []
    cols = [("teacher", metrics.get("teacher_scores") or {}), ("before", metrics.get("before") or {}),
            ("after", metrics.get("after") or {})]
    names = list(dict.fromkeys(n for _, d in cols for n in d))
    for name in names:
        keys = list(dict.fromkeys(k for _, d in cols for k, v in (d.get(name) or {}).items()
                                  if isinstance(v, (int, float)) and k not in ("n", "max_new_tokens", "greedy")))
        for key in keys:
            cells = [str((d.get(name) or {}).get(key, "-")) for _, d in cols]
            rows.append(f"| {name} | {key} | " + " | ".join(cells) + " |")
    if not rows:
        return "No evaluation ran."
    return "| evaluation | metric | teacher | student before | student after |\n|---|---|---|---|---|\n" + "\n".join(rows)


def model_card(metrics: dict) -> str:
    """The card's Markdown (front matter included) for a run's metrics."""
    from lmdistill import __version__
    from lmdistill.report.records import environment

    cfg = metrics.get("config") or {}
    task = metrics.get("task", cfg.get("task"))
    library = "sentence-transformers" if task == "embedding" else "transformers"
    env = environment()
    front = {"base_model": _hub(metrics.get("student")), "library_name": library,
             "tags": ["lmdistill", "distillation", f"lmdistill-{metrics.get('method')}",
                      "sentence-similarity" if task == "embedding" else "text-generation"]}
    if task != "embedding":
        front["pipeline_tag"] = "text-generation"
    data = metrics.get("data_files") or {}
    train = cfg.get("train") or {}
    layers = metrics.get("student_layers") or cfg.get("student_layers")
    load = ("from sentence_transformers import SentenceTransformer\nmodel = SentenceTransformer(PATH)"
            if task == "embedding" else
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {metrics.get('method')} student of {_hub(metrics.get('teacher'))}", "",
        f"Distilled with lmdistill {__version__} (commit {str(env.get('git_commit'))[:10]}"
        f"{', dirty tree' if env.get('git_dirty') else ''}) by **{metrics.get('method')}** from the teacher "
        f"`{metrics.get('teacher')}` into the student `{metrics.get('student')}`"
        + (f" reduced to layers {layers}" if layers else "") + ".", "",
        "## Method and options", "",
        "```json", json.dumps(metrics.get("method_options", cfg.get("method_args")) or {}, indent=1, sort_keys=True),
        "```", "",
        "## Data and budget", "",
        "| file | sha256 |", "|---|---|",
        *[f"| {name} | `{digest or '(hub dataset)'}` |" for name, digest in data.items()],
        "",
        f"{metrics.get('n_train')} training examples, {metrics.get('steps')} optimizer steps of batch "
        f"{train.get('batch_size')} x accumulation {train.get('grad_accum')}, lr {train.get('lr')}, optimizer "
        f"{train.get('optimizer')}, max length {(cfg.get('data') or {}).get('max_length')}; "
        f"{metrics.get('seconds_per_step')} s per step.", "",
        "## Scores", "", _scores_table(metrics), "",
        "## Load it (no lmdistill needed)", "", "```python", load.replace("PATH", '"path/to/this/folder"'), "```", "",
    ]
    return "\n".join(lines)


def write_model_card(student_dir: str | Path, metrics: dict) -> Path:
    """Write ``README.md`` into the student folder (replacing the library's generic card)."""
    path = Path(student_dir) / "README.md"
    path.write_text(model_card(metrics), encoding="utf-8")
    return path
