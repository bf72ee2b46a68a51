"""STS through MTEB with local data injected (``pip install lmdistill[mteb]``).

MTEB's STS tasks normally download their data; here the task's dataset is replaced by the
pairs read from a local file, so MTEB's own evaluator computes the scores offline.
"""

from __future__ import annotations

from pathlib import Path

from lmdistill.data.readers import read_sts
from lmdistill.errors import LmdistillError


def mteb_sts(model, path: str | Path, task_name: str = "STSBenchmark") -> dict:
    """MTEB's cosine Spearman (x100) of ``model`` on the STS file at ``path``."""
    try:
        import mteb
        from datasets import Dataset, DatasetDict
    except ImportError as exc:
        raise LmdistillError("MTEB is an optional extra: pip install 'lmdistill[mteb]'") from exc
    pairs = read_sts(path)
    lo, hi = min(p.score for p in pairs), max(p.score for p in pairs)
    task = mteb.get_task(task_name)
    split = task.metadata.eval_splits[0]
    ds = Dataset.from_dict({
        "sentence1": [p.s1 for p in pairs],
        "sentence2": [p.s2 for p in pairs],
        "score": [p.score for p in pairs],
    })
    task.dataset = DatasetDict({split: ds})
    task.data_loaded = True
    if hasattr(task, "min_score"):
        task.min_score, task.max_score = lo, hi
    results = mteb.evaluate(model, tasks=[task], cache=None, overwrite_strategy="always") \
        if hasattr(mteb, "evaluate") else mteb.MTEB(tasks=[task]).run(model, output_folder=None)
    res = results[0] if isinstance(results, list) else list(results)[0]
    scores = res.scores[split][0]
    return {"spearman": round(100 * float(scores["cosine_spearman"]), 2), "n": len(pairs), "task": task_name}
