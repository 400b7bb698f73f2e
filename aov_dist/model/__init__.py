"""Anomaly-OV model package: expert (LTFM), LLaVA-OneVision wrapper, processor, presets.

Heavy imports (transformers) are deferred: `from aov_dist.model import build_model` loads them.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "AnomalyOVConfig": ".hf_config",
    "AnomalyOVForConditionalGeneration": ".anomaly_ov",
    "AnomalyOVCausalLMOutput": ".anomaly_ov",
    "SpliceError": ".anomaly_ov",
    "AnomalyOVProcessor": ".processor",
    "ImageTokensExceedMaxLength": ".processor",
    "EncodedImages": ".processor",
    "ModelConfig": ".config",
    "build_model": ".presets",
    "build_config": ".presets",
    "meta_model": ".presets",
    "PRESETS": ".presets",
    "resolve_attn_implementation": ".attention",
    "build_tiny_tokenizer": ".tokenizer",
    "AnomalyExpert": ".expert",
    "ExpertDims": ".expert",
    "ExpertOutput": ".expert",
    "load_expert_weights": ".expert",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aov_dist.model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
