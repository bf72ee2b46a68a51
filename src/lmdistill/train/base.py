"""The trainer every method runs on: transformers' ``Trainer`` with

* a method's named loss terms averaged and logged next to the loss;
* the optimizer built here: AdamW over two parameter groups (the student at ``lr``, the
  method's projectors at ``projector_lr``), always wrapped in :class:`~lmdistill.optim.ASAM`
  (``rho = 0`` for plain AdamW), so SAM/ASAM get a closure that re-runs the step's
  micro-batches at ``w + eps``, and the descent gradient alone is clipped;
* non-finite losses: the step is skipped and counted; after ``max_nonfinite_steps`` in a row
  training stops with a clear error and the last good checkpoint stays;
* checkpoints as safetensors of the trainable module (a frozen teacher is not saved), read
  back with ``safetensors`` (nothing is unpickled from a checkpoint folder's weights).

Training-loop logic (accumulation, scheduling, resume, distributed) stays transformers'.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback, is_tensorboard_available

from lmdistill.config import TrainConfig
from lmdistill.errors import LmdistillError
from lmdistill.optim import ASAM

WEIGHTS = "model.safetensors"
log = logging.getLogger("lmdistill")


def report_targets(tc: TrainConfig) -> list[str]:
    """``train.report_to`` as a list (a single name is accepted)."""
    return [tc.report_to] if isinstance(tc.report_to, str) else list(tc.report_to or [])


class TensorBoardLogs(TensorBoardCallback):
    """TensorBoard event files in ``OUTPUT_DIR/tensorboard`` (beside, not inside, the rotated
    checkpoints): ``loss``, ``grad_norm``, ``learning_rate`` and every loss term, per logging step."""

    def __init__(self, log_dir: str | Path) -> None:
        super().__init__()
        self.logging_dir = str(log_dir)


def training_arguments(tc: TrainConfig, output_dir: str | Path, **extra) -> TrainingArguments:
    """``TrainingArguments`` from our train config (clipping is done inside the ASAM wrapper).
    TensorBoard is attached by ``DistillTrainer`` itself (see ``TensorBoardLogs``)."""
    use_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps,
        learning_rate=tc.lr,
        weight_decay=tc.weight_decay,
        warmup_steps=tc.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        lr_scheduler_type=tc.scheduler,
        max_grad_norm=0.0,
        logging_steps=tc.logging_steps,
        save_strategy="steps" if tc.save_steps > 0 else "no",
        save_steps=max(tc.save_steps, 1),
        save_total_limit=tc.save_total_limit,
        seed=tc.seed,
        data_seed=tc.seed,
        bf16=tc.bf16,
        fp16=tc.fp16,
        use_cpu=use_cpu,
        report_to=[t for t in report_targets(tc) if t != "tensorboard"] or "none",
        remove_unused_columns=False,
        dataloader_num_workers=tc.dataloader_workers,
        train_sampling_strategy="group_by_length" if tc.group_by_length else "random",
        length_column_name="length",
        disable_tqdm=False,
        **extra,
    )


class DistillTrainer(Trainer):
    """``Trainer`` for a wrapper module whose forward returns a dict of loss terms."""

    def __init__(self, *args, train_config: TrainConfig, projector_prefixes: tuple[str, ...] = ("method.",),
                 **kwargs) -> None:
        self.tc = train_config
        self.projector_prefixes = projector_prefixes
        self._micro: list[tuple[dict, object]] = []
        self._micro_step = -1  # the optimizer step the stashed micro-batches belong to
        self._in_closure = False
        self._terms: dict[str, list[float]] = {}
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        super().__init__(*args, **kwargs)
        if "tensorboard" in report_targets(train_config):
            if not is_tensorboard_available():
                raise LmdistillError("train.report_to names tensorboard, which is not installed: "
                                     "pip install 'lmdistill[tensorboard]' (or drop it from train.report_to)")
            self.add_callback(TensorBoardLogs(Path(self.args.output_dir).parent / "tensorboard"))

    # ---- optimizer ---------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """AdamW (student at lr, projectors at projector_lr) inside the (A)SAM wrapper."""
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            is_proj = name.startswith(self.projector_prefixes)
            matrix = p.ndim >= 2 and "norm" not in name.lower()
            groups.setdefault((is_proj, matrix), []).append(p)
        param_groups = []
        for (is_proj, matrix), params in groups.items():
            param_groups.append({
                "params": params,
                "lr": self.tc.projector_lr if is_proj else self.tc.lr,
                "weight_decay": (self.tc.projector_weight_decay if is_proj else self.tc.weight_decay) if matrix else 0.0,
                "adaptive": matrix,  # ASAM's |w| scaling on weight matrices only
            })
        base = torch.optim.AdamW(param_groups, lr=self.tc.lr)
        rho = 0.0 if self.tc.optimizer == "adamw" else self.tc.rho
        self.optimizer = ASAM(base, rho=rho, eta=self.tc.eta, adaptive=self.tc.optimizer == "asam",
                              interval=self.tc.asam_interval, max_grad_norm=self.tc.max_grad_norm or None,
                              clip=self.tc.clip)
        self.optimizer.closure = self._sam_closure
        if self.tc.fp16:  # the closure's descent gradient comes back scaled: ASAM divides it by the scale
            self.optimizer.grad_scale = self._loss_scale
        return self.optimizer

    def _loss_scale(self) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        return 1.0 if scaler is None else float(scaler.get_scale())

    @property
    def _sam(self) -> bool:
        return self.tc.optimizer != "adamw" and self.tc.rho > 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._sam and not self._in_closure:
            step = self.state.global_step
            if step != self._micro_step:  # a new optimizer step: what an earlier step left is stale
                self._micro, self._micro_step = [], step
            opt = self._asam()
            if opt is not None and opt.perturbs_next():  # stash only for a step that will re-run its micro-batches
                self._micro.append((inputs, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        return loss

    def _asam(self) -> ASAM | None:
        """The (A)SAM wrapper inside whatever the accelerator wrapped the optimizer in."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, ASAM):
            opt = getattr(opt, "optimizer", None)
        return opt

    def _sam_closure(self):
        """Re-run this step's micro-batches (forward + backward) at the perturbed weights."""
        batches, self._micro = self._micro, []
        self._in_closure = True
        try:
            total = 0.0
            for inputs, n in batches:
                total += float(Trainer.training_step(self, self.model_wrapped, inputs, n))
        finally:
            self._in_closure = False
        return total

    # ---- loss and logging ---------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        loss = out["loss"]
        if self._in_closure:
            return loss
        if not self._all_finite(loss):
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= self.tc.max_nonfinite_steps:
                raise LmdistillError(
                    f"{self.nonfinite_run} non-finite losses in a row (step {self.state.global_step}): lower "
                    "train.lr or enable bf16/fp32; the last good checkpoint is kept in the checkpoints folder"
                )
            self._skip_this_step()
            return (loss * 0.0).nan_to_num(0.0, 0.0, 0.0).detach().requires_grad_()
        self.nonfinite_run = 0
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                self._terms.setdefault(k, []).append(float(v.detach()))
        return (loss, out) if return_outputs else loss

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process: one process's NaN skips the step on all,
        so that none waits in an all-reduce the others never enter."""
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return float(bad) == 0.0

    def _skip_this_step(self) -> None:
        opt = self._asam()
        if opt is not None:
            opt.skip_next = True
        self._micro = []

    def log(self, logs: dict, *args, **kwargs) -> None:
        names = sorted(k for k, vals in self._terms.items() if vals and k != "loss")
        if names:
            means = torch.tensor([sum(self._terms[k]) / len(self._terms[k]) for k in names],
                                 device=self.args.device)
            if self.accelerator.num_processes > 1:  # the mean over all processes, like the loss
                means = self.accelerator.reduce(means, reduction="mean")
            # 7 significant digits (float32's precision), not 6 decimals: a small term (a KL of 3e-3)
            # keeps its digits, and two runs that agree to rounding log the same number
            logs.update({k: float(f"{float(v):.7g}") for k, v in zip(names, means)})
        self._terms = {}
        if self.nonfinite_total:
            logs["nonfinite_steps"] = self.nonfinite_total
        super().log(logs, *args, **kwargs)

    # ---- checkpoints ----------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        full = model.state_dict()
        # no frozen teacher weight goes into a checkpoint, under whatever name a method holds it
        frozen = {t.data_ptr() for n, t in full.items() if n.startswith("teacher.") and t.numel()}
        state, seen = {}, set()
        for name, t in full.items():
            if name.startswith("teacher.") or (t.numel() and t.data_ptr() in frozen):
                continue
            key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else (name,)
            if key in seen:  # tied weights: saved once
                continue
            seen.add(key)
            state[name] = t.detach().contiguous().cpu()
        return state

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` under a staging name, then rename it: never half a checkpoint.

        Every process writes its part (e.g. its RNG state) into the staging folder; the main
        process renames it once all are done. Out of disk (or any write error): the staging
        folder is removed, the previous checkpoint stays the latest, and training stops with
        a clear error.
        """
        if self.nonfinite_run:  # inside a run of non-finite losses: keep the last good checkpoint
            return
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, f".staging-{name}")
        main = self.is_world_process_zero()
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if main:
                target = os.path.join(run_dir, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(staging, name), target)
        except OSError as exc:
            prev = latest_checkpoint(run_dir)
            raise LmdistillError(
                f"could not write {name} ({exc.strerror or exc}): free disk space and rerun the same command; "
                f"the previous checkpoint {prev or '(none)'} is intact"
            ) from exc
        finally:
            self.args.output_dir = run_dir
            if main:
                shutil.rmtree(staging, ignore_errors=True)
        if self.state.best_model_checkpoint and ".staging" in self.state.best_model_checkpoint:
            self.state.best_model_checkpoint = None
        if main:
            _rotate(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_file(self._trainable_state(), os.path.join(output_dir, WEIGHTS), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        path = os.path.join(resume_from_checkpoint, WEIGHTS)
        if not os.path.isfile(path):
            raise LmdistillError(f"checkpoint {resume_from_checkpoint!r} has no {WEIGHTS}: delete it to start over")
        state = load_file(path)
        missing = set(self._trainable_state()) - set(state)
        if missing:
            raise LmdistillError(
                f"checkpoint {resume_from_checkpoint!r} lacks {sorted(missing)[:3]}: it is from another run"
            )
        model.load_state_dict(state, strict=False)


def _rotate(run_dir: str, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    if not keep:
        return
    found = []
    for d in Path(run_dir).glob("checkpoint-*"):
        try:
            found.append((int(d.name.split("-")[-1]), d))
        except ValueError:
            continue
    for _, d in sorted(found)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def latest_checkpoint(folder: str | Path) -> str | None:
    """The newest complete ``checkpoint-N`` folder under ``folder`` (incomplete ones skipped).

    Checked newest first, and cheaply: nothing is loaded here (the Trainer loads the one chosen).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    cands = []
    for d in folder.glob("checkpoint-*"):
        try:
            cands.append((int(d.name.split("-")[-1]), d))
        except ValueError:
            continue
    for _, d in sorted(cands, reverse=True):
        why = _incomplete(d)
        if why is None:
            return str(d)
        log.warning("skipping %s: %s", d, why)
    return None


def _incomplete(d: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or ``None`` when it is complete: all its files
    are whole (the weights' safetensors header reads and the file is exactly as long as the header
    says; the optimizer and scheduler, zip archives written by ``torch.save``, end with their
    central directory; the trainer state is valid JSON) and readable. A file cut short by a crash
    fails one of these; so does a file this process may not read, and the reason says which."""
    needed = ("trainer_state.json", WEIGHTS, "optimizer.pt", "scheduler.pt")
    absent = [f for f in needed if not (d / f).is_file()]
    if absent:
        return f"incomplete (no {', '.join(absent)})"
    try:
        with open(d / WEIGHTS, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if (d / WEIGHTS).stat().st_size != 8 + n + end:
            return f"{WEIGHTS} is cut short (a crash while writing)"
        for f in ("optimizer.pt", "scheduler.pt"):
            with zipfile.ZipFile(d / f) as z:
                z.namelist()
        json.loads((d / "trainer_state.json").read_text())
    except OSError as exc:  # permissions, I/O errors: not a truncation, and the user should know
        return f"unreadable ({exc.strerror or exc}: {exc.filename or ''})"
    except (struct.error, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        return f"cut short or corrupt ({type(exc).__name__}: {exc})"
    return None


def train_and_measure(trainer: Trainer, ckpt_dir: str | Path) -> dict | None:
    """Train (resuming if a checkpoint is there) and return what every run reports: steps,
    time, loss, skipped steps, log. ``None`` on processes other than the main one."""
    t0 = time.time()
    result, resume = train_resuming(trainer, ckpt_dir)
    train_s = time.time() - t0
    if not trainer.is_world_process_zero():
        return None
    steps = trainer.state.global_step
    return {"resumed_from": resume, "train_seconds": round(train_s, 1), "steps": steps,
            "seconds_per_step": round(train_s / max(steps, 1), 4), "train_loss": round(float(result.training_loss), 6),
            "nonfinite_steps": trainer.nonfinite_total, "log_history": trainer.state.log_history}


def write_metrics(out_dir: Path, metrics: dict, t_start: float) -> dict:
    """Finish a run's metrics (total time) and write them to ``out_dir/metrics.json``."""
    from lmdistill.report.card import write_model_card

    metrics["total_seconds"] = round(time.time() - t_start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if metrics.get("student_dir") and Path(metrics["student_dir"]).is_dir():
        write_model_card(metrics["student_dir"], json.loads(json.dumps(metrics, default=str)))
    return metrics


def train_resuming(trainer: Trainer, ckpt_dir: str | Path):
    """Train, resuming from the newest complete checkpoint in ``ckpt_dir`` if there is one.

    Returns ``(train_output, resumed_from)``. A checkpoint whose optimizer, scheduler or RNG
    file holds anything but plain tensors is refused (they are read with ``weights_only``).
    """
    import pickle

    resume = latest_checkpoint(ckpt_dir)
    try:
        return trainer.train(resume_from_checkpoint=resume), resume
    except pickle.UnpicklingError as exc:
        raise LmdistillError(
            f"checkpoint {resume} holds objects that are not plain tensors (refused, nothing was executed): "
            "delete that checkpoint folder to resume from an earlier one"
        ) from exc


def steps_for(n_examples: int, tc: TrainConfig) -> int:
    """Optimizer steps the run will take."""
    if tc.max_steps > 0:
        return tc.max_steps
    per_epoch = math.ceil(n_examples / (tc.batch_size * tc.grad_accum))
    return max(1, math.ceil(per_epoch * tc.epochs))
