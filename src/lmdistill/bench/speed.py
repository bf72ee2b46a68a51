"""Cost of each method: seconds per optimizer step and peak memory, with the same batch.

Each method runs a few optimizer steps (forward, backward, the (A)SAM closure where the
method's recipe uses it, the optimizer update) on one fixed batch; the first step is a
warm-up and is not timed. Peak memory: on a GPU, ``torch.cuda.max_memory_allocated`` with
the counter reset per method, all in this process; on the CPU, the peak resident set of a
fresh child process per method (loading included, so it is what a training run needs),
because a process's CPU peak cannot be reset.

The floor a method cannot beat: for the LM pair, the teacher forward without LM head plus
the student's SFT step; for embeddings, the student's step with a cached teacher (cosine
embedding KD, AdamW). Each method's ``ratio`` is its seconds per step over the floor's.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

import torch

from lmdistill.bench.quality import TALAS_AUTHORS
from lmdistill.config import load_config, resolve_data_path

LM_METHODS = ["sft", "sft+gc", "sra", "sra+cache", "sra (no span logit term)+cache", "uld", "uld+cache", "mined",
              "mined+cache", "dskd", "multilevel_ot", "multilevel_ot+cache"]
EMB_METHODS = ["talas", "talas (task term)", "talas (ASAM every step)", "talas (authors' settings)", "embed_kd",
               "all_layer", "rkd", "stella"]
# a method with options: "<method> (<what>)" -> the overrides it runs with. TALAS's recipe has no
# task term and perturbs every 2nd step; the rows put back what it changed
OPTION_ROWS = {"sra (no span logit term)": ["method_args.w_logit=0.0"],
               "talas (task term)": ["method_args.w_task=0.001"],
               "talas (ASAM every step)": ["train.asam_interval=1"],
               "talas (authors' settings)": TALAS_AUTHORS}
PRESETS = {
    "cpu": {
        "lm": {"config": "configs/sra-gemma270m-to-smollm2.yaml", "batch": 4, "max_length": 128},
        "embedding": {"config": "configs/talas-mpnet-to-minilm-l3.yaml", "batch": 32, "max_length": 64},
    },
}


def _recipe_optimizer(method: str, pair: str) -> str:
    return "asam" if (pair == "embedding" and method == "talas") else "adamw"


def _lm_step_fn(cfg_overrides: list[str], method: str, floor: bool, targets: str | None = None):
    """The wrapper, one fixed batch and the config. ``targets``: a file of the batch's teacher
    targets (as a teacher cache stores them): the teacher's weights are then not loaded."""
    from safetensors.torch import load_file

    from lmdistill import models
    from lmdistill.data.collate import InstructionCollator
    from lmdistill.data.readers import read_instructions
    from lmdistill.methods.llm.sft import SFT
    from lmdistill.train.lm import LMDistillModel, build_method, load_lm_pair

    name = "sft" if floor else method
    extra = [f"method={name}"] + ([] if name == "sra" else ["method_args={}"])  # the config holds SRA's options
    cfg = load_config(PRESETS_CFG["lm"], cfg_overrides + extra)
    student, teacher, s_tok, t_tok = load_lm_pair(cfg, teacher_needed=targets is None)
    if targets is not None:
        t_tok = models.load_tokenizer(cfg.teacher, cfg.cache_dir, cfg.trust_remote_code)
        teacher_ref = models.load_causal_config(cfg.teacher, cfg.cache_dir, cfg.trust_remote_code)
    torch.manual_seed(0)
    m = build_method(cfg, student, teacher if targets is None else teacher_ref, s_tok, t_tok)
    if floor:
        m.needs_teacher = True  # SFT plus the teacher forward (no LM head): the floor
        assert isinstance(m, SFT)
    wrapper = LMDistillModel(student, teacher, m)
    rows = read_instructions(resolve_data_path(cfg.data.train[0], cfg), cfg.train.batch_size)
    batch = InstructionCollator(s_tok, t_tok, cfg.data.max_length, m.needs().spans, max_spans=m.needs().max_spans,
                                prompt_max_fraction=cfg.data.prompt_max_fraction)(
        [{"prompt": r.prompt, "response": r.response} for r in rows])
    if targets is not None:
        batch["teacher_targets"] = load_file(targets)
    return wrapper, batch, cfg


def _write_targets(overrides: list[str], method: str, path: str) -> None:
    """The fixed batch's teacher targets, computed once and stored as a teacher cache stores them."""
    from safetensors.torch import save_file

    from lmdistill.methods.llm.base import Heads
    from lmdistill.train.lm_cache import DTYPES

    wrapper, batch, cfg = _lm_step_fn(overrides, method, False)
    with torch.no_grad():
        tg = wrapper.method.teacher_targets(batch, wrapper.teacher_pass(batch), Heads(**wrapper.teacher_heads()),
                                            cfg.data.teacher_top_k)
    dtype = DTYPES[cfg.data.teacher_cache_dtype]
    out = {k: v.to(torch.int32 if k == "idx" else (torch.float32 if k in ("mass", "lse") else dtype)).contiguous()
           for k, v in tg.items() if k != "shared_mass"}
    if wrapper.method.cache_form == "token_logits":
        out["vocab"] = torch.tensor(int(wrapper.teacher_heads()["teacher_head_weight"].shape[0]))
    save_file(out, path)


def _emb_step_fn(cfg_overrides: list[str], method: str, floor: bool):
    from lmdistill.train.embedding import (
        EmbeddingDistillModel,
        SentenceCollator,
        build_student_and_method,
        pooling_mode,
        teacher_cache,
        training_sentences,
    )

    extra = ["method=embed_kd", "method_args={loss: cosine}"] if floor else [f"method={method}"]
    if not floor and method != "talas":
        extra.append("method_args={}")
    cfg = load_config(PRESETS_CFG["embedding"], cfg_overrides + extra)
    sentences = training_sentences(cfg)
    cached = teacher_cache(cfg, sentences, progress=False)
    torch.manual_seed(0)
    student, m = build_student_and_method(cfg, cached.shape[1])
    wrapper = EmbeddingDistillModel(student, m, pooling_mode(student))
    coll = SentenceCollator(student.tokenizer, cached, cfg.data.max_length)
    batch = coll([{"text": s, "idx": i} for i, s in enumerate(sentences[: cfg.train.batch_size])])
    return wrapper, batch, cfg


def config_path(name: str) -> str:
    """A shipped config: from the current folder, else from the repository this package runs from."""
    from pathlib import Path

    here = Path(name)
    if here.exists():
        return str(here)
    return str(Path(__file__).resolve().parents[3] / name)


PRESETS_CFG = {k: config_path(v["config"]) for k, v in PRESETS["cpu"].items()}


GC = "+gc"  # a method name with this suffix runs with train.gradient_checkpointing=true (e.g. sft+gc)
CACHE = "+cache"  # ... with this one, from its teacher targets as a cache holds them (no teacher in memory)


def _base_name(method: str) -> str:
    return method.removesuffix(GC).removesuffix(CACHE).partition(" (")[0]


def _option_overrides(method: str) -> list[str]:
    """The overrides of a row with options (``OPTION_ROWS``), whatever its suffixes."""
    return OPTION_ROWS.get(method.removesuffix(GC).removesuffix(CACHE), [])


def _setup(pair: str, method: str, floor: bool, overrides: list[str], targets: str | None = None):
    """One row ready to time: ``(step, facts)``; ``step()`` runs one optimizer step (forward,
    backward, the (A)SAM closure where the recipe uses it, the update)."""
    from lmdistill.optim import ASAM

    if method.endswith(GC):
        method, overrides = method[: -len(GC)], list(overrides) + ["train.gradient_checkpointing=true"]
    overrides = list(overrides) + _option_overrides(method)
    method = _base_name(method)
    if pair == "lm":
        wrapper, batch, cfg = _lm_step_fn(overrides, method, floor, targets)
    else:
        wrapper, batch, cfg = _emb_step_fn(overrides, method, floor)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wrapper.to(device)

    def to(v):
        return {k: to(x) for k, x in v.items()} if isinstance(v, dict) else v.to(device)

    batch = {k: to(v) for k, v in batch.items()}
    wrapper.train()
    params = [p for p in wrapper.parameters() if p.requires_grad]
    opt_name = "adamw" if floor else _recipe_optimizer(method, pair)
    opt = ASAM(torch.optim.AdamW(params, lr=1e-5), rho=0.0 if opt_name == "adamw" else cfg.train.rho,
               eta=cfg.train.eta, interval=cfg.train.asam_interval, max_grad_norm=1.0)

    def closure():
        loss = wrapper(**batch)["loss"]
        loss.backward()
        return loss

    def step():
        opt.zero_grad()
        closure()
        opt.step(closure)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, {"optimizer": opt_name, "batch": int(batch[next(iter(batch))].shape[0])}


def _measure(pair: str, method: str, floor: bool, steps: int, overrides: list[str], targets: str | None = None) -> dict:
    step, facts = _setup(pair, method, floor, overrides, targets)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if i > 0:
            times.append(time.perf_counter() - t0)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import statistics

    return {"s_per_step": round(statistics.mean(times), 4),
            "s_per_step_sd": round(statistics.stdev(times), 4) if len(times) > 1 else None,
            "s_min": round(min(times), 4), "s_max": round(max(times), 4), "peak_mb": round(peak, 1), **facts}


def _measure_paired(pair: str, rows: list[tuple[str, bool, str | None]], steps: int, overrides: list[str]) -> dict:
    """Every row set up in one process, then timed step by step in turn (``steps`` cycles after a
    warm-up cycle, the order reversed every other cycle): ``{row: [seconds of each timed step]}``.
    Step ``i`` of two rows ran seconds apart, so their ratio sees the same machine state."""
    ready = {name: _setup(pair, name, floor, overrides, targets)[0] for name, floor, targets in rows}
    times: dict[str, list[float]] = {name: [] for name in ready}
    names = list(ready)
    for i in range(steps + 1):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            ready[name]()
            if i > 0:
                times[name].append(round(time.perf_counter() - t0, 4))
    return times


def _child(q, fn, *args):
    try:
        q.put(("ok", fn(*args)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        q.put(("error", f"{type(exc).__name__}: {exc}"))


def _run_isolated(*args, fn=_measure) -> dict:
    if torch.cuda.is_available():
        return fn(*args)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, *args))
    p.start()
    status, value = q.get()
    p.join()
    if status != "ok":
        from lmdistill.errors import LmdistillError

        raise LmdistillError(f"speed benchmark of {args[1]} failed: {value}")
    return value


def speed_benchmark(pair: str, methods: list[str] | None = None, steps: int = 3, preset: str = "cpu",
                    overrides: list[str] | None = None, rounds: int = 1, paired: bool = False) -> dict:
    """The ``lmdistill bench speed`` result: the floor and every method, with ratios.

    ``rounds``: the floor and every method are timed that many times, each time in a fresh
    process, the order reversed every other round; a ratio is taken within its round (against
    that round's floor, or that round's SFT), and the record gives its median over rounds and
    their spread. A machine whose speed drifts between the start and the end of a run (seen
    here: the floor moved 12% between two runs) then moves each ratio's numerator and
    denominator together.

    ``paired``: besides, every row is set up in one process and the rows take their steps in
    turn (``_measure_paired``); ``paired`` in the result holds each row's median step and the
    median over steps of its step's ratio to the floor's (and SFT's) step of the same cycle,
    with the spread. Drift then cancels step by step, not round by round. Peak memory comes
    from the fresh processes of the rounds only (one process holds every row here, so it
    needs the memory of all of them at once: with large models on a GPU, leave it off)."""
    import statistics
    import tempfile
    from pathlib import Path

    from lmdistill.errors import LmdistillError
    from lmdistill.registry import get_method

    methods = methods or (LM_METHODS if pair == "lm" else EMB_METHODS)
    if rounds < 1:
        raise LmdistillError(f"rounds={rounds}: give 1 or more (each round times every row once)")
    for m in methods:
        cls = get_method(_base_name(m), "lm" if pair == "lm" else "embedding")
        if m.endswith(CACHE) and (pair != "lm" or cls.cache_form is None):
            raise LmdistillError(f"{m}: {_base_name(m)} has no teacher cache (the embedding side always caches; "
                                 "DSKD and SFT have none)")
    p = PRESETS[preset][pair]
    ov = [f"train.batch_size={p['batch']}", f"data.max_length={p['max_length']}"] + list(overrides or [])
    per_round: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        targets: dict[str, str | None] = {}
        for m in methods:  # the targets first, each in a process of its own (the teacher's memory stays there)
            targets[m] = None
            if m.endswith(CACHE):
                targets[m] = str(Path(tmp) / f"{_base_name(m)}{len(targets)}.safetensors")
                _run_isolated(ov + _option_overrides(m), _base_name(m), targets[m], fn=_write_targets)
        for i in range(rounds):
            order = ["floor", *methods]
            got = {}
            for m in (order if i % 2 == 0 else order[::-1]):
                got[m] = (_run_isolated(pair, "floor", True, steps, ov) if m == "floor"
                          else _run_isolated(pair, m, False, steps, ov, targets[m]))
            per_round.append(got)
        paired_times = (_run_isolated(pair, [("floor", True, None)] + [(m, False, targets[m]) for m in methods],
                                      steps, ov, fn=_measure_paired) if paired else None)

    def pooled(name: str) -> dict:
        """One row over its rounds: mean time per step and its spread over all timed steps."""
        rs = [r[name] for r in per_round]
        out = dict(rs[0])
        means = [r["s_per_step"] for r in rs]
        out["s_per_step"] = round(statistics.mean(means), 4)
        if len(rs) > 1:
            out["s_per_step_rounds"] = means
            out["s_per_step_sd"] = round(statistics.stdev(means), 4)
        out["s_min"] = min(r["s_min"] for r in rs)
        out["s_max"] = max(r["s_max"] for r in rs)
        out["peak_mb"] = max(r["peak_mb"] for r in rs)
        return out

    def ratio(name: str, to: str, key: str = "s_per_step") -> tuple[float, float | None]:
        return median_ratio([r[name][key] for r in per_round], [r[to][key] for r in per_round])

    out = {"pair": pair, "steps": steps, "rounds": rounds, "device": "cuda" if torch.cuda.is_available() else "cpu",
           "floor": pooled("floor"), "methods": {}}
    for m in methods:
        r = pooled(m)
        r["ratio"], r["ratio_sd"] = ratio(m, "floor")
        out["methods"][m] = r
    if "sft" in out["methods"]:  # a cached method's cost against the student's SFT step (the least it can cost)
        for m, r in out["methods"].items():
            r["ratio_to_sft"], r["ratio_to_sft_sd"] = ratio(m, "sft")
            r["peak_to_sft"] = round(r["peak_mb"] / out["methods"]["sft"]["peak_mb"], 3)
    if paired_times is not None:
        out["paired"] = paired_summary(paired_times)
    return out


def median_ratio(num: list[float], den: list[float]) -> tuple[float, float | None]:
    """The median of the pairwise ratios ``num[i] / den[i]`` (rounds, or paired steps) and their sd."""
    import statistics

    vals = [x / y for x, y in zip(num, den, strict=True)]
    return round(statistics.median(vals), 3), (round(statistics.stdev(vals), 3) if len(vals) > 1 else None)


def paired_summary(times: dict[str, list[float]]) -> dict:
    """Per row of a paired run: the median step, and the median (with the sd) over steps of its
    step's ratio to the floor's step of the same cycle (``ratio``) and to SFT's (``ratio_to_sft``)."""
    import statistics

    out = {}
    for name, ts in times.items():
        row = {"s_per_step_median": round(statistics.median(ts), 4), "steps": ts}
        if name != "floor":
            row["ratio"], row["ratio_sd"] = median_ratio(ts, times["floor"])
            if "sft" in times:
                row["ratio_to_sft"], row["ratio_to_sft_sd"] = median_ratio(ts, times["sft"])
        out[name] = row
    return out
