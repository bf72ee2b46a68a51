"""The trainer does what its options say: (A)SAM replays only its own step's micro-batches,
non-finite steps leave nothing behind, fp16 wires the loss scale, gradient checkpointing,
no frozen teacher weight in a checkpoint, options refused where they do not apply."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lmdistill.train.embedding as emb
import lmdistill.train.lm as lmrun
from lmdistill.config import build_options, load_config
from lmdistill.errors import LmdistillError
from lmdistill.registry import get_method
from lmdistill.train.base import DistillTrainer, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _emb_cfg(tiny_st, tiny_st_student, sentences_file, out, *extra):
    return load_config(ROOT / "configs/tiny/talas-tiny.yaml", [
        f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]", f"output_dir={out}",
        "eval.before=false", "eval.teacher=false", "train.save_steps=0", *extra])


def _recording_trainer(record: dict, nan_at: set[int] = frozenset()):
    """A trainer that records which micro-batches each step ran and each closure replayed;
    forward calls (outside closures) numbered in ``nan_at`` return a NaN loss."""

    class Recording(DistillTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            record.update(steps={}, closures={}, calls=0)
            self.model.method.register_forward_hook(self._maybe_nan)

        def _maybe_nan(self, module, args, out):
            if self._in_closure:
                return out
            record["calls"] += 1
            if record["calls"] in nan_at:
                return {**out, "loss": out["loss"] * float("nan")}
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not self._in_closure:
                record["steps"].setdefault(self.state.global_step, []).append(id(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

        def _sam_closure(self):
            record["closures"][self.state.global_step] = [id(b) for b, _ in self._micro]
            return super()._sam_closure()

    return Recording


def test_asam_interval_replays_only_its_own_steps_batches(tiny_st, tiny_st_student, sentences_file, tmp_path,
                                                          monkeypatch):
    rec: dict = {}
    monkeypatch.setattr(emb, "DistillTrainer", _recording_trainer(rec))
    m = emb.run_embedding(_emb_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "train.max_steps=4",
                                   "train.batch_size=4", "train.grad_accum=2", "train.asam_interval=2",
                                   "train.optimizer=asam", "train.rho=0.5"), progress=False)
    assert m["steps"] == 4
    # steps 1 and 3 (0-based) perturb; each closure re-runs exactly that step's two micro-batches
    assert sorted(rec["closures"]) == [1, 3]
    for step, replayed in rec["closures"].items():
        assert replayed == rec["steps"][step], (step, replayed, rec["steps"])


def test_nonfinite_micro_batch_leaks_nothing_into_the_next_step(tiny_st, tiny_st_student, sentences_file, tmp_path,
                                                               monkeypatch):
    rec: dict = {}
    monkeypatch.setattr(emb, "DistillTrainer", _recording_trainer(rec, nan_at={1}))
    m = emb.run_embedding(_emb_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "train.max_steps=3",
                                   "train.batch_size=4", "train.grad_accum=2", "train.optimizer=asam",
                                   "method_args={w_task: 0.0}"), progress=False)
    assert m["nonfinite_steps"] == 1
    assert 0 not in rec["closures"]  # the step with the NaN is skipped whole
    for step, replayed in rec["closures"].items():
        assert replayed == rec["steps"][step] and len(replayed) == 2, (step, replayed)


def test_fp16_gives_asam_the_loss_scale(tiny_st, tiny_st_student, sentences_file, tmp_path):
    """Through the trainer: with train.fp16 the optimizer divides the closure's gradient by the
    accelerator's current loss scale (fp16 training itself needs a GPU; the wiring does not)."""
    from transformers import Trainer

    cfg = _emb_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "train.optimizer=asam")
    student, method = emb.build_student_and_method(cfg, 48)
    wrapper = emb.EmbeddingDistillModel(student, method, emb.pooling_mode(student))
    args = emb.training_arguments(cfg.train, tmp_path)
    trainer = DistillTrainer(model=wrapper, args=args, train_config=cfg.train)
    assert trainer.create_optimizer().grad_scale is None  # fp32: nothing to unscale
    cfg.train.fp16 = True
    trainer = DistillTrainer(model=wrapper, args=args, train_config=cfg.train)

    class Scaler:
        def get_scale(self):
            return 1024.0

    trainer.accelerator.scaler = Scaler()
    opt = trainer.create_optimizer()
    assert opt.grad_scale() == 1024.0
    p = next(wrapper.parameters())
    p.grad = torch.full_like(p, 2048.0)
    assert opt._unscale() and torch.allclose(p.grad, torch.full_like(p, 2.0))
    assert isinstance(trainer, Trainer)


def test_gradient_checkpointing_is_honoured_and_changes_no_gradient(llama_lm, gpt2_lm, instructions_file):
    grads = {}
    for gc in (False, True):
        cfg = load_config(ROOT / "configs/tiny/sra-tiny.yaml", [f"student={llama_lm}", f"teacher={gpt2_lm}",
                                                                 f"data.train=[{instructions_file}]", "method=sft",
                                                                 f"train.gradient_checkpointing={str(gc).lower()}"])
        student = lmrun.load_student_lm(cfg)
        assert student.is_gradient_checkpointing == gc
        student.train()
        ids = torch.arange(2, 20).reshape(2, 9)
        student(input_ids=ids, labels=ids).loss.backward()
        grads[gc] = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    assert torch.allclose(grads[False], grads[True], atol=1e-6)


def test_dskd_checkpoint_holds_no_teacher_weight(gpt2_lm, llama_lm, instructions_file, tmp_path):
    cfg = load_config(ROOT / "configs/tiny/sra-tiny.yaml", [
        "method=dskd", "method_args={}", f"student={gpt2_lm}", f"teacher={llama_lm}", f"data.train=[{instructions_file}]",
        f"output_dir={tmp_path}", "data.eval={}", "train.max_steps=2", "train.save_steps=2"])
    lmrun.run_lm(cfg, progress=False)
    ckpt = Path(latest_checkpoint(tmp_path / "checkpoints"))
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("method.") for k in keys)
    assert not any(k.startswith("teacher.") or "_t_emb" in k for k in keys), [k for k in keys if "emb" in k]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        saved = sum(f.get_tensor(k).numel() for k in keys)
    s_params = sum(p.numel() for p in lmrun.models.load_causal_lm(str(gpt2_lm)).parameters())
    t_emb = lmrun.models.load_causal_lm(str(llama_lm)).get_input_embeddings().weight.numel()
    assert saved < s_params + t_emb  # the student and the projectors, not the teacher's embedding matrix


@pytest.mark.parametrize("override, match", [
    (["task=embedding", "train.lora={r: 8}"], "train.lora applies to LM students only"),
    (["task=lm", "data.teacher_cache=x.safetensors"], "an LM teacher cache is a folder"),
    (["train.asam_interval=0"], "asam_interval must be at least 1"),
    (["train.rho=-0.1"], "rho must be 0 or more"),
    (["train.warmup_ratio=5"], "warmup_ratio is a share"),
])
def test_options_that_do_not_apply_are_refused(override, match):
    with pytest.raises(LmdistillError, match=match):
        load_config(None, override)


def test_method_args_are_read_as_numbers():
    opts = build_options(get_method("sra", "lm").Options, {"tau": "2e0", "max_spans": "64"}, "sra")
    assert opts.tau == 2.0 and isinstance(opts.tau, float) and opts.max_spans == 64
    with pytest.raises(LmdistillError, match="method_args.tau.*must be a number"):
        build_options(get_method("sra", "lm").Options, {"tau": "hot"}, "sra")


def test_multi_mode_pooling_and_no_pooling_are_refused(tiny_st_student):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_st_student), device="cpu")
    assert emb.pooling_mode(st) == "mean"
    st[1].pooling_mode = ("cls", "mean")
    with pytest.raises(LmdistillError, match="several modes"):
        emb.pooling_mode(st)
    with pytest.raises(LmdistillError, match="no Pooling module"):
        emb.pooling_mode([st[0]])


def test_an_unreadable_checkpoint_says_why(tiny_st, tiny_st_student, sentences_file, tmp_path, monkeypatch, caplog):
    emb.run_embedding(_emb_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "train.max_steps=4",
                               "train.save_steps=2", "train.batch_size=8"), progress=False)
    ckpts = tmp_path / "checkpoints"
    bad = ckpts / "checkpoint-4" / "optimizer.pt"
    import zipfile

    real = zipfile.ZipFile

    def denied(path, *a, **k):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(zipfile, "ZipFile", denied)
    with caplog.at_level("WARNING", logger="lmdistill"):
        assert latest_checkpoint(ckpts).endswith("checkpoint-2")
    assert "unreadable (Permission denied" in caplog.text and "checkpoint-4" in caplog.text


def test_user_errors_are_one_line_through_the_cli(tiny_st, tiny_st_student, sentences_file, tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "lmdistill", "train", str(ROOT / "configs/tiny/talas-tiny.yaml"),
            f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]",
            f"output_dir={tmp_path}", "train.max_steps=1"]
    for extra, match in ((["method=embed_kd", "method_args={loss: huber}"], "embed_kd loss must be mse or cosine"),
                         (["method=embed_kd", "method_args={projector_init: kaiming}"], "unknown projector init")):
        r = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        last = [line for line in r.stderr.splitlines() if line.strip()][-1]
        assert last.startswith("error:") and match in last and "Traceback" not in r.stderr


def test_asam_interval_two_equals_a_hand_driven_reference(tiny_st, tiny_st_student, sentences_file, tmp_path,
                                                          monkeypatch):
    """4 steps of batch 4 x accumulation 2 with train.asam_interval=2 through the trainer end with
    the parameters of the same steps driven by hand: plain steps at 1 and 3, perturbed steps at
    2 and 4 whose closure re-runs exactly that step's two micro-batches."""
    from sentence_transformers import SentenceTransformer
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import set_seed

    seen: dict = {}

    class Keeping(DistillTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if not self._in_closure:
                seen.setdefault(self.state.global_step, []).append(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    cfg = _emb_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "run", "train.max_steps=4",
                   "train.batch_size=4", "train.grad_accum=2", "train.asam_interval=2", "train.optimizer=asam",
                   "train.rho=0.5", "method_args={w_task: 0.0}")
    with monkeypatch.context() as m:
        m.setattr(emb, "DistillTrainer", Keeping)
        emb.run_embedding(cfg, progress=False)
    assert sorted(seen) == [0, 1, 2, 3] and all(len(v) == 2 for v in seen.values())

    set_seed(cfg.train.seed)
    student, method = emb.build_student_and_method(cfg, 48)
    wrapper = emb.EmbeddingDistillModel(student, method, emb.pooling_mode(student))
    wrapper.train()
    opt = DistillTrainer(model=wrapper, args=emb.training_arguments(cfg.train, tmp_path / "ref"),
                         train_config=cfg.train).create_optimizer()
    sched = LambdaLR(opt.base, lambda t: 1 - t / 4)  # linear decay, no warm-up (the tiny config)
    for step in range(4):
        def run_micro(batches=seen[step]):
            for b in batches:
                (wrapper(**b)["loss"] / 2).backward()
        opt.zero_grad()
        run_micro()
        opt.step(run_micro)
        sched.step()
    assert opt.sam_steps == 4
    ref = torch.cat([p.detach().flatten() for p in student.parameters()])
    got = torch.cat([p.detach().flatten() for p in SentenceTransformer(str(tmp_path / "run" / "student"),
                                                                        device="cpu").parameters()])
    assert torch.allclose(ref, got, rtol=1e-5, atol=1e-6), float((ref - got).abs().max())


def test_the_interval_rule_lives_in_the_optimizer():
    """The trainer stashes micro-batches exactly for the steps ASAM will perturb, skipped steps counted."""
    from lmdistill.optim import ASAM

    w = torch.nn.Parameter(torch.ones(3))
    opt = ASAM(torch.optim.SGD([w], lr=0.1), rho=0.1, interval=3)
    seen, calls = [], []

    def closure():
        calls.append(1)
        loss = (w * w).sum()
        loss.backward()
        return loss

    for _ in range(7):
        seen.append(opt.perturbs_next())
        before = len(calls)
        w.grad = torch.ones(3)
        opt.step(closure)
        assert (len(calls) > before) == seen[-1]  # the closure ran exactly when announced
    assert seen == [False, False, True, False, False, True, False]
    assert not ASAM(torch.optim.SGD([w], lr=0.1), rho=0.0, interval=1).perturbs_next()


@pytest.mark.parametrize("clip", ["global", "per_group", "none"])
def test_clipping_modes(clip):
    from lmdistill.optim import ASAM

    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))
    base = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0)
    opt = ASAM(base, rho=0.0, max_grad_norm=1.0, clip=clip)
    a.grad, b.grad = torch.full((4,), 3.0), torch.full((1,), 4.0)  # norms 6 and 4, together sqrt(52)
    opt.step()
    na, nb = float(a.detach().norm()), float(b.detach().norm())
    expect = {"global": (6 / 52 ** 0.5, 4 / 52 ** 0.5), "per_group": (1.0, 1.0), "none": (6.0, 4.0)}[clip]
    assert (na, nb) == pytest.approx(expect, rel=1e-5)
