"""Kill and resume, truncated checkpoints, non-finite losses, planted pickles, determinism."""

import os
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import lmdistill.train.embedding as emb
from lmdistill.config import load_config
from lmdistill.errors import LmdistillError
from lmdistill.train.base import DistillTrainer, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tiny_st, tiny_st_student, sentences_file, out, *extra):
    return load_config(ROOT / "configs/tiny/talas-tiny.yaml", [
        f"teacher={tiny_st}", f"student={tiny_st_student}", f"data.train=[{sentences_file}]", f"output_dir={out}",
        "eval.before=false", "eval.teacher=false", "train.max_steps=6", "train.save_steps=2", "train.save_total_limit=3",
        "train.batch_size=8", *extra])


def _params(folder):
    from sentence_transformers import SentenceTransformer

    return torch.cat([p.detach().flatten() for p in SentenceTransformer(str(folder), device="cpu").parameters()])


class _Kill(Exception):
    pass


def _killing_trainer(at_step):
    class KillAt(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == at_step:
                raise _Kill(f"killed after saving step {at_step}")

    class Killing(DistillTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(KillAt())

    return Killing


@pytest.mark.parametrize("optimizer", ["asam", "adamw"])
def test_kill_and_resume_matches_an_uninterrupted_run(tiny_st, tiny_st_student, sentences_file, tmp_path,
                                                      monkeypatch, optimizer):
    full = emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "full",
                                  f"train.optimizer={optimizer}"), progress=False)
    assert full["resumed_from"] is None
    with monkeypatch.context() as m:
        m.setattr(emb, "DistillTrainer", _killing_trainer(4))
        with pytest.raises(_Kill):
            emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "cut",
                                   f"train.optimizer={optimizer}"), progress=False)
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").endswith("checkpoint-4")
    resumed = emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "cut",
                                     f"train.optimizer={optimizer}"), progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-4")
    a, b = _params(tmp_path / "full" / "student"), _params(tmp_path / "cut" / "student")
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_truncated_checkpoint_falls_back_to_the_previous(tiny_st, tiny_st_student, sentences_file, tmp_path):
    emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path), progress=False)
    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(ckpts).endswith("checkpoint-6")
    weights = ckpts / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert latest_checkpoint(ckpts).endswith("checkpoint-4")
    (ckpts / "checkpoint-4" / "trainer_state.json").write_text("{trunc")
    assert latest_checkpoint(ckpts).endswith("checkpoint-2")
    optim = ckpts / "checkpoint-2" / "optimizer.pt"
    optim.write_bytes(optim.read_bytes()[:-10])
    assert latest_checkpoint(ckpts) is None
    assert not any(p.name.startswith(".staging") for p in ckpts.iterdir())


def test_out_of_disk_keeps_the_previous_checkpoint(tiny_st, tiny_st_student, sentences_file, tmp_path, monkeypatch):
    from lmdistill.train import base

    real = base.save_file
    calls = {"n": 0}

    def full_disk(state, path, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint's weights
            raise OSError(28, "No space left on device")
        return real(state, path, metadata=metadata)

    monkeypatch.setattr(base, "save_file", full_disk)
    with pytest.raises(LmdistillError, match="No space left.*checkpoint-2 is intact"):
        emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path), progress=False)
    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(ckpts).endswith("checkpoint-2")
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]


def test_nonfinite_losses_are_skipped_then_stop(tiny_st, tiny_st_student, sentences_file, tmp_path, monkeypatch):
    from lmdistill.methods.embedding.talas import Talas

    real_forward = Talas.forward
    state = {"calls": 0, "bad": {3}}

    def flaky(self, layers, teacher, view2=None):
        out = real_forward(self, layers, teacher, view2)
        if self.training:
            state["calls"] += 1
            if state["calls"] in state["bad"]:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Talas, "forward", flaky)
    # adamw: one forward per step, so forward call n is step n
    m = emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "a", "train.optimizer=adamw",
                               "method_args={w_task: 0.0}"), progress=False)
    assert m["nonfinite_steps"] == 1 and m["steps"] == 6
    state.update(calls=0, bad=set(range(3, 100)))
    with pytest.raises(LmdistillError, match="non-finite losses in a row"):
        emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / "b", "train.optimizer=adamw",
                               "method_args={w_task: 0.0}", "train.max_nonfinite_steps=3", "train.max_steps=20"),
                          progress=False)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").endswith("checkpoint-2")


def test_skipped_step_leaves_the_weights_unchanged(tiny_st, tiny_st_student, sentences_file, tmp_path, monkeypatch):
    from lmdistill.methods.embedding.talas import Talas

    real_forward = Talas.forward
    monkeypatch.setattr(Talas, "forward", lambda self, *a, **k: {**real_forward(self, *a, **k),
                                                                  "loss": torch.tensor(float("inf"), requires_grad=True)})
    m = emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path, "train.max_steps=2",
                               "train.max_nonfinite_steps=5", "train.save_steps=0"), progress=False)
    assert m["nonfinite_steps"] == 2
    assert torch.equal(_params(tmp_path / "student"), _params(tiny_st_student))


def test_planted_pickle_in_a_checkpoint_executes_nothing(tiny_st, tiny_st_student, sentences_file, tmp_path,
                                                          monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(emb, "DistillTrainer", _killing_trainer(2))
        with pytest.raises(_Kill):
            emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path), progress=False)
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = Path(latest_checkpoint(tmp_path / "checkpoints"))
    for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt"):
        torch.save({"state": Evil()}, ckpt / name)
    with pytest.raises(LmdistillError, match="not plain tensors.*nothing was executed"):
        emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path), progress=False)
    assert not marker.exists()


def test_same_seed_same_losses(tiny_st, tiny_st_student, sentences_file, tmp_path):
    runs = [emb.run_embedding(_cfg(tiny_st, tiny_st_student, sentences_file, tmp_path / str(i), "train.save_steps=0"),
                              progress=False) for i in range(2)]
    losses = [[h["loss"] for h in r["log_history"] if "loss" in h] for r in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_trust_remote_code_is_off_by_default():
    cfg = load_config(None, [])
    assert cfg.trust_remote_code is False


def test_lm_kill_and_resume_matches_an_uninterrupted_run(llama_lm, gpt2_lm, instructions_file, tmp_path, monkeypatch):
    """SRA: killed right after the checkpoint of step 2, the same command resumes there and ends
    with the parameters of a run that was never interrupted."""
    from transformers import AutoModelForCausalLM

    import lmdistill.train.lm as lmrun

    def cfg(out):
        return load_config(ROOT / "configs/tiny/sra-tiny.yaml", [
            f"student={llama_lm}", f"teacher={gpt2_lm}", f"data.train=[{instructions_file}]", f"output_dir={out}",
            "data.eval={}", "train.max_steps=4", "train.save_steps=2", "train.batch_size=2"])

    full = lmrun.run_lm(cfg(tmp_path / "full"), progress=False)
    assert full["resumed_from"] is None
    with monkeypatch.context() as m:
        m.setattr(lmrun, "DistillTrainer", _killing_trainer(2))
        with pytest.raises(_Kill):
            lmrun.run_lm(cfg(tmp_path / "cut"), progress=False)
    resumed = lmrun.run_lm(cfg(tmp_path / "cut"), progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 4

    def params(folder):
        return torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(folder).parameters()])

    assert torch.allclose(params(tmp_path / "full" / "student"), params(tmp_path / "cut" / "student"),
                          rtol=1e-5, atol=1e-6)
