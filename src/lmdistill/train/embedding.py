"""Sentence-embedding distillation: data, teacher cache, the training wrapper, the run.

``run_embedding(cfg)`` does the whole job: read the sentences, build or load the teacher
cache (the teacher is freed before training), evaluate the student before, train with the
configured method on :class:`~lmdistill.train.base.DistillTrainer`, save the student as an
ordinary sentence-transformers folder, evaluate it after, write ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from transformers import set_seed

from lmdistill import models
from lmdistill.config import Config, build_options, resolve_data_path
from lmdistill.data.readers import read_sentences, read_sts
from lmdistill.errors import LmdistillError
from lmdistill.eval.sts import sts_spearman
from lmdistill.methods.embedding.base import pool
from lmdistill.registry import get_method
from lmdistill.report.card import data_file_hashes
from lmdistill.train import cache as tcache
from lmdistill.train.base import DistillTrainer, train_and_measure, training_arguments, write_metrics

log = logging.getLogger("lmdistill")


POOLINGS = ("mean", "cls", "max", "lasttoken")


def pooling_mode(st_model) -> str:
    """The pooling of a SentenceTransformer, as its Pooling module says: mean, cls, max or lasttoken.

    A model without a Pooling module, or one that concatenates several poolings, is refused:
    training one pooling and evaluating another would be silently wrong."""
    for module in st_model:
        mode = getattr(module, "pooling_mode", None)
        if mode is None:
            continue
        if isinstance(mode, (tuple, list)):
            if len(mode) != 1:
                raise LmdistillError(
                    f"the student pools with several modes at once ({', '.join(map(str, mode))}): "
                    "give a student with one pooling mode (mean, cls, max or lasttoken)"
                )
            mode = mode[0]
        mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(str(mode), str(mode))
        if mode not in POOLINGS:
            raise LmdistillError(f"the student's pooling {mode!r} is not supported: use one of {', '.join(POOLINGS)}")
        return mode
    raise LmdistillError("the student has no Pooling module: give a sentence-transformers model with one "
                         "(mean, cls, max or lasttoken pooling)")


class EmbeddingDistillModel(nn.Module):
    """The student encoder plus the method's training-only modules (projectors)."""

    def __init__(self, student, method: nn.Module, pooling: str) -> None:
        super().__init__()
        self.student = student  # a SentenceTransformer
        self.method = method
        self.pooling = pooling

    def layer_vectors(self, input_ids, attention_mask, token_type_ids=None, last_only: bool = False) -> list[torch.Tensor]:
        """Pooled sentence vector ``[B, d_S]`` of every hidden state (embedding output first), or
        of the last one alone (``last_only``: no hidden state is kept on the way)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": not last_only}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.student[0].auto_model(**kwargs)
        states = (out.last_hidden_state,) if last_only else out.hidden_states
        return [pool(h, attention_mask, self.pooling) for h in states]

    def forward(self, input_ids, attention_mask, teacher, token_type_ids=None):
        layers = self.layer_vectors(input_ids, attention_mask, token_type_ids)
        view2 = None
        if self.method.needs_second_view:  # a second pass (other dropout masks): its last layer only
            view2 = self.layer_vectors(input_ids, attention_mask, token_type_ids, last_only=True)[-1]
        return self.method(layers, teacher.to(layers[-1].dtype), view2)


class SentenceCollator:
    """Tokenises sentences with the student's tokenizer and attaches the cached teacher rows."""

    def __init__(self, tokenizer, teacher: torch.Tensor, max_length: int) -> None:
        self.tok, self.teacher, self.max_length = tokenizer, teacher, max_length

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.tok([r["text"] for r in rows], padding=True, truncation=True,
                         max_length=self.max_length, return_tensors="pt")
        batch = dict(batch)
        batch["teacher"] = self.teacher[torch.tensor([r["idx"] for r in rows])]
        return batch


def training_sentences(cfg: Config) -> list[str]:
    """The configured training sentences (never a test file)."""
    if not cfg.data.train:
        raise LmdistillError("data.train is empty: list the training sentence files in the config")
    for src in cfg.data.train:
        if "test" in Path(str(src)).name.lower():
            raise LmdistillError(f"data.train names a test file {src!r}: train on train/dev data only")
    sources = [resolve_data_path(s, cfg) for s in cfg.data.train]
    return read_sentences(sources, cfg.data.text_column, cfg.data.max_examples)


def teacher_cache(cfg: Config, sentences: list[str], progress: bool = True) -> torch.Tensor:
    """Load the teacher cache for these sentences, building it first if absent."""
    root = models.cache_root(cfg.cache_dir)
    fp = models.fingerprint(cfg.teacher, cfg.cache_dir)
    explicit = cfg.data.teacher_cache
    max_len = cfg.data.max_length
    # pooling is part of the key: read it from the teacher's module config without loading weights
    pooling = _pooling_from_folder(models.resolve(cfg.teacher, cfg.cache_dir))
    key = tcache.cache_key(cfg.teacher, fp, sentences, pooling, max_len, True)
    path = Path(explicit) if explicit else tcache.default_cache_path(root, key)
    if path.exists():
        return tcache.load_cache(path, key)
    teacher = models.load_sentence_model(cfg.teacher, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
    teacher.max_seq_length = max_len
    t0 = time.time()
    emb = teacher.encode(sentences, batch_size=cfg.eval.batch_size, normalize_embeddings=True,
                         convert_to_tensor=True, show_progress_bar=progress)
    log.info("teacher encoded %d sentences in %.0f s", len(sentences), time.time() - t0)
    del teacher
    gc.collect()
    tcache.save_cache(path, emb.cpu(), key)
    return emb.cpu()


def _pooling_from_folder(folder: str) -> str:
    p = Path(folder)
    for cfg_file in sorted(p.glob("*_Pooling/config.json")) + sorted(p.glob("1_Pooling/config.json")):
        conf = json.loads(cfg_file.read_text())
        if "pooling_mode" in conf:
            return str(conf["pooling_mode"])
        for k, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                        ("pooling_mode_max_tokens", "max"), ("pooling_mode_lasttoken", "lasttoken")):
            if conf.get(k):
                return name
    return "mean"


def teacher_scores(cfg: Config, evals: dict[str, Path], progress: bool = True) -> dict[str, dict]:
    """The teacher's STS scores, cached per (teacher, file, evaluation code)."""
    import lmdistill.data.readers as readers_mod
    import lmdistill.eval.sts as sts_mod

    root = models.cache_root(cfg.cache_dir) / "teacher_scores"
    root.mkdir(parents=True, exist_ok=True)
    fp = models.fingerprint(cfg.teacher, cfg.cache_dir)
    code = tcache.code_hash(sts_mod, readers_mod)[:12]
    files = {name: root / f"{fp}-{tcache.sentences_hash([Path(path).read_text(encoding='utf-8')])[:16]}-{code}.json"
             for name, path in evals.items()}

    def compute(todo: list[str]) -> dict:
        teacher = models.load_sentence_model(cfg.teacher, cache_dir=cfg.cache_dir,
                                             trust_remote_code=cfg.trust_remote_code)
        res = {name: sts_spearman(teacher, read_sts(evals[name]), cfg.eval.batch_size, progress) for name in todo}
        del teacher
        gc.collect()
        return res

    return tcache.cached_per_file(files, compute)


def evaluate_sts(model, evals: dict[str, Path], batch_size: int, progress: bool = True) -> dict[str, dict]:
    """STS Spearman of ``model`` on each evaluation file."""
    model.eval()
    return {name: sts_spearman(model, read_sts(path), batch_size, progress) for name, path in evals.items()}


def build_student_and_method(cfg: Config, d_teacher: int):
    """The (layer-reduced) student and the configured method module."""
    student = models.load_sentence_model(cfg.student, cfg.student_layers, cfg.cache_dir,
                                         trust_remote_code=cfg.trust_remote_code)
    student.max_seq_length = cfg.data.max_length
    if cfg.train.gradient_checkpointing:
        models.enable_gradient_checkpointing(student[0].auto_model)
    method_cls = get_method(cfg.method, "embedding")
    opts = build_options(method_cls.Options, cfg.method_args,
                         cfg.method)
    d_student = (student.get_embedding_dimension() if hasattr(student, "get_embedding_dimension")
                 else student.get_sentence_embedding_dimension())
    n_layers = student[0].auto_model.config.num_hidden_layers
    method = method_cls(opts, d_student, d_teacher, n_layers)
    return student, method


def run_embedding(cfg: Config, progress: bool = True) -> dict:
    """Train a sentence-embedding student with ``cfg``; returns (and writes) the run's metrics."""
    from datasets import Dataset

    t_start = time.time()
    out_dir = Path(cfg.output_dir)
    method_cls = get_method(cfg.method, "embedding")  # fail fast on an unknown method
    build_options(method_cls.Options, cfg.method_args, cfg.method)
    evals = {name: resolve_data_path(p, cfg) for name, p in cfg.data.eval.items()}
    for name, p in evals.items():
        if not isinstance(p, Path):
            raise LmdistillError(f"evaluation file {name}={p!r} must be a local file")
    sentences = training_sentences(cfg)
    t0 = time.time()
    teacher_emb = teacher_cache(cfg, sentences, progress)
    cache_s = time.time() - t0
    metrics: dict = {"task": "embedding", "method": cfg.method, "teacher": cfg.teacher, "student": cfg.student,
                     "student_layers": cfg.student_layers, "n_train": len(sentences),
                     "data_files": data_file_hashes(cfg), "config": cfg.to_dict()}
    if cfg.eval.teacher and evals:
        metrics["teacher_scores"] = teacher_scores(cfg, evals, progress)
    set_seed(cfg.train.seed)  # projector initialisation is part of the run's seed
    student, method = build_student_and_method(cfg, teacher_emb.shape[1])
    if cfg.eval.before and evals:
        metrics["before"] = evaluate_sts(student, evals, cfg.eval.batch_size, progress)
    wrapper = EmbeddingDistillModel(student, method, pooling_mode(student))
    token_ids = student.tokenizer(sentences, truncation=True, max_length=cfg.data.max_length)["input_ids"]
    lengths = [len(ids) for ids in token_ids]
    ds = Dataset.from_dict({"text": sentences, "idx": list(range(len(sentences))), "length": lengths})
    ckpt_dir = out_dir / "checkpoints"
    trainer = DistillTrainer(
        model=wrapper,
        args=training_arguments(cfg.train, ckpt_dir),
        train_dataset=ds,
        data_collator=SentenceCollator(student.tokenizer, teacher_emb, cfg.data.max_length),
        train_config=cfg.train,
    )
    run = train_and_measure(trainer, ckpt_dir)
    if run is None:  # other processes of a distributed run stop here
        return {"steps": trainer.state.global_step, "rank": trainer.args.process_index}
    student_dir = out_dir / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)
    student.save(str(student_dir))
    metrics.update({**run, "cache_seconds": round(cache_s, 1), "student_dir": str(student_dir),
                    "method_options": dataclasses.asdict(method.opts)})
    if evals:
        metrics["after"] = evaluate_sts(student, evals, cfg.eval.batch_size, progress)
    return write_metrics(out_dir, metrics, t_start)
