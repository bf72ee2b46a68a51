"""The GPU paths: every LM method under bf16 autocast, the attention rows, training and
evaluation commands with ``train.bf16``. Skipped where there is no CUDA device (CI has none;
run them on a GPU machine: ``pytest tests/test_cuda.py``)."""

import json

import pytest
import torch
from test_cli import run
from test_lm_methods import METHODS, _setup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", METHODS)
def test_lm_method_on_cuda_in_bf16(method, gpt2_lm, llama_lm, instructions_file):
    wrapper, batch = _setup(method, gpt2_lm, llama_lm, instructions_file)
    wrapper.cuda()
    batch = {k: v.cuda() for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = wrapper(**batch)
        assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v)), out
        assert out["loss"].device.type == "cuda"
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_attention_rows_match_eager_on_cuda(dtype, atol):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmdistill.models.attention import RowCapture

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval().to("cuda", dtype)
    ids = torch.randint(0, 100, (2, 9), device="cuda")
    mask = torch.ones(2, 9, dtype=torch.long, device="cuda")
    mask[1, 6:] = 0
    cap = RowCapture(model, [1, 3], "last_token")
    cap.prepare(mask)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    rows = cap.rows()
    eager = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().to("cuda", dtype)
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    for layer in (1, 3):
        A = ref.attentions[layer - 1].float()
        expect = torch.stack([A[0, :, 8].sum(0), A[1, :, 5].sum(0)])
        assert torch.allclose(rows[layer].float(), expect, atol=atol)


def test_lm_train_and_eval_commands_on_cuda_bf16(gpt2_lm, llama_lm, instructions_file, tmp_path):
    r = run("train", "configs/tiny/sra-tiny.yaml", f"student={gpt2_lm}", f"teacher={llama_lm}", "train.bf16=true",
            f"data.train=[{instructions_file}]", f"data.eval={{toy: {instructions_file}}}", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["steps"] == 3 and m["nonfinite_steps"] == 0
    assert all(v == v for v in (m["train_loss"], m["after"]["toy"]["bpb"]))
    # bits per byte on the GPU is the CPU's value
    from lmdistill.eval.bpb import bpb_eval
    from lmdistill.models import load_causal_lm, load_tokenizer

    student = str(tmp_path / "student")
    gpu = bpb_eval(student, instructions_file, progress=False)
    cpu = bpb_eval(load_causal_lm(student), instructions_file, tokenizer=load_tokenizer(student), progress=False)
    assert gpu["bpb"] == pytest.approx(cpu["bpb"], rel=2e-3)


@pytest.mark.parametrize("method", ["dskd", "mined", "multilevel_ot", "uld"])
def test_lm_baselines_train_on_cuda(method, gpt2_lm, llama_lm, instructions_file, tmp_path):
    r = run("train", "configs/tiny/sra-tiny.yaml", f"student={gpt2_lm}", f"teacher={llama_lm}", "train.bf16=true",
            f"method={method}", "method_args={}", f"data.train=[{instructions_file}]", "data.eval={}",
            f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3


def test_talas_asam_on_cuda_bf16(tiny_st, tiny_st_student, sentences_file, sts_file, tmp_path):
    r = run("train", "configs/tiny/talas-tiny.yaml", f"teacher={tiny_st}", f"student={tiny_st_student}",
            f"data.train=[{sentences_file}]", f"data.eval={{toy: {sts_file}}}", "train.bf16=true",
            f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["steps"] == 4 and m["nonfinite_steps"] == 0 and "after" in m
