"""The LM teacher cache: run the teacher once over the training data, train without it.

``lmdistill cache CONFIG.yaml`` (an LM config whose method is cacheable) runs the teacher over
every training row and stores what the method's loss reads of it, per row, via the method's
``teacher_targets``. For SRA that is, per span: the CoM at each mapped teacher layer
(``com [P, K, d]``), the span masses (``mass [P, K]``) and, with the span logit term, the
teacher's log-probabilities at ``tau`` over the shared vocabulary, as the top
``data.teacher_top_k`` (``logp``, ``idx [K, k]``; the rest is one bucket) or all of them.

Storage: sharded safetensors (``shard-00000.safetensors``, ``SHARD_ROWS`` rows each), each
written under a temporary name and renamed, with ``manifest.json`` updated after every shard:
a killed build resumes at the first missing shard. Reading memory-maps the shards.

The manifest holds the cache key: everything the targets depend on (format version, method
and the options that shape the targets, the teacher's fingerprint, both tokenizers, the data
files' hashes, the row selection, ``max_length`` and the prompt cap, top-k and dtype). A cache
whose key differs from the config's is refused with a one-line error.

Training from the cache (``data.teacher_cache: auto`` or a folder) loads no teacher weights:
the teacher's config, tokenizer and weight fingerprint are read, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmdistill import models
from lmdistill.config import Config
from lmdistill.errors import LmdistillError

log = logging.getLogger("lmdistill")

FORMAT = 1
SHARD_ROWS = 64
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MANIFEST = "manifest.json"


def tokenizer_hash(tok) -> str:
    """A hash of a tokenizer's full definition (vocabulary, merges, normaliser, specials)."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    extra = json.dumps({"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token}, sort_keys=True)
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def cache_key(cfg: Config, method, s_tok, t_tok) -> dict:
    """Everything a cache's targets depend on."""
    from lmdistill.report.card import data_file_hashes

    return {"format": FORMAT, "method": _cache_owner(cfg, method), "targets": method.cache_signature(),
            "teacher": cfg.teacher, "teacher_fingerprint": models.fingerprint(cfg.teacher, cfg.cache_dir),
            "student_tokenizer": tokenizer_hash(s_tok), "teacher_tokenizer": tokenizer_hash(t_tok),
            "data": data_file_hashes(cfg), "max_examples": cfg.data.max_examples, "holdout": cfg.data.holdout,
            "max_length": cfg.data.max_length, "prompt_max_fraction": cfg.data.prompt_max_fraction,
            "top_k": cfg.data.teacher_top_k, "dtype": cfg.data.teacher_cache_dtype}


def _cache_owner(cfg: Config, method) -> str:
    """Who can read a cache: span targets are the method's own; token logits are the same for
    every token-level method (ULD, MinED and MultiLevelOT read one cache)."""
    return "token-level" if method.cache_form == "token_logits" else cfg.method


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_folder(cfg: Config, key: dict) -> Path:
    """``data.teacher_cache``: a folder, or ``auto`` (a folder named by the key in the cache folder)."""
    if cfg.data.teacher_cache in (None, "auto"):
        return models.cache_root(cfg.cache_dir) / "lm-teacher" / f"{key['method']}-{_key_hash(key)}"
    return Path(cfg.data.teacher_cache)


def _diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(keys) or "?"


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, default=str))
    os.replace(tmp, folder / MANIFEST)


def _method_and_tokenizers(cfg: Config):
    """The configured method built for the cache (the student: its config only; the teacher: loaded)."""
    from lmdistill.train.lm import build_method

    s_tok = models.load_tokenizer(cfg.student, cfg.cache_dir, cfg.trust_remote_code)
    t_tok = models.load_tokenizer(cfg.teacher, cfg.cache_dir, cfg.trust_remote_code)
    teacher = models.load_causal_lm(cfg.teacher, cfg.cache_dir, cfg.trust_remote_code)
    student_conf = models.load_causal_config(cfg.student, cfg.cache_dir, cfg.trust_remote_code)
    if cfg.student_layers:
        student_conf.num_hidden_layers = len(cfg.student_layers)
    return build_method(cfg, student_conf, teacher, s_tok, t_tok), teacher, s_tok, t_tok


def build_lm_teacher_cache(cfg: Config, progress: bool = True) -> Path:
    """Run the teacher over the training rows once (``eval.batch_size`` rows a forward) and store
    the method's targets (resumes)."""
    from tqdm.auto import tqdm

    from lmdistill.data.collate import InstructionCollator
    from lmdistill.methods.llm.base import Heads
    from lmdistill.registry import get_method
    from lmdistill.train.lm import LMDistillModel, training_rows

    cls = get_method(cfg.method, "lm")
    if cls.cache_form is None:
        raise LmdistillError(f"{cfg.method} cannot train from a teacher cache: {cls.no_cache_reason}")
    rows, _ = training_rows(cfg)
    method, teacher, s_tok, t_tok = _method_and_tokenizers(cfg)
    key = cache_key(cfg, method, s_tok, t_tok)
    folder = cache_folder(cfg, key)
    manifest = _read_manifest(folder)
    if manifest is not None and manifest["key"] != key:
        raise LmdistillError(f"{folder} holds a teacher cache for another configuration (differs in "
                             f"{_diff(manifest['key'], key)}): delete it, or set data.teacher_cache to another folder")
    if manifest is not None and manifest.get("complete"):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    manifest = manifest or {"key": key, "rows": len(rows), "shard_rows": SHARD_ROWS, "shards": [], "complete": False,
                            "bytes": 0, "mass_sum": 0.0, "mass_n": 0}
    device = models.default_device()
    teacher = teacher.to(device).eval()
    wrapper = LMDistillModel(None, teacher, method)  # the teacher half of the training wrapper
    heads = Heads(**wrapper.teacher_heads())
    needs = method.needs()
    collator = InstructionCollator(s_tok, t_tok, cfg.data.max_length, spans=needs.spans, max_spans=needs.max_spans,
                                   prompt_max_fraction=cfg.data.prompt_max_fraction)
    dtype = DTYPES[cfg.data.teacher_cache_dtype]
    start = len(manifest["shards"]) * SHARD_ROWS
    t0 = time.time()
    bar = tqdm(total=len(rows), initial=start, desc="teacher cache", disable=not progress)
    for lo in range(start, len(rows), SHARD_ROWS):
        hi = min(lo + SHARD_ROWS, len(rows))
        tensors: dict[str, torch.Tensor] = {}
        for b0 in range(lo, hi, cfg.eval.batch_size):
            idx = list(range(b0, min(b0 + cfg.eval.batch_size, hi)))
            batch = collator([{"prompt": rows[i].prompt, "response": rows[i].response} for i in idx])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            method._calls = 0  # measure the shared-vocabulary mass on every batch
            tg = method.teacher_targets(batch, wrapper.teacher_pass(batch), heads, cfg.data.teacher_top_k)
            if "shared_mass" in tg:
                manifest["mass_sum"] += float(tg["shared_mass"]) * len(idx)
                manifest["mass_n"] += len(idx)
            for i, row in zip(idx, _rows_of(method.cache_form, tg, batch)):
                for name, val in row.items():
                    store = torch.int32 if name == "idx" else (torch.float32 if name in ("mass", "lse") else dtype)
                    tensors[f"{i}.{name}"] = val.to(store).contiguous().cpu()
            if method.cache_form == "token_logits":
                manifest["vocab"] = int(heads.teacher_head_weight.shape[0])
            bar.update(len(idx))
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        tmp = folder / (name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / name)
        manifest["shards"].append({"file": name, "rows": [lo, hi]})
        manifest["bytes"] += (folder / name).stat().st_size
        _write_manifest(folder, manifest)
    bar.close()
    manifest["complete"] = True
    manifest["shared_mass"] = round(manifest["mass_sum"] / manifest["mass_n"], 6) if manifest["mass_n"] else None
    manifest["seconds"] = round(manifest.get("seconds", 0) + time.time() - t0, 1)
    _write_manifest(folder, manifest)
    log.info("teacher cache %s: %d rows, %.1f MB (%.0f KB per row)", folder, len(rows), manifest["bytes"] / 2**20,
             manifest["bytes"] / max(len(rows), 1) / 1024)
    return folder


def _rows_of(form: str, tg: dict, batch: dict) -> list[dict[str, torch.Tensor]]:
    """A batch's targets cut into its rows: spans (``com``/``mass`` ``[B, P, K, ...]``, each row's
    real spans; ``logp``/``idx`` flat ``[N, ...]`` over the real spans in row order) or response
    positions (flat ``[N, ...]`` in (row, position) order)."""
    tg = {k: v for k, v in tg.items() if k != "shared_mass"}
    if form == "spans":
        n = [int(c) for c in batch["span_mask"].sum(1).tolist()]
        flat = _split_flat({k: v for k, v in tg.items() if k not in ("com", "mass")}, n)
        return [{**{k: tg[k][j, :, :n[j]] for k in ("com", "mass") if k in tg}, **flat[j]} for j in range(len(n))]
    return _split_flat(tg, _response_counts(batch).tolist())


def _split_flat(tg: dict, counts: list[int]) -> list[dict[str, torch.Tensor]]:
    """Flat ``[N, ...]`` targets cut into consecutive pieces of ``counts`` rows."""
    out, start = [], 0
    for c in counts:
        out.append({k: v[start:start + c] for k, v in tg.items()})
        start += c
    return out


def _response_counts(batch: dict) -> torch.Tensor:
    """Teacher response positions per row (the positions whose next token is a response token)."""
    return (batch["t_labels"][:, 1:] != -100).sum(1)


class LMTeacherCache:
    """A complete teacher cache, memory-mapped: per-row targets, padded into batches."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder, self.manifest = folder, manifest
        self._handles: dict[int, object] = {}
        self.names = None

    def _shard(self, i: int):
        s = i // self.manifest["shard_rows"]
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.folder / self.manifest["shards"][s]["file"]), framework="pt")
        return self._handles[s]

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i``'s targets (``com [P, K, d]``, ``mass [P, K]``, ``logp``/``idx [K, ...]``: its K real spans)."""
        h = self._shard(i)
        if self.names is None:
            self.names = sorted({k.split(".", 1)[1] for k in h.keys()})
        return {n: h.get_tensor(f"{i}.{n}") for n in self.names}

    def collate(self, indices: list[int], batch: dict) -> dict[str, torch.Tensor]:
        """The targets of a batch: span CoMs and masses padded to its ``span_mask``'s ``K`` (span
        log-probabilities flat over the real spans, as SRA computes them online), or token
        targets concatenated in (row, position) order. Each row's count of spans (or response
        positions) is checked against the cache's: a mismatch means a stale cache."""
        rows = [self.row(i) for i in indices]
        if "span_mask" not in batch:
            counts = _response_counts(batch).tolist()
            for i, (r, c) in enumerate(zip(rows, counts)):
                if r["logits"].size(0) != c:
                    raise LmdistillError(
                        f"teacher cache {self.folder}: row {indices[i]} has {r['logits'].size(0)} response positions "
                        f"cached but {c} now: the cache is stale; rebuild it (lmdistill cache CONFIG)")
            out = {name: torch.cat([r[name] for r in rows]) for name in rows[0]}
            out["vocab"] = torch.tensor(self.manifest["vocab"])
            return out
        span_mask = batch["span_mask"]
        K = span_mask.size(1)
        out = {}
        for name in rows[0]:
            span_dim = 1 if name in ("com", "mass") else 0
            padded = []
            for i, (r, n) in enumerate(zip(rows, span_mask.sum(1).tolist())):
                t = r[name]
                if t.size(span_dim) != int(n):
                    raise LmdistillError(
                        f"teacher cache {self.folder}: row {indices[i]} has {t.size(span_dim)} spans cached but "
                        f"{int(n)} now: the cache is stale; rebuild it (lmdistill cache CONFIG)")
                if span_dim == 1:
                    t = torch.nn.functional.pad(t, [0, 0] * (t.dim() - 2) + [0, K - t.size(1)])
                padded.append(t)
            # CoMs and masses padded to [B, P, K, ...]; log-probabilities flat over the real spans, as online
            out[name] = torch.stack(padded) if span_dim == 1 else torch.cat(padded)
        return out

    def summary(self) -> dict:
        m = self.manifest
        return {"folder": str(self.folder), "rows": m["rows"], "bytes": m["bytes"],
                "bytes_per_row": round(m["bytes"] / max(m["rows"], 1)), "top_k": m["key"]["top_k"],
                "dtype": m["key"]["dtype"], "shared_mass": m.get("shared_mass"),
                "build_seconds": m.get("seconds")}


def open_lm_teacher_cache(cfg: Config, method, s_tok, t_tok) -> LMTeacherCache:
    """The cache a config trains from, checked against the config's key."""
    key = cache_key(cfg, method, s_tok, t_tok)
    folder = cache_folder(cfg, key)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise LmdistillError(f"no teacher cache at {folder}: build it first with `lmdistill cache CONFIG` "
                             "(the same config and overrides), or drop data.teacher_cache to train online")
    if manifest["key"] != key:
        raise LmdistillError(f"the teacher cache at {folder} was built for another configuration (differs in "
                             f"{_diff(manifest['key'], key)}): rebuild it with `lmdistill cache CONFIG`")
    if not manifest.get("complete"):
        raise LmdistillError(f"the teacher cache at {folder} is incomplete ({len(manifest['shards'])} of "
                             f"{-(-manifest['rows'] // manifest['shard_rows'])} shards): run `lmdistill cache CONFIG` "
                             "again to finish it")
    return LMTeacherCache(folder, manifest)
