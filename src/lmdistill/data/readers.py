"""Data readers.

* sentences: a text file (one per line) or a column of a CSV/TSV file (STS files give both
  sentences of each pair); several files are concatenated and de-duplicated in order;
* STS pairs: the STS-B CSV (s1, s2, score; no header), the SICK TSV (header with
  ``sentence_A``, ``sentence_B``, ``relatedness_score``), and ``score<TAB>s1<TAB>s2`` TSV;
  rows without a score are skipped;
* instructions: MiniLLM-format JSONL (``prompt``, ``output`` as a string or a list).

Each reader takes a path, or a hub dataset name (``name`` or ``name:split``) for users who
have the hub; the path route never touches the network.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from lmdistill.errors import LmdistillError


@dataclass(frozen=True)
class StsPair:
    """One scored sentence pair."""

    s1: str
    s2: str
    score: float


def _hub(name: str, default_split: str):
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise LmdistillError("the 'datasets' package is needed to read hub datasets: pip install datasets") from exc
    repo, _, split = name.partition(":")
    try:
        return load_dataset(repo, split=split or default_split)
    except Exception as exc:  # noqa: BLE001 - network / hub failures have many types
        raise LmdistillError(
            f"could not read {name!r} as a file or a hub dataset ({type(exc).__name__}): give an existing path"
        ) from exc


def _is_float(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def read_sts(path: str | Path) -> list[StsPair]:
    """Scored pairs from an STS-B CSV, a SICK TSV, a ``score<TAB>s1<TAB>s2`` TSV, or a hub dataset."""
    p = Path(path)
    if not p.exists():
        if isinstance(path, str) and "/" in path and not path.startswith((".", "/")) and not p.suffix:
            ds = _hub(path, "test")
            cols = ds.column_names
            s1, s2 = ("sentence1", "sentence2") if "sentence1" in cols else ("sentence_A", "sentence_B")
            sc = "score" if "score" in cols else "relatedness_score"
            return [StsPair(r[s1], r[s2], float(r[sc])) for r in ds if r[sc] is not None]
        raise LmdistillError(f"STS file {str(path)!r} not found: check the path")
    text = p.read_text(encoding="utf-8")
    lines = text.splitlines()
    if not lines:
        raise LmdistillError(f"STS file {str(p)!r} is empty: give a file of scored sentence pairs")
    pairs: list[StsPair] = []
    header = lines[0].split("\t")
    if "relatedness_score" in header:  # SICK
        rows = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        for r in rows:
            if _is_float(r.get("relatedness_score")):
                pairs.append(StsPair(r["sentence_A"], r["sentence_B"], float(r["relatedness_score"])))
    elif "\t" in lines[0]:  # score<TAB>s1<TAB>s2
        for row in csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 3 and _is_float(row[0]):
                pairs.append(StsPair(row[1], row[2], float(row[0])))
    else:  # STS-B CSV: s1, s2, score
        for row in csv.reader(lines):
            if len(row) >= 3 and _is_float(row[-1]):
                pairs.append(StsPair(row[0], row[1], float(row[-1])))
    if not pairs:
        raise LmdistillError(
            f"STS file {str(p)!r} has no scored rows: expected STS-B CSV (s1,s2,score), "
            "SICK TSV (relatedness_score) or score<TAB>s1<TAB>s2"
        )
    return pairs


def _sentences_of(path: Path, text_column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv") or (suffix == ".txt" and _looks_tabular(path)):
        if text_column is None:
            try:
                return [s for pr in read_sts(path) for s in (pr.s1, pr.s2)]
            except LmdistillError:
                pass
            raise LmdistillError(f"{str(path)!r} is a table: set data.text_column to the column of sentences")
        delim = "," if suffix == ".csv" else "\t"
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delim)
            if text_column not in (reader.fieldnames or []):
                raise LmdistillError(
                    f"column {text_column!r} not in {str(path)!r} (columns: {reader.fieldnames}): fix data.text_column"
                )
            return [r[text_column] for r in reader]
    return path.read_text(encoding="utf-8").splitlines()


def _looks_tabular(path: Path) -> bool:
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    return first.count("\t") >= 2


def read_sentences(
    sources: list[str | Path], text_column: str | None = None, max_sentences: int | None = None
) -> list[str]:
    """Unique non-empty sentences from files or hub datasets, in order, at most ``max_sentences``.

    When ``max_sentences`` is set and several sources are given, each source contributes an
    equal share (so a small budget still sees every source).
    """
    per_source: list[list[str]] = []
    for src in sources:
        p = Path(src)
        if p.exists():
            sents = _sentences_of(p, text_column)
        else:
            ds = _hub(str(src), "train")
            col = text_column or next(
                (c for c in ("sentence", "text", "sentence1", "anchor") if c in ds.column_names), None
            )
            if col is None:
                raise LmdistillError(f"hub dataset {src!r}: set data.text_column (columns: {ds.column_names})")
            sents = list(ds[col])
            if col == "sentence1" and "sentence2" in ds.column_names:
                sents += list(ds["sentence2"])
        per_source.append([s.strip() for s in sents if s and s.strip()])
    seen: set[str] = set()
    out: list[str] = []
    quota = None if max_sentences is None else -(-max_sentences // max(len(per_source), 1))
    for sents in per_source:
        taken = 0
        for s in sents:
            if s in seen:
                continue
            seen.add(s)
            out.append(s)
            taken += 1
            if quota is not None and taken >= quota:
                break
    if max_sentences is not None:
        out = out[:max_sentences]
    if not out:
        raise LmdistillError(f"no sentences found in {[str(s) for s in sources]}: give non-empty training files")
    return out


@dataclass(frozen=True)
class Instruction:
    """One prompt/response row; ``references`` holds every accepted response."""

    prompt: str
    response: str
    references: tuple[str, ...]


def read_instructions(path: str | Path, limit: int | None = None) -> list[Instruction]:
    """MiniLLM-format JSONL rows (``prompt``, ``output``: string or list of strings)."""
    p = Path(path)
    rows: list[dict] = []
    if p.exists():
        with p.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise LmdistillError(f"{str(p)!r} line {n} is not JSON ({exc.msg}): fix or remove the line") from exc
    else:
        if p.suffix:
            raise LmdistillError(f"instruction file {str(path)!r} not found: check the path")
        rows = [dict(r) for r in _hub(str(path), "train")]
    out: list[Instruction] = []
    for n, r in enumerate(rows, 1):
        prompt, output = r.get("prompt"), r.get("output", r.get("response"))
        if prompt is None or output is None or output == [] or output == "":
            raise LmdistillError(
                f"{str(path)!r} row {n} has no 'prompt' or no 'output': every row needs both (MiniLLM format)"
            )
        refs = tuple(output) if isinstance(output, list) else (output,)
        out.append(Instruction(prompt=prompt, response=refs[0], references=refs))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise LmdistillError(f"{str(path)!r} has no rows: give a non-empty JSONL file")
    return out
