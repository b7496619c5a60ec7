"""lm-evaluation-harness RULER on an adakv-compressed model (issue 19): a standard harness beside bench/quality.py.

    pip install lm-eval==0.4.13 wonderwords          # not needed by the package or its tests
    python -m bench.ruler                             # niah_single_1, 2k, 20 samples, budgets 128/256/1024
    python -m bench.ruler --tasks niah_single_1 niah_multikey_2 --length 2048 --limit 20 --budgets 128 256 1024
    python -m bench.ruler --small                     # smoke: 2 samples, 1k tokens, budget 128, two methods

Any lm-eval task on a compressed model (Python API; lm-eval's CLI cannot import a model class of ours):

    import bench.ruler                                # registers the "adakv" model with lm-eval
    from lm_eval import simple_evaluate
    lm = bench.ruler.AdaKVLM(pretrained=model, tokenizer=tok, adakv=AdaKVConfig(budget=256))
    simple_evaluate(model=lm, tasks=["niah_single_1"], limit=20,
                    metadata={"tokenizer": TOKENIZER_DIR, "max_seq_lengths": [2048]})

``AdaKVLM`` is lm-eval's ``HFLM`` whose model forward is compiled with the adakv backend (general path:
``generate`` with a DynamicCache holding the compacted store); ``lm_eval --model adakv --model_args
pretrained=<hf dir>,budget=256`` works from any script that imports this module first.

What RULER needs offline: only the tasks whose haystack is generated (niah_single_1: "repeat" noise;
niah_multikey_2/3: "needle" haystack) build without a download — the essay tasks fetch Paul Graham's essays;
its import calls ``nltk.download("punkt_tab")`` (stubbed here: the generated haystacks never split
sentences); it sizes prompts with a tokenizer loaded by name, so a GGUF model's tokenizer is saved to a
folder first and passed as ``metadata={"tokenizer": dir}``. RULER's metric keys are its default lengths
(4096...), so the score of another length is read from the logged samples (``string_match_all``, the
task's own metric). Generation: greedy, ``max_gen_toks`` lowered from 128 to ``--max-gen-toks`` (32: a
7-digit answer after RULER's answer prefix) to fit a CPU.

Methods (each budget): snapkv (uniform), ada-official (``AdaKVConfig.official()``: paper semantics),
ada (the package default: head floor 192), critical (the default allocation with the value-aware scorer);
plus ``full`` (the uncompiled model, full cache). One compile; budgets/methods switch with
``backend.reconfigure`` (no recompilation).
Outputs: ``bench/results/ruler-<name>.json`` / ``.md`` (device-stamped).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from adakv_compile import AdaKVConfig
from adakv_compile.backend import adakv_backend

METHODS = {
    "snapkv": dict(allocation="uniform"),
    "ada-official": dict(head_floor=0),
    "ada": dict(),
    "critical": dict(scorer="critical"),
}
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")
log = logging.getLogger("bench.ruler")


def _stub_nltk_download() -> None:
    """RULER's import calls ``nltk.download("punkt_tab")`` when punkt_tab is absent: no network here, and
    the generated (non-essay) haystacks never use the sentence splitter."""
    try:
        import nltk
    except ImportError:
        return
    nltk.download = lambda *a, **k: False


def _lm_eval():
    try:
        _stub_nltk_download()
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        import wonderwords  # noqa: F401  (RULER's word lists)
    except ImportError as e:
        raise SystemExit(f"bench.ruler needs lm-eval and wonderwords: pip install lm-eval==0.4.13 wonderwords ({e})")
    return lm_eval, HFLM


def make_adakv_lm():
    """The ``AdaKVLM`` class (an ``HFLM`` subclass), registered with lm-eval as "adakv"."""
    lm_eval, HFLM = _lm_eval()
    from lm_eval.api.registry import register_model

    class AdaKVLM(HFLM):
        """HFLM whose model forward is compiled by the adakv backend. ``adakv``: an AdaKVConfig, or the
        config's fields as model args (``budget=256,allocation=uniform``); ``set_config`` switches it
        (``backend.reconfigure``, no recompilation; ``None`` runs the uncompiled forward: the full cache)."""

        def __init__(self, pretrained=None, adakv: AdaKVConfig | None = None, **kwargs):
            fields = set(AdaKVConfig.__dataclass_fields__)
            conf = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
            super().__init__(pretrained=pretrained, **kwargs)
            if adakv is None:
                conf = {k: (int(v) if isinstance(v, str) and v.isdigit() else v) for k, v in conf.items()}
                adakv = AdaKVConfig(**conf) if conf else None
            model = self.model
            self._plain_forward = model.forward
            self._backend = None
            self._compiled = None
            self.set_config(adakv)

        def set_config(self, config: AdaKVConfig | None) -> None:
            model = self.model
            if config is None or not config.compresses:
                model.forward = self._plain_forward
                return
            if self._backend is None:
                self._backend = adakv_backend(config)
                self._compiled = torch.compile(self._plain_forward, backend=self._backend, dynamic=True)
            else:
                self._backend.reconfigure(config)
            model.forward = self._compiled

    register_model("adakv")(AdaKVLM)
    return AdaKVLM


_CLASS = None


def __getattr__(name):  # bench.ruler.AdaKVLM: built (and registered) on first use, lm-eval imported lazily
    global _CLASS
    if name == "AdaKVLM":
        if _CLASS is None:
            _CLASS = make_adakv_lm()
        return _CLASS
    raise AttributeError(name)


def make_sweep_lm():
    """``SweepLM``: an lm-eval ``LM`` for generate_until tasks that prefills each prompt ONCE and answers it
    for every config of the sweep (the product's ``adakv::compress`` op run on the captured prefill inputs,
    as bench/quality.py does; greedy decode through the compiled forward). ``simple_evaluate`` is then
    called once per config (``lm.current = name``): lm-eval builds the prompts and scores the answers; only
    the model calls are shared. ~10x cheaper than a full prefill per config on a CPU."""
    lm_eval, _ = _lm_eval()
    from lm_eval.api.model import LM

    from bench.quality import Engine
    from adakv_compile.kernels.ops import register_config

    class SweepLM(LM):
        def __init__(self, model, tokenizer, configs: dict, max_new: int, window: int = 32, journal=None):
            super().__init__()
            self.journal = journal      # JSONL: every prompt's answers as soon as they exist (partial runs)
            self.engine = Engine(model, tokenizer, window=window)
            self.tok, self.configs, self.max_new = tokenizer, configs, max_new
            self.answers: dict = {name: {} for name in configs}
            self.current = next(iter(configs))
            self.seconds = {"prefill": 0.0, "decode": 0.0}

        def _answer_all(self, context: str) -> None:
            e = self.engine
            ids = self.tok(context, add_special_tokens=False).input_ids
            t0 = time.time()
            caps, logits = e.capture_prefill(ids)
            self.seconds["prefill"] += time.time() - t0
            t0 = time.time()
            for name, cfg in self.configs.items():
                if cfg is None or not cfg.compresses or cfg.budget >= len(ids):
                    cache, fwd = e.full_cache(caps), e.full_forward
                else:
                    cache, fwd = e.compressed_cache(caps, register_config(cfg, "bench-ruler")), e.compiled
                self.answers[name][context] = e.greedy(fwd, cache, logits, self.max_new)
            self.seconds["decode"] += time.time() - t0
            if self.journal:
                with open(self.journal, "a") as f:
                    f.write(json.dumps(dict(context=context, n=len(ids),
                                            answers={k: v[context] for k, v in self.answers.items()})) + "\n")

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for i, req in enumerate(requests):
                context = req.args[0]
                if context not in self.answers[self.current]:
                    self._answer_all(context)
                    log.info("prompt %d/%d done", i + 1, len(requests))
                out.append(self.answers[self.current][context])
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("SweepLM answers generate_until tasks; use AdaKVLM for log-likelihoods")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("SweepLM answers generate_until tasks; use AdaKVLM for log-likelihoods")

    return SweepLM


def tokenizer_dir(tokenizer, name: str) -> str:
    """A folder holding ``tokenizer``'s files (RULER loads its tokenizer by name; a GGUF has none)."""
    d = Path(os.environ.get("ADAKV_CACHE", Path.home() / ".cache" / "adakv")) / f"tokenizer-{name}"
    if not (d / "tokenizer_config.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(d))
    return str(d)


def load_model(name: str):
    if name == "smollm2":
        from adakv_compile.models import load_smollm2
        return load_smollm2()
    if name == "tiny":      # smoke only: a random 2-layer Llama with SmolLM2's tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM
        from adakv_compile.models import load_smollm2
        _, tok = load_smollm2()
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
        return LlamaForCausalLM(cfg).eval(), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer   # a local HF folder
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval(), tok


def _score(samples: list) -> tuple[int, int, list]:
    """(right, total, per-sample records) from lm-eval's logged samples: RULER's string_match_all."""
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all
    recs, right = [], 0
    for s in samples:
        pred = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        pred = pred[0] if isinstance(pred, list) else pred
        gold = s["doc"]["outputs"]
        score = string_match_all(postprocess_pred([pred]), [gold])
        right += int(score == 1.0)
        recs.append(dict(doc_id=s["doc_id"], gold=gold, pred=pred[:80], score=score))
    return right, len(samples), recs


def run(args) -> dict:
    lm_eval, _ = _lm_eval()
    model, tok = load_model(args.model)
    tdir = tokenizer_dir(tok, args.model if args.model in ("smollm2", "tiny") else Path(args.model).name)
    configs = {"full": None} if "full" in args.methods else {}
    for b in args.budgets:
        for m in args.methods:
            if m != "full":
                configs[f"{m}@{b}"] = AdaKVConfig(budget=b, **METHODS[m])
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
              f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
              f"{torch.get_num_threads()}")
    results = dict(command="python -m bench.ruler " + " ".join(sys.argv[1:]), model=args.model,
                   date=_dt.datetime.now().isoformat(timespec="seconds"), device=device,
                   torch=torch.__version__, lm_eval=getattr(lm_eval, "__version__", ""),
                   length=args.length, limit=args.limit, offset=args.offset, max_gen_toks=args.max_gen_toks,
                   chat=args.chat, harness="sweep" if not args.per_config else "hflm", cells=[])
    if args.per_config:       # lm-eval's own HFLM generate per config (a full prefill each: slow on a CPU)
        lm = make_adakv_lm()(pretrained=model, tokenizer=tok, batch_size=1,
                              max_length=args.length + args.max_gen_toks + 64, adakv=None)
    else:
        journal = Path(args.out) / f"ruler-{args.name}.jsonl" if args.out else None
        if journal is not None:
            journal.parent.mkdir(parents=True, exist_ok=True)
            journal.write_text(json.dumps({"device": device}) + "\n")  # first line: where it ran
        lm = make_sweep_lm()(model, tok, configs, args.max_gen_toks, journal=journal)
    for task in args.tasks:
        for name, cfg in configs.items():
            method, _, budget = name.partition("@")
            if args.per_config:
                lm.set_config(cfg)
            else:
                lm.current = name
            t0 = time.time()
            kw = dict(limit=args.limit) if args.offset == 0 else \
                dict(samples={task: list(range(args.offset, args.offset + args.limit))})
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[task], log_samples=True, apply_chat_template=args.chat,
                gen_kwargs=f"max_gen_toks={args.max_gen_toks}", random_seed=0, numpy_random_seed=0,
                torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0,
                metadata={"tokenizer": tdir, "max_seq_lengths": [args.length]}, **kw)
            right, total, recs = _score(out["samples"][task])
            cell = dict(task=task, method=method, budget=int(budget) if budget else None, right=right, n=total,
                        seconds=round(time.time() - t0, 1), config=cfg.key() if cfg else "full", samples=recs)
            results["cells"].append(cell)
            log.warning("%s %s: %d/%d (%.0f s)", task, name, right, total, cell["seconds"])
            if args.out:
                write(results, args.out, args.name)
    if not args.per_config:
        results["seconds"] = {k: round(v, 1) for k, v in lm.seconds.items()}
    return results


def prompts(task: str, tdir: str, length: int, limit: int, offset: int = 0, chat: bool = False) -> list:
    """``[(context, gold answers)]``: the prompts lm-eval builds for ``task`` (a recording LM answers "")."""
    lm_eval, _ = _lm_eval()
    from lm_eval.api.model import LM

    seen = []

    class Recorder(LM):
        def generate_until(self, requests, disable_tqdm=False):
            seen.extend(r.args[0] for r in requests)
            return [""] * len(requests)

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    kw = dict(limit=limit) if offset == 0 else dict(samples={task: list(range(offset, offset + limit))})
    out = lm_eval.simple_evaluate(model=Recorder(), tasks=[task], log_samples=True, apply_chat_template=chat,
                                  bootstrap_iters=0, metadata={"tokenizer": tdir, "max_seq_lengths": [length]}, **kw)
    docs = [s["doc"] for s in out["samples"][task]]
    return [(c, next(d["outputs"] for d in docs if d["input"] in c)) for c in seen]


def analyse(args) -> dict:
    """Why Ada loses at tight budgets (docs/algorithm.md, "RULER analysis"): on ``--analyse N`` prompts, per
    layer and KV head, how many of the needle value's tokens each method keeps, and Ada's head budgets."""
    from adakv_compile.kernels import store
    from adakv_compile.kernels.ops import register_config
    from bench.quality import Engine

    model, tok = load_model(args.model)
    tdir = tokenizer_dir(tok, args.model)
    budget = args.budgets[0]
    methods = {m: AdaKVConfig(budget=budget, **METHODS[m]) for m in ("snapkv", "ada-official", "ada", "critical")}
    e = Engine(model, tok, window=32)
    L = model.config.num_hidden_layers
    H = model.config.num_key_value_heads
    acc = {m: torch.zeros(L, H) for m in methods}
    alloc = {m: torch.zeros(L, H) for m in methods}
    per_prompt = []
    items = prompts(args.tasks[0], tdir, args.length, args.analyse, args.offset, args.chat)
    for context, gold in items:
        gold = gold[0]
        enc = tok(context, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc.input_ids, enc.offset_mapping
        start = context.index(gold)                                       # the needle's value in the haystack
        needle = [i for i, (a, b) in enumerate(offs) if a < start + len(gold) and b > start]
        caps, logits = e.capture_prefill(ids)
        rec = dict(gold=gold, n=len(ids), needle_tokens=len(needle), answers={})
        for m, cfg in methods.items():
            cache = e.compressed_cache(caps, register_config(cfg, "bench-ruler"))
            for layer in range(L):
                _, _, pos = store.unpack(cache.layers[layer].keys, cache.layers[layer].values, positions=True)
                for h in range(H):
                    p = set(pos[0][h].tolist())
                    acc[m][layer, h] += sum(i in p for i in needle) / len(needle)
                    alloc[m][layer, h] += len(p) - 32
            rec["answers"][m] = e.greedy(e.compiled, cache, logits, args.max_gen_toks)
        per_prompt.append(rec)
        log.warning("analysis: gold %s, answers %s", gold, rec["answers"])
    k = len(items)
    res = dict(command="python -m bench.ruler " + " ".join(sys.argv[1:]), task=args.tasks[0], length=args.length,
               budget=budget, prompts=per_prompt,
               device=f"cpu: {platform.machine()}" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
               needle_kept={m: (acc[m] / k).tolist() for m in methods},
               head_budget={m: (alloc[m] / k).tolist() for m in methods})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / f"ruler-analysis-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    plot_analysis(res, stem.with_suffix(".png"))
    return res


def journal_cells(path: str) -> dict:
    """``{config name: (right, n)}`` from a (possibly partial) SweepLM journal of a niah task: the gold is
    the value of the needle whose key the question names; scored with RULER's string_match_all."""
    import re
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all
    cells: dict = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if "context" not in r:  # the header line ({"device": ...})
            continue
        ctx = r["context"]
        key = re.findall(r"special magic \w+ for (\S+) mentioned", ctx)[-1]
        gold = re.findall(r"special magic \w+ for " + re.escape(key) + r" is: (\S+?)\.", ctx)
        for name, ans in r["answers"].items():
            ok = string_match_all(postprocess_pred([ans]), [gold]) == 1.0
            right, n = cells.get(name, (0, 0))
            cells[name] = (right + ok, n + 1)
    return cells


def plot_analysis(res: dict, path) -> None:
    """Needle tokens kept (top row) and chosen tokens (bottom row) per layer x KV head, one column per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from bench.stamp import png_metadata
    names = list(res["needle_kept"])
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names) + 1, 9), sharey=True)
    for j, m in enumerate(names):
        im = axes[0, j].imshow(res["needle_kept"][m], aspect="auto", vmin=0, vmax=1, cmap="viridis")
        axes[0, j].set_title(f"{m}\nneedle tokens kept", fontsize=9)
        im2 = axes[1, j].imshow(res["head_budget"][m], aspect="auto", vmin=0, vmax=2 * (res["budget"] - 32),
                                cmap="magma")
        axes[1, j].set_title(f"{m}\nchosen tokens per head", fontsize=9)
        for a in axes[:, j]:
            a.set_xlabel("KV head")
    axes[0, 0].set_ylabel("layer")
    axes[1, 0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8)
    fig.colorbar(im2, ax=axes[1, :].tolist(), shrink=0.8)
    fig.suptitle(f"{res['task']}, {res['length']} tokens, budget {res['budget']}, mean over "
                 f"{len(res['prompts'])} prompts")
    fig.savefig(path, dpi=80, metadata=png_metadata(res["device"]))


def table(results: dict) -> str:
    from bench.stamp import md_header
    lines = [md_header(results["device"], command=results["command"]),
             f"# RULER (lm-eval) — {results['model']}, {results['length']} tokens",
             "", f"- command: `{results['command']}`", f"- date: {results['date']}; device: {results['device']}",
             f"- samples {results['offset']}..{results['offset'] + results['limit'] - 1} of each task; exact match "
             f"(RULER string_match_all); greedy, max_gen_toks {results['max_gen_toks']}; chat template: {results['chat']}",
             ""]
    cells = results["cells"]
    for task in dict.fromkeys(c["task"] for c in cells):
        tc = [c for c in cells if c["task"] == task]
        budgets = sorted({c["budget"] for c in tc if c["budget"] is not None})
        full = [c for c in tc if c["method"] == "full"]
        lines += [f"## {task}" + (f" (full cache: {full[0]['right']}/{full[0]['n']})" if full else ""), "",
                  "| method | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for m in dict.fromkeys(c["method"] for c in tc if c["method"] != "full"):
            row = []
            for b in budgets:
                c = [x for x in tc if x["method"] == m and x["budget"] == b]
                row.append(f"{c[0]['right']}/{c[0]['n']}" if c else "")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def write(results: dict, out: str, name: str) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"ruler-{name}.json").write_text(json.dumps(results, indent=1))
    (Path(out) / f"ruler-{name}.md").write_text(table(results))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (GGUF wheel), tiny (smoke) or a local HF folder")
    ap.add_argument("--tasks", nargs="+", default=["niah_single_1"], help=f"offline: {OFFLINE_TASKS}")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0, help="first sample (held-out prompts: e.g. 20)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 1024])
    ap.add_argument("--methods", nargs="+", default=["full", *METHODS], choices=["full", *METHODS])
    ap.add_argument("--max-gen-toks", type=int, default=16)
    ap.add_argument("--chat", action="store_true", help="apply the chat template")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--small", action="store_true", help="smoke run: tiny model, 2 samples, 1k tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--analyse", type=int, default=0, metavar="N",
                    help="needle tokens kept per layer/head on N prompts at the first budget (+ figure)")
    ap.add_argument("--journal", default=None, help="print the table of a (partial) SweepLM journal and exit")
    ap.add_argument("--per-config", action="store_true",
                    help="lm-eval's HFLM generate per config (AdaKVLM) instead of one prefill per prompt")
    args = ap.parse_args(argv)
    if args.small:
        args.model, args.limit, args.length, args.budgets = "tiny", 2, 1024, [128]
        args.methods, args.max_gen_toks = ["full", "snapkv", "ada", "critical"], 4
        args.name = args.name or "small"
    args.name = args.name or f"{args.model}-{args.length}"
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.analyse:
        analyse(args)
        return
    if args.journal:
        _lm_eval()
        for name, (right, n) in journal_cells(args.journal).items():
            print(f"{name}: {right}/{n}")
        return
    res = run(args)
    print(table(res))


if __name__ == "__main__":
    main()
