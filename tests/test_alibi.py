"""ALiBi (bloom, mpt, falcon with alibi) and value-neutral clamps (xglm's ``max(scores, finfo.min)``).

ALiBi's per-head bias is recognised (``+bias`` patterns) and the attention rewritten exactly (bias + mask
as one additive mask); under a compressing config its layers are compressed (the bias gathered at the kept
positions: tests/test_alibi_compress.py compares them with the oracle). xglm's clamp does not stop
detection: its layers are compressed. Tiny random models, inner="eager"; compared with the uncompiled model.
"""
import pytest
import torch
import transformers as T

from adakv_compile import AdaKVConfig, adakv_backend, compile_model
from tests.prompts import left_padded


def build(family):
    torch.manual_seed(0)
    if family == "bloom":
        m = T.BloomForCausalLM(T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4))
    elif family == "mpt":
        m = T.MptForCausalLM(T.MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=128))
    elif family == "falcon":
        m = T.FalconForCausalLM(T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, alibi=True, new_decoder_architecture=False,
                                               multi_query=False))
    else:
        m = T.XGLMForCausalLM(T.XGLMConfig(vocab_size=128, d_model=64, num_layers=2, attention_heads=4,
                                           ffn_dim=128, max_position_embeddings=128))
    m = m.eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon", "xglm"])
def test_exact_and_under_compression(family):
    torch._dynamo.reset()
    model, plain = build(family), build(family)
    ids, am = left_padded([20, 14], seed=1)
    backend = adakv_backend(inner="eager")
    with torch.no_grad():
        got = torch.compile(model.forward, backend=backend)(input_ids=ids, attention_mask=am).logits
        want = plain(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(got[am.bool()], want[am.bool()], rtol=1e-5, atol=1e-5)
    assert backend.report and all(r.action == "rewritten" for r in backend.report), backend.report.table()
    alibi = family != "xglm"
    assert all(("+bias" in r.pattern) == alibi for r in backend.report), backend.report.table()
    if family == "mpt":  # its graphs return no cache: nothing more to check under compression
        return
    # a compressing config: ALiBi layers and xglm's are compressed
    torch._dynamo.reset()
    backend = compile_model(model, AdaKVConfig(budget=8, window=2), inner="eager")
    model.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False)
    prefill = [r for r in backend.report if r.phase == "prefill"]
    assert prefill and all(r.mode == "compress" for r in prefill), backend.report.table()
