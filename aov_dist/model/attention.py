"""Attention kernel selection: FlashAttention-2 where it can run, SDPA everywhere else."""
from __future__ import annotations

import importlib.util

import torch

_KNOWN = ("auto", "flash_attention_2", "sdpa", "eager")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(requested: str = "auto") -> str:
    """"auto" -> "flash_attention_2" when flash-attn is importable and CUDA is present, else "sdpa".

    An explicit "flash_attention_2" without flash-attn/CUDA is an error rather than a silent
    fallback: a config that asks for it should not quietly run 2-3x slower.
    """
    if requested not in _KNOWN:
        raise ValueError(f"model.attn_implementation must be one of {_KNOWN}, got {requested!r}")
    if requested == "auto":
        return "flash_attention_2" if flash_attn_available() else "sdpa"
    if requested == "flash_attention_2" and not flash_attn_available():
        raise ValueError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA device "
            "(install the [gpu] extra), or use 'auto' / 'sdpa'"
        )
    return requested
