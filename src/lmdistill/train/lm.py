"""Cross-tokenizer causal-LM distillation: collator, training wrapper, the run.

The collator encodes ``prompt + response`` with both tokenizers (each with its own special
tokens, EOS appended), labels the response tokens, and, for span methods, aligns the two
tokenizations. The wrapper runs the student (with grad) and the frozen teacher (without its
LM head unless the method needs full teacher logits), computes the student's CE on the
response, and hands both sides to the method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import set_seed

from lmdistill import models
from lmdistill.config import Config, build_options, resolve_data_path
from lmdistill.data.collate import InstructionCollator
from lmdistill.data.readers import read_instructions
from lmdistill.errors import LmdistillError
from lmdistill.methods.llm.base import Heads, Response, Side, logits_from_targets, num_layers
from lmdistill.models import decoder_and_head, final_norm, lm_head_logits
from lmdistill.models.attention import RowCapture
from lmdistill.models.head_kl import lm_head_kl
from lmdistill.registry import get_method
from lmdistill.report.card import data_file_hashes
from lmdistill.train.base import DistillTrainer, train_and_measure, training_arguments, write_metrics

log = logging.getLogger("lmdistill")


class LMDistillModel(nn.Module):
    """Student (trained), teacher (frozen) and the method's modules."""

    accepts_loss_kwargs = False

    def __init__(self, student, teacher, method) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.method = method
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.needs = method.needs()
        self.s_capture = self.t_capture = None
        self._t_rows = (None, None)  # the teacher head's rows for one ids tensor (teacher_heads)
        if self.needs.rows is not None:
            if student is not None:  # none when building a teacher cache
                self.s_capture = RowCapture(student, list(self.needs.student_layers), self.needs.rows)
            if teacher is not None:  # none when training from a teacher cache
                self.t_capture = RowCapture(teacher, list(self.needs.teacher_layers), self.needs.rows)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _run(self, model, ids, mask, labels, layers, capture, logits: bool, grad: bool, query=None) -> Side:
        decoder, head, softcap = decoder_and_head(model)
        if capture is not None:
            capture.prepare(mask, query if self.needs.row_query == "last_text" else None)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers), use_cache=False)
            hidden = {l: out.hidden_states[l] for l in layers} if layers else {}
            hidden[num_layers(model)] = out.last_hidden_state  # the last block, after the final norm
            resp = Response.from_labels(labels)
            z = lm_head_logits(head, softcap, out.last_hidden_state[resp.b, resp.t]) if logits else None
        rows = capture.rows() if capture is not None else {}
        return Side(hidden=hidden, resp=resp, logits=z, rows=rows, input_ids=ids, attention_mask=mask)

    def teacher_pass(self, batch) -> Side:
        """The teacher's outputs for a batch, as the method asked for them (no gradient)."""
        n = self.needs
        with torch.no_grad():
            return self._run(self.teacher, batch["t_input_ids"], batch["t_attention_mask"], batch["t_labels"],
                             list(n.teacher_layers), self.t_capture, logits=n.logits, grad=False,
                             query=batch.get("t_last_text"))

    def teacher_heads(self) -> dict:
        """The teacher's LM head and final norm (``Heads`` fields), for methods that read them. The
        teacher is frozen, so the rows of its head that a method asks for by ``ids`` (SRA's shared
        vocabulary: 46k of Gemma's 262k rows) are gathered once, not at every step."""
        _, t_head, t_cap = decoder_and_head(self.teacher)

        def logits(x, ids=None, detach_weight=True):
            if ids is None:
                return lm_head_logits(t_head, t_cap, x, None, detach_weight)
            key = (ids.data_ptr(), ids.numel(), t_head.weight.data_ptr(), t_head.weight.dtype, t_head.weight.device)
            if self._t_rows[0] != key:  # (a plain attribute: never saved with the student)
                b = getattr(t_head, "bias", None)
                with torch.no_grad():
                    rows = SimpleNamespace(weight=t_head.weight[ids], bias=None if b is None else b[ids])
                self._t_rows = (key, rows)
            return lm_head_logits(self._t_rows[1], t_cap, x, None, True)

        return {"teacher_head_weight": t_head.weight, "teacher_norm": final_norm(self.teacher),
                "teacher_logits": logits}

    def forward(self, **batch):
        m, n = self.method, self.needs
        s = self._run(self.student, batch["s_input_ids"], batch["s_attention_mask"], batch["s_labels"],
                      list(n.student_layers), self.s_capture, logits=True, grad=True, query=batch.get("s_last_text"))
        if s.resp.target.numel() == 0:
            raise LmdistillError("a batch has no response tokens: check that every row has a non-empty 'output'")
        ce = F.cross_entropy(s.logits.float(), s.resp.target)
        t = None
        if n.teacher and self.teacher is not None and "teacher_targets" not in batch:
            t = self.teacher_pass(batch)
        elif "teacher_targets" in batch and n.cache_form == "token_logits":  # the teacher's logits from its cache
            tg = batch["teacher_targets"]
            t = Side(hidden={}, resp=Response.from_labels(batch["t_labels"]),
                     logits=logits_from_targets(tg, int(tg["vocab"])), input_ids=batch["t_input_ids"],
                     attention_mask=batch["t_attention_mask"])
        _, s_head, s_cap = decoder_and_head(self.student)
        heads = Heads(ce=ce, student_head_weight=s_head.weight, student_norm=final_norm(self.student),
                      student_logits=lambda x, ids=None, detach_weight=False: lm_head_logits(s_head, s_cap, x, ids,
                                                                                              detach_weight),
                      student_kl=lambda x, ids, logp, tau: lm_head_kl(s_head, s_cap, x, ids, logp, tau),
                      **(self.teacher_heads() if self.teacher is not None else {}))
        out = m(batch, s, t, heads)
        if "align_ratio" in batch:
            out["align_ratio"] = batch["align_ratio"].mean()
        return out


def evaluate_lm(cfg: Config, sets: dict, ref_or_model, tok, progress: bool = True) -> dict:
    """ROUGE-L (not on the selection set "holdout") and bits per byte on each evaluation set."""
    from lmdistill.eval.bpb import bpb_eval
    from lmdistill.eval.generation import rouge_eval

    res = {}
    for name, path in sets.items():
        r = {}
        if rouge_limit(cfg) != 0 and name != "holdout":  # the selection set: bits per byte only
            r = rouge_eval(ref_or_model, path, max_new_tokens=cfg.eval.max_new_tokens, seeds=cfg.eval.seeds,
                           greedy=cfg.eval.greedy, limit=rouge_limit(cfg), batch_size=cfg.eval.batch_size,
                           tokenizer=tok, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, progress=progress)
        if cfg.eval.bpb:
            r.update({k: v for k, v in bpb_eval(ref_or_model, path, limit=cfg.data.eval_limit, tokenizer=tok,
                                                 batch_size=cfg.eval.batch_size, progress=progress).items()
                      if k != "n"})
        res[name] = r
    return res


def teacher_lm_scores(cfg: Config, evals: dict, teacher, evaluate) -> dict:
    """The teacher's reference scores on each evaluation set, cached per (teacher weights, file,
    evaluation settings, evaluation code): a teacher is scored once, not at every run or seed.
    ``teacher`` None (training from a teacher cache): it is loaded only if a score is missing."""
    import lmdistill.data.readers as readers_mod
    import lmdistill.eval.bpb as bpb_mod
    import lmdistill.eval.generation as gen_mod
    from lmdistill.report.card import file_sha256
    from lmdistill.train.cache import cached_per_file, code_hash

    root = models.cache_root(cfg.cache_dir) / "teacher_scores"
    root.mkdir(parents=True, exist_ok=True)
    e = cfg.eval
    settings = {"teacher": models.fingerprint(cfg.teacher, cfg.cache_dir), "rouge_limit": rouge_limit(cfg),
                "eval_limit": cfg.data.eval_limit, "max_new_tokens": e.max_new_tokens, "greedy": e.greedy,
                "seeds": list(e.seeds), "temperature": e.temperature, "top_p": e.top_p, "bpb": e.bpb,
                "batch_size": e.batch_size, "code": code_hash(gen_mod, bpb_mod, readers_mod)[:12]}
    files = {}
    for name, path in evals.items():
        key = json.dumps({**settings, "file": file_sha256(path), "selection_set": name == "holdout"}, sort_keys=True)
        files[name] = root / f"lm-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def compute(todo: list[str]) -> dict:
        ref = teacher if teacher is not None else models.load_causal_lm(
            cfg.teacher, cfg.cache_dir, cfg.trust_remote_code).to(models.default_device())
        t_tok = models.load_tokenizer(cfg.teacher, cfg.cache_dir, cfg.trust_remote_code)
        return evaluate(ref.eval(), t_tok, {name: evals[name] for name in todo})

    return cached_per_file(files, compute)


def training_rows(cfg: Config) -> tuple[list, list]:
    """``(rows trained on, held-out rows)`` of an LM config, in file order (``data.max_examples``,
    then ``data.holdout``)."""
    if not cfg.data.train:
        raise LmdistillError("data.train is empty: give the instruction JSONL file to train on")
    rows = []
    for src in cfg.data.train:
        rows += read_instructions(resolve_data_path(src, cfg))
    rows = rows[:cfg.data.max_examples] if cfg.data.max_examples else rows
    return split_holdout(rows, cfg.data.holdout) if cfg.data.holdout else (rows, [])


HOLDOUT_SEED = 0  # the held-out draw does not follow train.seed: every run of a search sees the same split


def split_holdout(rows: list, n: int) -> tuple[list, list]:
    """``(train, held)``: ``n`` rows drawn once with a fixed seed, the rest in their order."""
    if not 0 < n < len(rows):
        raise LmdistillError(f"data.holdout={n} but there are {len(rows)} training rows: hold out fewer")
    pick = set(random.Random(HOLDOUT_SEED).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in pick], [r for i, r in enumerate(rows) if i in pick]


def write_instructions(path: Path, rows: list) -> Path:
    """``rows`` as MiniLLM JSONL (prompt, output: every reference), for evaluation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            out = list(r.references) if len(r.references) > 1 else r.response
            fh.write(json.dumps({"prompt": r.prompt, "output": out}, ensure_ascii=False) + "\n")
    return path


def rouge_limit(cfg: Config) -> int | None:
    """Rows per evaluation file for ROUGE-L: ``eval.rouge_limit``, else ``data.eval_limit``."""
    return cfg.eval.rouge_limit if cfg.eval.rouge_limit is not None else cfg.data.eval_limit


def load_student_lm(cfg: Config):
    """The student causal LM, reduced to ``cfg.student_layers`` when given (compression by pruning)."""
    student = models.load_causal_lm(cfg.student, cfg.cache_dir, cfg.trust_remote_code)
    if cfg.student_layers:
        models.reduce_causal_layers(student, list(cfg.student_layers))
    if cfg.train.gradient_checkpointing:
        models.enable_gradient_checkpointing(student)
    return student


def load_lm_pair(cfg: Config, teacher_needed: bool = True):
    """Student, teacher (or None) and their tokenizers."""
    s_tok = models.load_tokenizer(cfg.student, cfg.cache_dir, cfg.trust_remote_code)
    student = load_student_lm(cfg)
    teacher = t_tok = None
    if teacher_needed:
        if not cfg.teacher:
            raise LmdistillError("no teacher given: set teacher to a model folder, hub id or pkg:NAME")
        t_tok = models.load_tokenizer(cfg.teacher, cfg.cache_dir, cfg.trust_remote_code)
        teacher = models.load_causal_lm(cfg.teacher, cfg.cache_dir, cfg.trust_remote_code)
    # on the GPU from the start, so that evaluations before training run there too (the
    # Trainer would move them only for training)
    device = models.default_device()
    return student.to(device), None if teacher is None else teacher.to(device), s_tok, t_tok


def apply_lora(student, lora: dict):
    """Wrap the student with peft LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    conf = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    conf.update(lora or {})
    try:
        return get_peft_model(student, LoraConfig(**conf))
    except (TypeError, ValueError) as exc:
        raise LmdistillError(f"train.lora is not a valid LoRA config ({exc}): see peft.LoraConfig") from exc


def build_method(cfg: Config, student, teacher, s_tok, t_tok):
    """The configured LM method."""
    cls = get_method(cfg.method, "lm")
    opts = build_options(cls.Options, cfg.method_args, cfg.method)
    cache = models.cache_root(cfg.cache_dir)
    return cls(opts, student, teacher, s_tok, t_tok, cache)


def run_lm(cfg: Config, teacher_needed: bool | None = None, progress: bool = True) -> dict:
    """Train a causal-LM student with ``cfg``; returns (and writes) the run's metrics."""
    from datasets import Dataset


    t_start = time.time()
    cls = get_method(cfg.method, "lm")
    build_options(cls.Options, cfg.method_args, cfg.method)
    if teacher_needed is None:
        teacher_needed = cls.needs_teacher
    rows, held = training_rows(cfg)
    out_dir = Path(cfg.output_dir)
    evals = {name: resolve_data_path(p, cfg) for name, p in cfg.data.eval.items()}
    if held:
        evals["holdout"] = write_instructions(out_dir / "holdout.jsonl", held)
    cached = teacher_needed and cfg.data.teacher_cache is not None
    if cached and cls.cache_form is None:
        raise LmdistillError(f"data.teacher_cache is set, but {cfg.method} cannot train from a teacher cache: "
                             f"{cls.no_cache_reason}")
    student, teacher, s_tok, t_tok = load_lm_pair(cfg, teacher_needed and not cached)
    metrics: dict = {"task": "lm", "method": cfg.method, "teacher": cfg.teacher, "student": cfg.student,
                     "n_train": len(rows), "data_files": data_file_hashes(cfg), "config": cfg.to_dict()}
    targets = method = None
    if cached:  # the teacher's tokenizer and config only; its weights load for its reference scores, if asked
        from lmdistill.train.lm_cache import open_lm_teacher_cache

        t_tok = models.load_tokenizer(cfg.teacher, cfg.cache_dir, cfg.trust_remote_code)
        set_seed(cfg.train.seed)  # projector initialisation is part of the run's seed
        method = build_method(cfg, student, models.load_causal_config(cfg.teacher, cfg.cache_dir,
                                                                      cfg.trust_remote_code), s_tok, t_tok)
        targets = open_lm_teacher_cache(cfg, method, s_tok, t_tok)
        metrics["teacher_cache"] = targets.summary()

    def evaluate(ref_or_model, tok, sets: dict | None = None) -> dict:
        return evaluate_lm(cfg, evals if sets is None else sets, ref_or_model, tok, progress)

    if evals and cfg.eval.before:
        metrics["before"] = evaluate(student, s_tok)
    if evals and cfg.eval.teacher and (teacher is not None or cached):
        metrics["teacher_scores"] = teacher_lm_scores(cfg, evals, teacher, evaluate)
    set_seed(cfg.train.seed)  # projector initialisation is part of the run's seed
    if method is None:
        method = build_method(cfg, student, teacher, s_tok, t_tok)
    if cfg.train.lora:
        student = apply_lora(student, cfg.train.lora)
    wrapper = LMDistillModel(student, teacher, method)
    lengths = [min(len(ids), cfg.data.max_length)
               for ids in s_tok([r.prompt + r.response for r in rows])["input_ids"]]
    ds = Dataset.from_dict({"prompt": [r.prompt for r in rows], "response": [r.response for r in rows],
                            "length": lengths, "index": list(range(len(rows)))})
    needs = method.needs()
    collator = InstructionCollator(s_tok, t_tok if teacher_needed else None, cfg.data.max_length,
                                   spans=needs.spans, max_spans=needs.max_spans,
                                   prompt_max_fraction=cfg.data.prompt_max_fraction, targets=targets)
    ckpt_dir = out_dir / "checkpoints"
    trainer = DistillTrainer(model=wrapper, args=training_arguments(cfg.train, ckpt_dir), train_dataset=ds,
                             data_collator=collator, train_config=cfg.train)
    run = train_and_measure(trainer, ckpt_dir)
    if run is None:  # other processes of a distributed run stop here
        return {"steps": trainer.state.global_step, "rank": trainer.args.process_index}
    final = student.merge_and_unload() if cfg.train.lora else student
    student_dir = out_dir / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)
    final.save_pretrained(student_dir, safe_serialization=True)
    s_tok.save_pretrained(student_dir)
    metrics.update({**run, "student_dir": str(student_dir), "method_options": dataclasses.asdict(method.opts)})
    facts = method.run_facts(run["log_history"])
    if targets is not None and "shared_vocab" in facts:  # measured when the cache was built
        facts["shared_vocab"]["teacher_mass_in_shared"] = targets.manifest.get("shared_mass")
    metrics.update(facts)
    if "shared_vocab" in facts:
        sv = facts["shared_vocab"]
        log.info("shared vocabulary: %d pairs (%d with a byte-fallback side); teacher mass inside it %s",
                 sv["pairs"], sv["byte_fallback_pairs"], sv["teacher_mass_in_shared"])
    if evals:
        final.eval()
        metrics["after"] = evaluate(final, s_tok)
    return write_metrics(out_dir, metrics, t_start)
