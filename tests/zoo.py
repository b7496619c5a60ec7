"""Tiny random-weight models for tests (no downloads).

    from tests.zoo import build, FAMILIES, ATTN_IMPLS, TinyGPT, tinygpt_generate
    model = build("llama", attn="sdpa")             # eval(), float32, seeded
    model = build("mistral", sliding_window=8)      # any config field can be overridden
    model = TinyEagerGPT("bmm")                     # hand-written eager attention, see EAGER_STYLES

All HF families share: hidden 64, 2 layers, head_dim 16, max positions 512, vocab 256,
pad_token_id 0, bos 1, eos 2 (pass ``min_new_tokens`` / ``eos_token_id=None`` to ``generate`` if a
test needs an exact number of new tokens).

Families (see docs/graph-survey.md for the FX graphs they produce):
- llama       GQA 4 q / 2 kv heads
- mistral     GQA 4/2, sliding_window=64 (larger than test prompts: behaves like full attention)
- mistral_sw  same as mistral but sliding_window=8 (smaller than test prompts: windowed mask)
- qwen2       GQA 4/2, q/k/v projections with bias
- qwen3       GQA 4/2, per-head RMSNorm on q and k
- phi3        GQA 4/2, fused ``qkv_proj``
- gemma2      GQA 4/2, attn logit soft-capping 50, layer 0 sliding (window 64) / layer 1 full,
              query_pre_attn_scalar=24 (scale 24**-0.5, NOT 1/sqrt(head_dim)); eager only
- gpt2        MHA 4 heads, fused c_attn (Conv1D), learned positions
- gpt_neox    MHA 4 heads, fused query_key_value, partial rotary (25%)
- opt         MHA 4 heads, learned positions (offset 2)
- bert        encoder (BertForMaskedLM), MHA 4 heads, no KV cache
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = [
    "llama",
    "mistral",
    "mistral_sw",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gpt2",
    "gpt_neox",
    "opt",
    "bert",
]

# attn implementations accepted by transformers 5.24 for each family *that run on CPU*.
# (All of them also declare flash_attention_2/3 support, which needs CUDA; flex_attention is declared
# for all except gpt2 but is not used by these tests.) Gemma2 has _supports_sdpa = False
# ("sdpa does not support softcapping").
ATTN_IMPLS = {
    "llama": ("eager", "sdpa"),
    "mistral": ("eager", "sdpa"),
    "mistral_sw": ("eager", "sdpa"),
    "qwen2": ("eager", "sdpa"),
    "qwen3": ("eager", "sdpa"),
    "phi3": ("eager", "sdpa"),
    "gemma2": ("eager",),
    "gpt2": ("eager", "sdpa"),
    "gpt_neox": ("eager", "sdpa"),
    "opt": ("eager", "sdpa"),
    "bert": ("eager", "sdpa"),
}

DECODERS = [f for f in FAMILIES if f != "bert"]

VOCAB = 256
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTER = 128
MAX_POS = 512

_COMMON_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _rope_decoder_kwargs(**extra):
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        **_COMMON_TOKENS,
    )
    kw.update(extra)
    return kw


def _config(family: str, **overrides):
    import transformers as T

    if family == "llama":
        cls, kw = T.LlamaConfig, _rope_decoder_kwargs(head_dim=HEAD_DIM)
    elif family in ("mistral", "mistral_sw"):
        sw = 64 if family == "mistral" else 8
        cls, kw = T.MistralConfig, _rope_decoder_kwargs(head_dim=HEAD_DIM, sliding_window=sw)
    elif family == "qwen2":
        cls, kw = T.Qwen2Config, _rope_decoder_kwargs(use_sliding_window=False)
    elif family == "qwen3":
        cls, kw = T.Qwen3Config, _rope_decoder_kwargs(head_dim=HEAD_DIM, use_sliding_window=False)
    elif family == "phi3":
        cls, kw = T.Phi3Config, _rope_decoder_kwargs(original_max_position_embeddings=MAX_POS)
    elif family == "gemma2":
        cls, kw = T.Gemma2Config, _rope_decoder_kwargs(
            head_dim=HEAD_DIM,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=24,
            tie_word_embeddings=True,
        )
    elif family == "gpt2":
        cls, kw = T.GPT2Config, dict(
            vocab_size=VOCAB, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
            n_inner=INTER, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_COMMON_TOKENS,
        )
    elif family == "gpt_neox":
        cls, kw = T.GPTNeoXConfig, dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTER, max_position_embeddings=MAX_POS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            **_COMMON_TOKENS,
        )
    elif family == "opt":
        cls, kw = T.OPTConfig, dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            ffn_dim=INTER, max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN,
            dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )
    elif family == "bert":
        cls, kw = T.BertConfig, dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTER, max_position_embeddings=MAX_POS, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=0,
        )
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def _model_cls(family: str):
    import transformers as T

    return {
        "llama": T.LlamaForCausalLM,
        "mistral": T.MistralForCausalLM,
        "mistral_sw": T.MistralForCausalLM,
        "qwen2": T.Qwen2ForCausalLM,
        "qwen3": T.Qwen3ForCausalLM,
        "phi3": T.Phi3ForCausalLM,
        "gemma2": T.Gemma2ForCausalLM,
        "gpt2": T.GPT2LMHeadModel,
        "gpt_neox": T.GPTNeoXForCausalLM,
        "opt": T.OPTForCausalLM,
        "bert": T.BertForMaskedLM,
    }[family]


def build(family: str, attn: str = "sdpa", seed: int = 0, **overrides):
    """Tiny random model of ``family`` with ``attn_implementation=attn``, eval(), float32."""
    if attn not in ATTN_IMPLS[family]:
        raise ValueError(f"{family} does not support attn={attn!r} (supported: {ATTN_IMPLS[family]})")
    cfg = _config(family, **overrides)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = _model_cls(family)(cfg)
    # make sure the requested implementation is the one used (from_config-free path)
    model.config._attn_implementation = attn
    return model.to(torch.float32).eval()


# ----------------------------------------------------------------------------------------------
# TinyGPT: hand-written decoder with an explicit tuple KV cache
# ----------------------------------------------------------------------------------------------


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE. x [B, H, S, D], pos [S] (int)."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = pos.to(torch.float32)[:, None] * inv[None, :]  # [S, D/2]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _Block(nn.Module):
    def __init__(self, hidden, n_heads, n_kv, head_dim, inter):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.ln1 = nn.LayerNorm(hidden)
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, hidden)

    def forward(self, x, pos, past):
        B, S, _ = x.shape
        h = self.ln1(x)
        q = self.q_proj(h).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = _rope(q, pos), _rope(k, pos)
        if past is not None:
            past_k, past_v = past
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        o = self._attend(q, k, v, past is None)
        o = o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        x = x + self.o_proj(o)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x, (k, v)

    def _attend(self, q, k, v, prompt: bool):
        """SDPA, causal over a prompt; one new token (no mask) after it. Subclasses spell it otherwise."""
        gqa = self.n_kv != self.n_heads
        if prompt:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)


class TinyGPT(nn.Module):
    """Minimal RoPE decoder, GQA 4 q / 2 kv heads, head_dim 16.

    ``forward(input_ids, past=None, pos_offset=0) -> (logits, present)``; ``present`` is a tuple per
    layer of ``(k, v)`` each ``[B, Hkv, S_total, D]`` (``torch.cat([past_k, k], dim=2)``).
    Attention: SDPA with ``is_causal=True`` when ``past is None``, no mask otherwise (so a multi-token
    step with a past is NOT causal inside the new tokens: decode one token at a time).
    """

    def __init__(self, vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, n_heads=HEADS, n_kv=KV_HEADS,
                 head_dim=HEAD_DIM, inter=INTER, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, n_heads, n_kv, head_dim, inter) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.eval()

    def forward(self, input_ids, past=None, pos_offset=0):
        S = input_ids.shape[1]
        pos = torch.arange(S, device=input_ids.device) + pos_offset
        x = self.embed(input_ids)
        present = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, pos, None if past is None else past[i])
            present.append(kv)
        return self.lm_head(self.ln_f(x)), tuple(present)


@torch.no_grad()
def tinygpt_generate(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding of ``n`` tokens; returns ``[B, S + n]``. ``model`` may be a compiled wrapper
    with the same call signature as ``TinyGPT.forward``."""
    logits, past = model(ids)
    out = [ids]
    pos = ids.shape[1]
    for i in range(n):
        nxt = logits[:, -1:].argmax(-1)
        out.append(nxt)
        if i == n - 1:
            break
        logits, past = model(nxt, past, pos)
        pos += 1
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------
# TinyEagerGPT: TinyGPT with eager attention in the spellings hand-written models use
# ----------------------------------------------------------------------------------------------

EAGER_STYLES = {
    "in_place": "scores /= sqrt(d), masked_fill_ statement, nn.Softmax and nn.Dropout modules, "
                "repeat_interleave",
    "bmm": "[batch·heads] layout: baddbmm(mask, q, kᵀ, alpha=scale), bmm, view back",
    "fp32_softmax": "torch.where mask, softmax in float32 cast back, HF repeat_kv",
    "mqa": "one KV head broadcast by the matmul (MQA), q pre-scaled, additive mask, x.softmax(-1)",
}


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """HF's repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n, S, D], each KV head n times in a row."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class _EagerBlock(_Block):
    def __init__(self, hidden, n_heads, n_kv, head_dim, inter, style):
        super().__init__(hidden, n_heads, n_kv, head_dim, inter)
        self.style = style
        self.scale = head_dim ** -0.5
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(0.1)  # inactive in eval()

    def _attend(self, q, k, v, prompt: bool):
        B, H, T, D = q.shape
        S = k.shape[2]
        G = H // self.n_kv
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if self.style == "in_place":
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
            scores = q @ k.transpose(-2, -1)
            scores /= math.sqrt(D)
            scores.masked_fill_(~allowed, float("-inf"))
            return self.attn_drop(self.softmax(scores)) @ v
        if self.style == "bmm":
            k3 = repeat_kv(k, G).reshape(B * H, S, D)
            v3 = repeat_kv(v, G).reshape(B * H, S, D)
            bias = torch.zeros(1, T, S, dtype=q.dtype, device=q.device).masked_fill(
                ~allowed, torch.finfo(q.dtype).min)
            scores = torch.baddbmm(bias, q.reshape(B * H, T, D), k3.transpose(1, 2), beta=1.0,
                                   alpha=1 / math.sqrt(D))
            return torch.bmm(torch.softmax(scores, dim=-1), v3).view(B, H, T, D)
        if self.style == "fp32_softmax":
            k, v = repeat_kv(k, G), repeat_kv(v, G)
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
            scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
            p = F.softmax(scores.float(), dim=-1).to(q.dtype)
            return torch.matmul(p, v)
        if self.style == "mqa":
            bias = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill(
                ~allowed, torch.finfo(q.dtype).min)
            scores = (q * self.scale) @ k.mT + bias
            return self.attn_drop(scores.softmax(-1)) @ v
        raise ValueError(f"unknown style {self.style!r}; known: {list(EAGER_STYLES)}")


class TinyEagerGPT(TinyGPT):
    """TinyGPT (same interface, tuple cache) whose attention is eager code in one of ``EAGER_STYLES``.

    GQA 4 q / 2 kv heads, except ``style="mqa"``: 1 kv head, broadcast by the matmul (no repeat).
    """

    def __init__(self, style: str, vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, n_heads=HEADS, n_kv=None,
                 head_dim=HEAD_DIM, inter=INTER, seed=0):
        if style not in EAGER_STYLES:
            raise ValueError(f"unknown style {style!r}; known: {list(EAGER_STYLES)}")
        nn.Module.__init__(self)
        n_kv = (1 if style == "mqa" else KV_HEADS) if n_kv is None else n_kv
        torch.manual_seed(seed)
        self.style = style
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(_EagerBlock(hidden, n_heads, n_kv, head_dim, inter, style)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.eval()
