"""Test session set-up: offline, a private cache folder, tiny models built once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"})
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


def pytest_sessionstart(session):
    """The suite reads real tokenizers and data sets: say where they are looked for, once, if absent."""
    missing = [f"{name} ({path})" for name, path in (("LMDISTILL_TOKENIZERS", tiny.TOKENIZERS),
                                                     ("LMDISTILL_DATA", tiny.DATA)) if not path.is_dir()]
    if missing:
        pytest.exit("the tests need the shared assets folder next to the checkout (../shared) or these "
                    f"variables set to its folders: {', '.join(missing)} not found", returncode=4)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("lmdistill-cache")
    old = os.environ.get("LMDISTILL_CACHE")
    os.environ["LMDISTILL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LMDISTILL_CACHE", None)
    else:
        os.environ["LMDISTILL_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def gpt2_lm(tiny_dir):
    return tiny.tiny_causal_lm("gpt2", tiny_dir / "gpt2")


@pytest.fixture(scope="session")
def llama_lm(tiny_dir):
    return tiny.tiny_causal_lm("llama", tiny_dir / "llama")


@pytest.fixture(scope="session")
def tiny_st(tiny_dir):
    return tiny.tiny_sentence_model(tiny_dir / "st-teacher", hidden=48, layers=2, seed=1)


@pytest.fixture(scope="session")
def tiny_st_student(tiny_dir):
    return tiny.tiny_sentence_model(tiny_dir / "st-student", hidden=32, layers=3, seed=2)


@pytest.fixture(scope="session")
def sentences_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    words = ["cat", "dog", "runs", "sleeps", "red", "blue", "car", "house", "big", "small", "eats", "food"]
    lines = [" ".join(words[(i * k) % len(words)] for k in (1, 3, 5, 7)) + f" {i}" for i in range(64)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def sts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sts.tsv"
    rows = [(4.5, "a cat sleeps", "the cat is sleeping"), (0.5, "a red car", "dogs eat food"),
            (3.0, "a big house", "a large house"), (1.0, "blue sky", "a small dog runs"),
            (2.5, "a dog runs", "the dog is running fast"), (0.0, "eat food", "red blue car")]
    path.write_text("".join(f"{s}\t{a}\t{b}\n" for s, a, b in rows))
    return path


@pytest.fixture(scope="session")
def instructions_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("data") / "instr.jsonl"
    rows = [
        {"prompt": "### Instruction:\nName a colour.\n\n### Response:\n", "output": "Blue is a colour."},
        {"prompt": "### Instruction:\nSay hello.\n\n### Response:\n", "output": "Hello, world! 😀"},
        {"prompt": "### Instruction:\nCount to three.\n\n### Response:\n", "output": "1, 2, 3."},
        {"prompt": "### Instruction:\nTranslate 'cat'.\n\n### Response:\n", "output": ["猫 (neko)", "chat"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def same_rows_file(tmp_path_factory):
    """Identical instruction rows: every micro-batch and every process sees the same token counts,
    so token-averaged CE is layout-invariant and LM runs can be compared exactly across layouts."""
    import json

    row = {"prompt": "### Instruction:\nName two colours.\n\n### Response:\n", "output": "Blue and red, 1, 2."}
    path = tmp_path_factory.mktemp("data") / "same.jsonl"
    path.write_text((json.dumps(row) + "\n") * 12)
    return path
