"""The ``adakv demo``: one long prompt answered with the full KV cache and with an Ada-KV compressed one.

    from adakv_compile.demo import run_demo, format_summary
    result = run_demo(AdaKVConfig(budget=128), context_tokens=1024, out_dir="bench/results/demo")
    print(format_summary(result))

The prompt is a seeded pass-key-in-a-haystack chat (a 5-digit key hidden at a random depth in repeated
filler text, then "What is the pass key?"). The model answers greedily:

- full cache: the model as it is (no compile), with a plain ``DynamicCache``;
- compressed: ``model.forward`` compiled with ``adakv_backend(config, inner=...)``;
- a budget sweep (``sweep``, default 64/128/256/512 tokens per KV head) on the same prompt and the same
  compiled graphs: ``backend.reconfigure`` switches the budget, nothing is recompiled (the graph count
  is printed), so one sees where compression holds and where it breaks.

Right after the prefill (the first ``generate`` step) a logits processor reads the cache: bytes held
(``store.store_bytes`` of every layer's keys and values) and tokens kept per (layer, KV head)
(``store.read_layout``). The allocation is drawn as a heat map (layers x KV heads) into
``<out_dir>/allocation.png``; the numbers go to ``<out_dir>/demo.json``.

``run_demo`` takes any causal LM and tokenizer (``model=``, ``tokenizer=``); by default it loads
SmolLM2-135M-Instruct through :func:`adakv_compile.models.load_smollm2`. Nothing happens at import.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .cache import cache_kwarg
from .config import AdaKVConfig

log = logging.getLogger("adakv_compile.demo")

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
QUESTION = "\n\nWhat is the pass key?"
ANSWER_START = "The pass key is"  # plain-text prompts only (no chat template: a base model)

DEFAULT_SWEEP = (64, 128, 256, 512)
DEFAULT_CONTEXT = 1024  # past every default budget, short enough for about a minute on 2 CPU cores
PNG_NAME = "allocation.png"
JSON_NAME = "demo.json"


# --------------------------------------------------------------------------------------------- prompt
@dataclass
class Prompt:
    ids: list[int]
    passkey: str
    depth: float       # where the needle sits, as a fraction of the filler
    text: str


def key_positions(tokenizer, ids: list[int], key: str) -> list[int]:
    """Token positions whose text overlaps an occurrence of ``key`` (empty if the decode does not line up)."""
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    starts, at = [], 0
    for p in pieces:
        starts.append(at)
        at += len(p)
    joined = "".join(pieces)
    out: set[int] = set()
    begin = joined.find(key)
    while begin >= 0:
        end = begin + len(key)
        out.update(i for i, (s0, p) in enumerate(zip(starts, pieces)) if s0 < end and s0 + len(p) > begin)
        begin = joined.find(key, end)
    return sorted(out)


def _encode_user_turn(tokenizer, user_text: str, answer_start: str = "") -> list[int]:
    """Token ids of a one-turn chat ending with the assistant prompt. A tokenizer without a chat template
    (a base model such as Gemma-3-270M) gets plain text instead: BOS (the tokenizer's special tokens),
    ``user_text``, then ``"\nAnswer: " + answer_start`` so that a base model continues with the answer."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                             add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(user_text + "\nAnswer:" + (" " + answer_start if answer_start else ""))["input_ids"])


def passkey_prompt(tokenizer, context_tokens: int = DEFAULT_CONTEXT, seed: int = 0) -> Prompt:
    """A seeded pass-key retrieval prompt of about ``context_tokens`` tokens (chat template included)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.2, 0.8)

    def build(reps: int) -> tuple[str, list[int]]:
        cut = round(reps * depth)
        hay = FILLER * cut + NEEDLE.format(key=key) + FILLER * (reps - cut)
        text = INTRO + hay + QUESTION
        return text, _encode_user_turn(tokenizer, text, ANSWER_START)

    _, base = build(0)
    _, one = build(10)
    per_rep = max((len(one) - len(base)) / 10, 1e-6)
    reps = max(0, round((context_tokens - len(base)) / per_rep))
    text, ids = build(reps)
    # the estimate is linear; trim (or add) filler until the prompt fits the request
    while len(ids) > context_tokens and reps > 0:
        reps -= max(1, int((len(ids) - context_tokens) / per_rep))
        text, ids = build(max(reps, 0))
    return Prompt(ids, key, depth, text)


def passkey_score(answer: str, key: str) -> dict:
    """Exact match (the key appears) and partial credit (best digit-string similarity, 0..1).

    The tokenizer splits numbers into single digits, so eviction can drop one digit ("61591" →
    "6159"): exact match alone hides how close the answer was.
    """
    runs = re.findall(r"\d+", answer)
    partial = max((difflib.SequenceMatcher(None, key, r).ratio() for r in runs), default=0.0)
    return {"exact": key in answer, "partial": round(partial, 3)}


# ------------------------------------------------------------------------------------ cache readings
def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of an HF cache (``.layers``) or a legacy tuple cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


def read_cache(cache, row: int = 0, full_keys: Optional[list] = None, keep_keys: bool = False) -> dict:
    """Bytes held and tokens kept per (layer, KV head) of batch row ``row``.

    A compacted store reports the lengths in its header; a plain tensor keeps all of its tokens.
    ``keep_keys``: also return each layer's plain keys ``[Hkv, n, D]`` (row ``row``), cloned.
    ``full_keys``: pass anything (e.g. the keys of a full-cache run) to also get ``positions``:
    [layer][head] sorted prompt positions kept (the store records them).
    """
    from .kernels import store

    kept: list[list[int]] = []
    positions: list[list[list[int]]] = []
    keys_out: list[torch.Tensor] = []
    held = 0
    compacted = 0
    logical = 0
    for layer, (keys, values) in enumerate(_cache_layers(cache)):
        held += store.store_bytes(keys) + store.store_bytes(values)
        logical = max(logical, int(keys.shape[2]))
        if store.is_store_view(keys):
            _, lay = store.read_layout(keys)
            kept.append([int(x) for x in lay.lengths[row].tolist()])
            compacted += 1
            if full_keys is not None:
                _, _, pos = store.unpack(keys, values, positions=True)
                positions.append([p.tolist() for p in pos[row]])
        else:
            kept.append([int(keys.shape[2])] * int(keys.shape[1]))
            if full_keys is not None:  # a dense layer (a sliding window holds the last tokens): fixed below
                positions.append(int(keys.shape[2]))
            if keep_keys:
                keys_out.append(keys[row].detach().clone())
    out = {"bytes": held, "kept": kept, "compacted_layers": compacted, "logical_tokens": logical}
    if full_keys is not None:
        positions = [[list(range(logical - p, logical))] * len(k) if isinstance(p, int) else p
                     for p, k in zip(positions, kept)]
        out["positions"] = positions
    if keep_keys:
        out["keys"] = keys_out
    return out


def _make_probe(cache, on_step: Callable[[], None], **read_kw):
    """A LogitsProcessor that reads ``cache`` right after the prefill (its first call)."""
    from transformers import LogitsProcessor

    class PrefillProbe(LogitsProcessor):
        def __init__(self):
            self.reading: Optional[dict] = None
            self.prefill_s: Optional[float] = None
            self.t0 = time.perf_counter()

        def __call__(self, input_ids, scores):
            if self.reading is None:
                self.prefill_s = time.perf_counter() - self.t0
                self.reading = read_cache(cache, **read_kw)
            on_step()
            return scores

    return PrefillProbe()


def _number_done(tokenizer, start: int):
    """A StoppingCriteria: stop once the answer holds a number that has ended (a digit then a non-digit) or a
    line break after some text -- the pass key is the answer; the tokens after it only cost time."""
    from transformers import StoppingCriteria

    class NumberDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            text = tokenizer.decode(input_ids[0, start:].tolist(), skip_special_tokens=True)
            done = re.search(r"\d[^\d]", text) is not None or "\n" in text.strip()
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return NumberDone()


def answer(model, tokenizer, ids: list[int], max_new_tokens: int, label: str = "",
           progress: bool = True, **read_kw) -> dict:
    """Greedy answer to ``ids`` with a fresh ``DynamicCache``; the cache is read after the prefill
    (``read_kw`` go to :func:`read_cache`). Generation stops after the first complete number."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

    cache = DynamicCache(config=model.config)
    bar = tqdm(total=max_new_tokens, desc=f"{label:<10} tokens", unit="tok", leave=False,
               disable=not progress)
    probe = _make_probe(cache, lambda: bar.update(1), **read_kw)
    input_ids = torch.tensor([ids], dtype=torch.long)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=pad, eos_token_id=eos,
                                 logits_processor=LogitsProcessorList([probe]),
                                 stopping_criteria=StoppingCriteriaList([_number_done(tokenizer, len(ids))]),
                                 **{cache_kwarg(model): cache})
    finally:
        bar.close()
    total_s = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return {"answer": text, "new_tokens": len(new), "prefill_s": probe.prefill_s, "total_s": total_s,
            "cache": probe.reading}


def needle_kept(positions: list, key_pos: list[int], n: int, window: int) -> dict:
    """How many (layer, KV head) kept the pass key's tokens, from recovered kept positions.

    Also checks the recovery itself: every head must hold the last ``window`` prompt positions.
    """
    heads = [(l, h, set(p)) for l, layer in enumerate(positions) for h, p in enumerate(layer)]
    win = set(range(max(n - window, 0), n))
    out = {"key_positions": key_pos, "heads": len(heads),
           "window_kept_by_all_heads": all(win <= p for _, _, p in heads)}
    if not key_pos or not heads:
        return out
    per_pos = {i: sum(i in p for _, _, p in heads) for i in key_pos}
    frac = [len(set(key_pos) & p) / len(key_pos) for _, _, p in heads]
    out.update(
        heads_keeping_each_key_token=per_pos,
        mean_fraction_of_key_tokens_kept=round(sum(frac) / len(frac), 3),
        heads_keeping_all_key_tokens=sum(f == 1.0 for f in frac),
        heads_keeping_none=sum(f == 0.0 for f in frac),
        per_layer_fraction=[round(sum(len(set(key_pos) & set(p)) / len(key_pos) for p in layer) / len(layer), 3)
                            for layer in positions],
    )
    return out


# ------------------------------------------------------------------------------------------ the demo
@dataclass
class DemoResult:
    model: str
    config: dict
    inner: str
    prompt_tokens: int
    passkey: str
    depth: float
    full: dict
    compressed: dict
    kept: list                       # [layer][kv head] tokens kept after the prefill (row 0)
    bytes_full: int
    bytes_compressed: int
    percent_of_full: float
    rewrite: dict                    # counts from backend.report
    needle: dict = field(default_factory=dict)  # which heads kept the pass key's tokens
    sweep: list = field(default_factory=list)   # one row per budget (+ "full"): answer, score, KV %, tokens %
    sweep_graphs: dict = field(default_factory=dict)  # graphs compiled before / after the sweep
    accuracy: list = field(default_factory=list)  # per budget (+ "full"): right answers over ``prompts`` prompts
    png: Optional[str] = None
    json: Optional[str] = None
    timings: dict = field(default_factory=dict)
    device: str = field(default_factory=lambda: _device_name())

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _device_name() -> str:
    import os
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def _swap_forward(model, new_forward):
    """Set ``model.forward``; returns a function that restores what was there."""
    had_own = "forward" in vars(model)
    old = vars(model).get("forward")
    model.forward = new_forward

    def restore():
        if had_own:
            model.forward = old
        else:
            del model.forward

    return restore


def _sweep_row(label: str, budget: Optional[int], run: dict, key: str, bytes_full: int, full_tokens: int) -> dict:
    kept = sum(sum(row) for row in run["cache"]["kept"])
    return {"label": label, "budget": budget, "answer": run["answer"], "score": passkey_score(run["answer"], key),
            "bytes": run["cache"]["bytes"],
            "percent_of_full": round(100.0 * run["cache"]["bytes"] / bytes_full, 2) if bytes_full else None,
            "tokens_kept": kept,
            "percent_tokens": round(100.0 * kept / full_tokens, 2) if full_tokens else None,
            "total_s": round(run["total_s"], 2)}


def run_demo(config: Optional[AdaKVConfig] = None, *, context_tokens: int = DEFAULT_CONTEXT,
             out_dir: str | Path = "bench/results/demo", inner: str = "eager", seed: int = 0,
             max_new_tokens: int = 16, model=None, tokenizer=None, model_name: Optional[str] = None,
             progress: bool = True, sweep: Optional[Sequence[int]] = DEFAULT_SWEEP, prompts: int = 3,
             model_key: Optional[str] = None) -> DemoResult:
    """Answer one pass-key prompt with the full and the compressed cache; write the PNG and JSON.

    ``model``/``tokenizer`` default to SmolLM2-135M-Instruct (:func:`adakv_compile.models.load_smollm2`).
    The model's ``forward`` is compiled for the compressed run and restored afterwards.
    ``sweep``: budgets (tokens per KV head, > window) answered again on the same prompt with the same
    compiled graphs (``backend.reconfigure``, no recompile); ``None`` or empty: no sweep.
    ``prompts``: pass-key prompts per budget (seeds ``seed``.. ``seed + prompts - 1``); the others than the
    first are answered with at most 12 new tokens, and the accuracy per budget is printed beside the full
    cache's. ``model_key``: a model of :data:`adakv_compile.models.MODELS` ("smollm2", "gemma3-270m").
    """
    if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
        raise ValueError(f"run_demo(prompts={prompts!r}): must be an integer >= 1")
    from tqdm.auto import tqdm

    from .backend import adakv_backend

    config = AdaKVConfig(budget=128) if config is None else config
    if not config.compresses:
        raise ValueError("the demo compares against the full cache: give a budget or a compression_ratio")
    timings: dict[str, float] = {}
    budgets = sorted({int(b) for b in (sweep or ()) if b > config.window} - {config.budget})
    steps = tqdm(total=5, desc="adakv demo", unit="step", disable=not progress)
    try:
        t0 = time.perf_counter()
        if model is None or tokenizer is None:
            from .models import MODELS
            if (model_key or "smollm2") not in MODELS:
                raise ValueError(f"run_demo(model_key={model_key!r}): one of {sorted(MODELS)}")
            name, load = MODELS[model_key or "smollm2"]
            steps.set_postfix_str(f"loading {name}")
            model, tokenizer = load(torch.float32)
            model_name = model_name or name
        model_name = model_name or type(model).__name__
        model.eval()
        timings["load_s"] = time.perf_counter() - t0
        steps.update(1)

        prompt = passkey_prompt(tokenizer, context_tokens, seed)
        log.info("prompt: %d tokens, pass key %s at depth %.2f", len(prompt.ids), prompt.passkey, prompt.depth)

        steps.set_postfix_str("full cache")
        t1 = time.perf_counter()
        full = answer(model, tokenizer, prompt.ids, max_new_tokens, "full", progress, keep_keys=True)
        full_keys = full["cache"].pop("keys")
        extra = [passkey_prompt(tokenizer, context_tokens, seed + i) for i in range(1, prompts)]
        short = min(max_new_tokens, 12)  # a 5-digit key and a little context
        extra_full = [answer(model, tokenizer, p.ids, short, f"full #{i + 2}", progress)
                      for i, p in enumerate(extra)]
        timings["full_runs_s"] = time.perf_counter() - t1
        steps.update(1)

        steps.set_postfix_str(f"compressed (compile, inner={inner})")
        backend = adakv_backend(config, inner=inner)
        restore = _swap_forward(model, torch.compile(model.forward, backend=backend))
        try:
            t1 = time.perf_counter()
            comp = answer(model, tokenizer, prompt.ids, max_new_tokens, "compressed", progress,
                          full_keys=full_keys)
            timings["first_compressed_run_incl_compile_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            steps.update(1)
            steps.set_postfix_str(f"budget sweep {budgets}")
            graphs_before = backend.graphs_compiled
            swept = {}
            try:
                extra_comp = {None: [answer(model, tokenizer, p.ids, short, f"comp. #{i + 2}", progress)
                                     for i, p in enumerate(extra)]}
                for b in budgets:
                    backend.reconfigure(config.replace(budget=b, compression_ratio=None))
                    swept[b] = answer(model, tokenizer, prompt.ids, max_new_tokens, f"budget {b}", progress)
                    extra_comp[b] = [answer(model, tokenizer, p.ids, short, f"{b} #{i + 2}", progress)
                                     for i, p in enumerate(extra)]
            finally:
                backend.reconfigure(config)
            sweep_graphs = {"before_sweep": graphs_before, "after_sweep": backend.graphs_compiled}
            timings["other_compressed_runs_s"] = time.perf_counter() - t1
        finally:
            restore()
        steps.update(1)

        del full_keys
        for run in (full, comp):
            run["score"] = passkey_score(run["answer"], prompt.passkey)
        needle = needle_kept(comp["cache"].pop("positions"), key_positions(tokenizer, prompt.ids, prompt.passkey),
                             len(prompt.ids), config.window)
        report = backend.report
        rewrite = {
            "graphs": len(report.graphs),
            "rewritten": sum(r.action == "rewritten" for r in report),
            "skipped": sum(r.action == "skipped" for r in report),
            "compressed_layers": sorted({r.layer for r in report if r.mode == "compress"}),
            "skipped_reasons": sorted({r.reason for r in report if r.action == "skipped"}),
        }
        bytes_full = full["cache"]["bytes"]
        bytes_comp = comp["cache"]["bytes"]
        full_tokens = sum(sum(row) for row in full["cache"]["kept"])
        main_label = (str(config.budget) if config.budget is not None
                      else f"ratio {config.compression_ratio}")
        sweep_rows = [_sweep_row(str(b), b, run, prompt.passkey, bytes_full, full_tokens)
                      for b, run in swept.items()]
        sweep_rows.append(_sweep_row(main_label, config.budget, comp, prompt.passkey, bytes_full, full_tokens))
        sweep_rows.sort(key=lambda r: r["tokens_kept"])
        sweep_rows.append(_sweep_row("full", None, full, prompt.passkey, bytes_full, full_tokens))
        keys = [prompt.passkey] + [p.passkey for p in extra]

        def right(first, others):
            return sum(passkey_score(r["answer"], k)["exact"] for r, k in zip([first] + others, keys))

        accuracy = [{"label": row["label"], "budget": row["budget"],
                     "right": right(*((full, extra_full) if row["label"] == "full" else
                                      (comp, extra_comp[None]) if row["label"] == main_label else
                                      (swept[row["budget"]], extra_comp[row["budget"]]))),
                     "of": len(keys), "percent_tokens": row["percent_tokens"]} for row in sweep_rows]
        timings.update(full_prefill_s=full["prefill_s"], full_total_s=full["total_s"],
                       compressed_prefill_incl_compile_s=comp["prefill_s"],
                       compressed_total_s=comp["total_s"])
        result = DemoResult(
            model=model_name, config=dataclasses.asdict(config), inner=inner,
            prompt_tokens=len(prompt.ids), passkey=prompt.passkey, depth=round(prompt.depth, 3),
            full=full, compressed=comp, kept=comp["cache"]["kept"], bytes_full=bytes_full,
            bytes_compressed=bytes_comp,
            percent_of_full=round(100.0 * bytes_comp / bytes_full, 2) if bytes_full else float("nan"),
            rewrite=rewrite, needle=needle, sweep=sweep_rows, sweep_graphs=sweep_graphs, accuracy=accuracy,
            timings={k: round(v, 2) for k, v in timings.items() if v is not None})

        steps.set_postfix_str("writing PNG + JSON")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.png = str(out / PNG_NAME)
        result.json = str(out / JSON_NAME)
        plot_allocation(result.kept, result.png, title=_plot_title(result))
        with open(result.json, "w") as f:
            json.dump(result.as_dict(), f, indent=1)
            f.write("\n")
        steps.update(1)
    finally:
        steps.close()
    return result


def _plot_title(r: DemoResult) -> str:
    c = r.config
    what = f"budget {c['budget']}" if c["budget"] is not None else f"ratio {c['compression_ratio']}"
    return (f"Ada-KV tokens kept per KV head — {r.model}, {r.prompt_tokens}-token prompt, {what}, "
            f"window {c['window']}, {c['allocation']}/{c['layer_schedule']}")


def plot_allocation(kept: list[list[int]], path: str | Path, title: str = "") -> None:
    """Heat map (layers x KV heads, colour = tokens kept) written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.asarray(kept, dtype=float)
    layers, heads = data.shape
    fig_h = min(2.0 + 0.28 * layers, 14.0)
    fig_w = min(3.5 + 0.9 * heads, 12.0)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.tick_params(labelsize=7)
    if layers * heads <= 400:
        hi = data.max() if data.size else 0
        for i in range(layers):
            for j in range(heads):
                v = data[i, j]
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=6,
                        color="black" if hi and v > 0.6 * hi else "white")
    fig.colorbar(im, ax=ax, label="tokens kept")
    if title:
        ax.set_title(title, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": '{"device": "%s"}' % _device_name()})
    plt.close(fig)


# --------------------------------------------------------------------------------------------- text
def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def kept_table(kept: list[list[int]]) -> str:
    """Tokens kept per layer (rows) and KV head (columns), with totals."""
    heads = len(kept[0]) if kept else 0
    head = f"{'layer':>5} | " + " ".join(f"{'h' + str(h):>6}" for h in range(heads)) + f" | {'total':>7}"
    rows = [f"{i:>5} | " + " ".join(f"{v:>6}" for v in row) + f" | {sum(row):>7}" for i, row in enumerate(kept)]
    return "\n".join([head, "-" * len(head), *rows])


def _needle_lines(r: DemoResult) -> list[str]:
    nd = r.needle
    if not nd.get("key_positions") or "mean_fraction_of_key_tokens_kept" not in nd:
        return []
    return [
        f"pass-key tokens ({len(nd['key_positions'])} prompt positions, both mentions) in the compressed cache: "
        f"{nd['mean_fraction_of_key_tokens_kept']:.0%} kept on average per (layer, KV head); "
        f"{nd['heads_keeping_all_key_tokens']} of {nd['heads']} heads keep all of them, "
        f"{nd['heads_keeping_none']} keep none",
        "  heads keeping each key token: " + ", ".join(f"pos {p}: {c}" for p, c in
                                                       nd["heads_keeping_each_key_token"].items()),
        "",
    ]


def _short(text: str, width: int = 34) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def _sweep_lines(r: DemoResult) -> list[str]:
    if len(r.sweep) <= 2:  # the main run and the full cache only: nothing swept
        return []
    g = r.sweep_graphs
    lines = [f"budget sweep, same prompt, same compiled graphs (backend.reconfigure): "
             f"{g.get('before_sweep')} graphs compiled before the sweep, {g.get('after_sweep')} after",
             f"  {'budget':>8} | {'KV memory':>9} | {'tokens':>7} | answer",
             "  " + "-" * 72]
    for row in r.sweep:
        s = row["score"]
        verdict = "right" if s["exact"] else f"wrong (partial {s['partial']:.2f})"
        lines.append(f"  {row['label']:>8} | {row['percent_of_full']:>8.1f}% | {row['percent_tokens']:>6.1f}% | "
                     f"{_short(row['answer'])}  {verdict}")
    lines.append("  (KV memory: bytes held after the prefill, store header and decode reserve included; "
                 "tokens: prompt tokens kept over all layers and KV heads)")
    return lines + [""]


def _accuracy_lines(r: DemoResult) -> list[str]:
    if not r.accuracy or r.accuracy[0]["of"] < 2:
        return []
    full = next(a for a in r.accuracy if a["label"] == "full")
    lines = [f"pass-key accuracy over {full['of']} prompts (seeds from the first), same compiled graphs:",
             f"  {'budget':>8} | {'tokens':>7} | right | full cache"]
    for a in r.accuracy:
        if a["label"] != "full":
            lines.append(f"  {a['label']:>8} | {a['percent_tokens']:>6.1f}% | {a['right']:>2d}/{a['of']:<2d} | "
                         f"{full['right']}/{full['of']}")
    return lines + [""]


def format_summary(r: DemoResult) -> str:
    def verdict(run):
        s = run["score"]
        return "correct" if s["exact"] else f"wrong (partial credit {s['partial']:.2f})"

    n_heads = sum(len(row) for row in r.kept)
    kept_total = sum(sum(row) for row in r.kept)
    lines = [
        f"model: {r.model}   prompt: {r.prompt_tokens} tokens   pass key: {r.passkey} "
        f"(at {r.depth:.0%} of the haystack)",
        f"config: budget={r.config['budget']} compression_ratio={r.config['compression_ratio']} "
        f"window={r.config['window']} allocation={r.config['allocation']} "
        f"layer_schedule={r.config['layer_schedule']} alpha={r.config['alpha']} inner={r.inner}",
        "",
        f"full cache answer:       {r.full['answer']!r}  -> {verdict(r.full)}",
        f"compressed cache answer: {r.compressed['answer']!r}  -> {verdict(r.compressed)}",
        "",
        "KV memory after the prefill (keys + values, all layers):",
        f"  full:       {r.bytes_full:>12,d} bytes ({_fmt_bytes(r.bytes_full)})",
        f"  compressed: {r.bytes_compressed:>12,d} bytes ({_fmt_bytes(r.bytes_compressed)})"
        f" = {r.percent_of_full:.1f}% of full",
        f"  tokens kept: {kept_total:,d} of {r.prompt_tokens * n_heads:,d} "
        f"({100.0 * kept_total / max(r.prompt_tokens * n_heads, 1):.1f}%) over {len(r.kept)} layers x "
        f"{len(r.kept[0]) if r.kept else 0} KV heads; the rest of the bytes is decode reserve + store header",
        "",
        *_needle_lines(r),
        *_sweep_lines(r),
        *_accuracy_lines(r),
        "tokens kept per layer / KV head:",
        kept_table(r.kept),
        "",
        f"rewrite: {r.rewrite['rewritten']} attention sites rewritten in {r.rewrite['graphs']} graphs, "
        f"{r.rewrite['skipped']} skipped" + (f" ({'; '.join(r.rewrite['skipped_reasons'])})"
                                             if r.rewrite['skipped'] else ""),
        "timings (s): " + ", ".join(f"{k}={v}" for k, v in r.timings.items()),
    ]
    if r.png:
        lines.append(f"wrote {r.png} and {r.json}")
    return "\n".join(lines)
