"""The teacher-embedding cache (docs/methods.md 2.1).

The teacher encodes the training sentences once; the L2-normalised embeddings are stored as
safetensors with their key in the file's metadata: teacher (reference and weight
fingerprint), hash of the sentences, pooling, max length, normalisation. Loading compares the
stored key with the expected one and refuses a stale or foreign cache. The file is written to
a temporary name and renamed, so a killed run never leaves half a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmdistill.errors import LmdistillError


def sentences_hash(sentences: list[str]) -> str:
    """sha256 of the sentences, in order."""
    h = hashlib.sha256()
    for s in sentences:
        h.update(s.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def code_hash(*modules) -> str:
    """sha256 of the source files of ``modules``: a cached score goes stale with the code that computed it."""
    h = hashlib.sha256()
    for mod in modules:
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def cache_key(teacher: str, teacher_fingerprint: str, sentences: list[str], pooling: str,
              max_length: int, normalize: bool = True) -> dict[str, str]:
    """The fields a cache must match."""
    return {
        "teacher": teacher,
        "teacher_fingerprint": teacher_fingerprint,
        "data_sha256": sentences_hash(sentences),
        "n": str(len(sentences)),
        "pooling": pooling,
        "max_length": str(max_length),
        "normalize": str(bool(normalize)),
    }


def default_cache_path(root: Path, key: dict[str, str]) -> Path:
    """Where a cache with ``key`` lives under ``root`` (one file per key)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / "teacher_cache" / f"{digest}.safetensors"


def save_cache(path: Path, embeddings: torch.Tensor, key: dict[str, str]) -> Path:
    """Write the cache atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"embeddings": embeddings.contiguous().float()}, str(tmp), metadata={"key": json.dumps(key)})
    os.replace(tmp, path)
    return path


def load_cache(path: Path, key: dict[str, str]) -> torch.Tensor:
    """The cached embeddings ``[N, d_T]``; a clear error if the cache does not match ``key``."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            emb = fh.get_tensor("embeddings")
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise LmdistillError(
            f"teacher cache {str(path)!r} is unreadable ({type(exc).__name__}): delete it and run lmdistill cache"
        ) from exc
    stored = json.loads(meta.get("key", "{}"))
    diff = sorted(k for k in key if stored.get(k) != key[k])
    if diff:
        raise LmdistillError(
            f"teacher cache {str(path)!r} is stale or foreign (differs in {', '.join(diff)}): "
            "delete it or run lmdistill cache CONFIG to rebuild"
        )
    if emb.shape[0] != int(key["n"]):
        raise LmdistillError(f"teacher cache {str(path)!r} has {emb.shape[0]} rows, expected {key['n']}: rebuild it")
    return emb


def cached_per_file(files: dict[str, Path], compute) -> dict[str, dict]:
    """``{name: result}``: read from ``files[name]`` (JSON) where it exists; the missing names go
    to ``compute(names) -> {name: result}`` in one call (so a model is loaded once, if at all),
    and their results are written."""
    out, todo = {}, []
    for name, f in files.items():
        if f.exists():
            out[name] = json.loads(f.read_text())
        else:
            todo.append(name)
    if todo:
        res = compute(todo)
        for name in todo:
            out[name] = res[name]
            files[name].write_text(json.dumps(res[name]))
    return {name: out[name] for name in files}
