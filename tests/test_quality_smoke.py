"""Smoke tests of the quality benchmark: task generators and ``python -m bench.quality --quick``.

No SmolLM2 here: a tiny random Llama and a byte-level tokenizer stand in (bench.quality.build_tiny).
"""
import json
import os
import re
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import quality as Q  # noqa: E402
from bench import tasks as T  # noqa: E402

TOK = Q.ByteTokenizer()


@pytest.mark.parametrize("task", T.TASKS)
def test_generators_deterministic_and_answer_in_context(task):
    a = T.generate(TOK, tasks=[task], lengths=[1024, 2048], n=2, seed=7, questions=2)
    b = T.generate(TOK, tasks=[task], lengths=[1024, 2048], n=2, seed=7, questions=2)
    assert a == b
    c = T.generate(TOK, tasks=[task], lengths=[1024], n=2, seed=8, questions=2)
    assert [x["context"] for x in c] != [x["context"] for x in a if x["length"] == 1024]
    for it in a:
        assert {"context", "question", "answer", "task", "length"} <= set(it)
        assert it["task"] == task
        assert re.search(rf"(?<!\d){it['answer']}(?!\d)", it["context"]), it["id"]
        p = T.build_prompt(TOK, it)
        assert len(p["ids"]) == it["tokens"] <= it["length"]
        assert it["tokens"] > 0.85 * it["length"], "the fit should use most of the target length"
        # the split: context part first, question part after it
        assert TOK.decode(p["ids"][:p["split"]]).endswith(it["context"])
        assert it["question"] in TOK.decode(p["ids"][p["split"]:])
    # items sharing a context share the same context part of the prompt
    by = {}
    for it in a:
        by.setdefault(it["context_id"], []).append(T.build_prompt(TOK, it))
    for ps in by.values():
        assert len({tuple(p["ids"][:p["split"]]) for p in ps}) == 1


def test_vartrack_chain_resolves_to_answer():
    for it in T.generate(TOK, tasks=["vartrack"], lengths=[1024], n=3, seed=1, questions=2):
        env = {}
        for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", it["context"]):
            env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
        assert env[it["key"]] == it["answer"]


def test_score_answer():
    assert Q.score_answer(" 61591.", "61591") == (True, 1.0)
    ex, part = Q.score_answer(" 6152", "61591")
    assert not ex and part == pytest.approx(2 * 3 / 9)
    assert Q.score_answer(" 615910", "61591")[0] is False
    assert Q.score_answer("no digits", "61591") == (False, 0.0)


def test_quick_end_to_end_on_tiny_model(tmp_path):
    t0 = time.time()
    res = Q.main(["--quick", "--model", "tiny", "--name", "smoke", "--out", str(tmp_path), "--no-progress"])
    assert time.time() - t0 < 60
    assert res["errors"] == [], res["errors"]
    assert res["attention_skipped"] == 0
    assert not res["truncated"]
    for ext in (".json", ".md", "-accuracy.png", "-kl.png"):
        assert (tmp_path / f"quality-smoke{ext}").stat().st_size > 0
    assert not (tmp_path / "quality-smoke.partial.json").exists()
    data = json.loads((tmp_path / "quality-smoke.json").read_text())
    recs = data["records"]
    methods = {r["method"] for r in recs}
    assert methods == set(Q.METHODS) | {"full"}
    for mode in Q.MODES:
        comp = [r for r in recs if r["mode"] == mode and r["compressed"]]
        assert comp
        for r in comp:
            assert r["kv_bytes"] < next(f["kv_bytes"] for f in recs
                                        if f["id"] == r["id"] and f["method"] == "full" and f["mode"] == mode)
            assert 0 < r["kept_frac"] < 0.5
            assert r["kl"] >= 0 and 0 <= r["top1"] <= 1
    md = (tmp_path / "quality-smoke.md").read_text()
    assert "python -m bench.quality --quick" in md and "Ada-SnapKV − SnapKV" in md
    # one compiled forward serves every method and budget: no recompile per setting
    assert res["graphs_compiled"] <= 10


def test_help_runs():
    with pytest.raises(SystemExit) as e:
        Q.parse_args(["--help"])
    assert e.value.code == 0


def _tiny_hybrid():
    """A tiny random Gemma 3 (layers 0-1 sliding window 64, layer 2 full attention, 1 KV head): the backend
    compresses layer 2 only and leaves the sliding windows to the model."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=64,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval(), Q.ByteTokenizer()


@pytest.mark.parametrize("arch", ["llama", "hybrid"])
def test_captured_prefill_builds_the_same_cache_as_a_compressed_prefill(arch):
    """bench.quality prefills once and builds each config's cache with adakv::compress from the captured
    inputs: same greedy answer and logits as a normal compressed prefill (aware: the whole prompt;
    agnostic: the captured prompt sliced at the split -- or, with layers left to the model such as sliding
    windows, a prefill of the context part (Engine.prefix) -- vs a prefill of the context part only)."""
    import copy

    import torch

    torch.manual_seed(0)
    model, tok = Q.build_tiny() if arch == "llama" else _tiny_hybrid()
    eng = Q.Engine(model, tok, window=32)
    it = T.generate(tok, tasks=["niah_multikey_noise"], lengths=[1024], n=1, seed=3)[0]
    p = T.build_prompt(tok, it)
    ids, split = p["ids"], p["split"]
    cont = T.encode(tok, " " + it["answer"] + ". " + Q.FIXED_SENTENCE)
    caps, first = eng.capture_prefill(ids)
    assert sorted(caps.inputs) == ([0, 1] if arch == "llama" else [2])
    ctx = eng.prefix(caps, ids, split)
    if arch == "hybrid":
        with pytest.raises(ValueError, match="upto"):
            eng.compressed_cache(caps, "unused", upto=split)
    # the plain cache of the captured K/V matches the model's own forward
    c_full = eng.new_cache()
    ref_first = eng.step(eng.full_forward, ids, c_full)
    torch.testing.assert_close(first, ref_first, rtol=1e-4, atol=1e-4)
    ref_c = eng.full_cache(caps)
    for a, b in zip(ref_c.layers, c_full.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
    for method, budget in (("snapkv", 128), ("ada-pyramidkv", 64)):
        eng.backend.reconfigure(eng.config(method, budget))
        key = eng.register(method, budget)
        # aware
        c1 = eng.new_cache()
        f1 = eng.step(eng.compiled, ids, c1)
        c2 = eng.compressed_cache(caps, key)
        torch.testing.assert_close(f1, first, rtol=0, atol=0)
        assert Q._kv_stats(c1) == Q._kv_stats(c2)
        p1, l1 = eng.answer_and_fidelity(eng.compiled, c1, f1, cont, 8)
        p2, l2 = eng.answer_and_fidelity(eng.compiled, c2, first, cont, 8)
        assert p1 == p2
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        # agnostic
        a1 = eng.new_cache()
        eng.step(eng.compiled, ids[:split], a1)
        a2 = eng.compressed_cache(ctx, key)
        assert Q._kv_stats(a1) == Q._kv_stats(a2)
        g1 = eng.step(eng.compiled, ids[split:], copy.deepcopy(a1))
        g2 = eng.step(eng.compiled, ids[split:], copy.deepcopy(a2))
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
        p1, l1 = eng.answer_and_fidelity(eng.compiled, a1, eng.step(eng.compiled, ids[split:], a1), cont, 8)
        p2, l2 = eng.answer_and_fidelity(eng.compiled, a2, eng.step(eng.compiled, ids[split:], a2), cont, 8)
        assert p1 == p2
        torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)


def test_merge_results_unites_runs_and_drops_duplicates(tmp_path):
    """--merge: runs of one sweep split over processes (e.g. by length) become one result; a question seen in
    two runs counts once; a killed run's .partial.json checkpoint adds its records and marks the result truncated."""
    import json as _json

    def rec(cid, length, method, budget, exact):
        return dict(id=cid, context_id=cid, task="passkey", length=length, tokens=length, split=length - 9,
                    mode="aware", method=method, budget=budget, answer="1", pred="1", exact=exact, partial=1.0,
                    kv_bytes=10, kept_frac=1.0, compressed=budget is not None, kl=0.0, top1=1.0, kl_answer=0.0,
                    top1_answer=1.0)

    def run(name, lengths, records):
        return dict(name=name, command=f"python -m bench.quality --name {name}", date="d", machine="m", device="cpu",
                    model="m", versions=dict(torch="t", transformers="t"), settings=dict(tasks=["passkey"], lengths=lengths, samples=1,
                                                          questions=1, methods={"snapkv": {}}, budgets=[64],
                                                          modes=["aware"], window=32),
                    wall_s=10.0, timings_s={"prefill_capture": 1.0}, graphs_compiled=3, attention_skipped=0,
                    truncated=False, groups_done=1, groups_total=2, errors=[], summary=[], records=records)

    a = run("a", [1024, 2048], [rec("p-1024-0", 1024, "full", None, True), rec("p-1024-0", 1024, "snapkv", 64, True)])
    b = run("b", [2048], [rec("p-2048-0", 2048, "full", None, True), rec("p-2048-0", 2048, "snapkv", 64, False),
                          rec("p-1024-0", 1024, "snapkv", 64, False)])  # a duplicate of a's record
    c = dict(partial=True, errors=[], records=[rec("p-4096-0", 4096, "snapkv", 64, False)])
    paths = []
    for name, d in (("a", a), ("b", b), ("c", c)):
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(_json.dumps(d))
    res = Q.main(["--merge", *paths, "--name", "merged", "--out", str(tmp_path), "--no-plots"])
    assert len(res["records"]) == 5 and res["groups_done"] == 3 and res["truncated"]
    assert res["settings"]["lengths"] == [1024, 2048, 4096] and res["wall_s"] == 20.0
    cell = next(d for d in res["summary"] if d["method"] == "snapkv")
    assert cell["n"] == 3 and cell["exact"] == pytest.approx(1 / 3)  # a's 1024 record kept, b's duplicate dropped
    assert (tmp_path / "quality-merged.md").read_text().startswith('<!-- {"device": "cpu"')
