"""The ``adakv`` command line and the demo logic (tiny random models only; no SmolLM2 here)."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adakv_compile import AdaKVConfig, Report
from adakv_compile import cli
from adakv_compile.demo import format_summary, passkey_prompt, passkey_score, run_demo


# ------------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["explain", "--help"], ["bench", "--help"]])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: adakv")
    if argv[0] == "demo":
        assert "--context-tokens" in out and "--budget" in out and "--layer-schedule" in out
    if argv[0] == "explain":
        assert "--model" in out and "--compression-ratio" in out


def test_eval_help_forwards_or_explains(capfd):
    # with bench/quality.py present this is the benchmark's own --help (a subprocess), without it our note
    rc = cli.main(["eval", "--help"])
    out = capfd.readouterr().out
    assert rc == 0
    assert "usage" in out.lower()


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "adakv_compile", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("demo", "explain", "bench", "eval"):
        assert cmd in r.stdout


def test_bench_without_checkout_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_checkout_roots", lambda: [tmp_path])
    assert cli.main(["bench", "quality", "--budgets", "64"]) == 2
    err = capsys.readouterr().err
    assert "bench/quality.py not found" in err and "source checkout" in err
    assert cli.main(["bench"]) == 2  # no target: usage error


# ------------------------------------------------------------------------------------------ explain
def test_explain_tiny_model_rewrites_every_attention(capsys):
    assert cli.main(["explain", "--budget", "48", "--window", "8"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["graph", "layer"])
    rows = [line.split() for line in lines[head + 1:] if line.strip() and line.split()[0].isdigit()]
    assert len(rows) >= 4  # 2 layers x (prefill + decode)
    assert all(r[4] == "rewritten" for r in rows), out
    assert any(r[5] == "compress" for r in rows), out
    assert "verdict: OK" in out


def test_explain_verdict_when_no_attention():
    status, msg = cli.explain_verdict(Report(), graphs_compiled=2, model_name="m")
    assert status == 1 and "no attention found" in msg and "attn_implementation" in msg
    status, msg = cli.explain_verdict(Report(), graphs_compiled=0)
    assert status == 1 and "never called" in msg


@pytest.mark.parametrize("argv,field", [
    (["explain", "--budget", "8"], "AdaKVConfig.budget"),
    (["explain", "--kernel-size", "4"], "AdaKVConfig.kernel_size"),
    (["explain", "--compression-ratio", "abc"], "AdaKVConfig.compression_ratio"),
    (["demo", "--pooling", "median"], "AdaKVConfig.pooling"),
    (["demo", "--allocation", "greedy"], "AdaKVConfig.allocation"),
    (["demo", "--budget", "64", "--compression-ratio", "0.5"], "AdaKVConfig.budget"),
])
def test_bad_config_flag_exits_2_naming_the_field(argv, field, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert field in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------- demo
class CharTokenizer:
    """Stand-in tokenizer: one token per ASCII character (ids 32..126), with a chat template."""
    chat_template = "user: {content}\nassistant:"
    eos_token_id = 2
    pad_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        assert not tokenize
        return self.chat_template.format(content=messages[-1]["content"])

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [min(max(ord(c), 32), 126) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if 32 <= i <= 126)


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_passkey_prompt_and_score():
    tok = CharTokenizer()
    p = passkey_prompt(tok, context_tokens=400, seed=3)
    assert 300 <= len(p.ids) <= 400
    assert p.passkey in p.text and len(p.passkey) == 5
    assert passkey_prompt(tok, 400, seed=3).ids == p.ids  # seeded
    assert passkey_score(f"The pass key is {p.passkey}.", p.passkey) == {"exact": True, "partial": 1.0}
    s = passkey_score("The pass key is 6159.", "61591")
    assert not s["exact"] and 0.5 < s["partial"] < 1


def test_demo_on_tiny_model_writes_png_and_json(tmp_path):
    model = tiny_llama()
    forward_before = model.forward
    r = run_demo(AdaKVConfig(budget=40, window=8, decode_reserve=8), context_tokens=240, out_dir=tmp_path,
                 max_new_tokens=3, model=model, tokenizer=CharTokenizer(), model_name="tiny", progress=False,
                 sweep=(8, 24, 64), prompts=2)
    png, js = tmp_path / "allocation.png", tmp_path / "demo.json"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["model"] == "tiny" and data["prompt_tokens"] == r.prompt_tokens > 40
    kept = data["kept"]
    assert len(kept) == 2 and all(len(row) == 2 for row in kept)
    # official Ada-KV rounding: per layer within (H*budget - 1.5H, H*budget + 0.5H]
    assert all(2 * 40 - 3 < sum(row) <= 2 * 40 + 1 for row in kept)
    assert data["bytes_compressed"] < data["bytes_full"]
    assert 0 < data["percent_of_full"] < 100
    assert data["rewrite"]["skipped"] == 0 and data["rewrite"]["compressed_layers"] == [0, 1]
    for run in ("full", "compressed"):
        assert isinstance(data[run]["answer"], str) and "exact" in data[run]["score"]
    nd = data["needle"]
    assert len(nd["key_positions"]) == 10  # 5 digits, mentioned twice, one token per character
    assert nd["window_kept_by_all_heads"]  # the kept positions were recovered consistently
    assert 0 <= nd["mean_fraction_of_key_tokens_kept"] <= 1
    assert model.forward == forward_before  # the compiled forward is undone
    # the budget sweep: 24, 40 (the main run), 64, then the full cache; window 8 excludes budget 8
    assert [row["label"] for row in data["sweep"]] == ["24", "40", "64", "full"]
    assert data["sweep_graphs"]["before_sweep"] == data["sweep_graphs"]["after_sweep"] > 0  # no recompile
    pct = [row["percent_tokens"] for row in data["sweep"]]
    assert pct == sorted(pct) and pct[-1] == 100.0
    assert data["sweep"][1]["answer"] == data["compressed"]["answer"]
    summary = format_summary(r)
    assert "budget sweep" in summary and "full" in summary
    # --prompts 2: right answers out of 2 per budget, beside the full cache's
    assert [a["label"] for a in data["accuracy"]] == ["24", "40", "64", "full"]
    assert all(a["of"] == 2 and 0 <= a["right"] <= 2 for a in data["accuracy"])
    assert "pass-key accuracy over 2 prompts" in summary
