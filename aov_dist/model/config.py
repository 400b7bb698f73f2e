"""Model section of the config schema (conf/model/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    # tiny | aov_0.5b | aov_7b: the architecture preset (see aov_dist/model/presets.py).
    preset: str = "tiny"
    # HF-format LLaVA-OneVision / Anomaly-OV directory (local path or s3://); None = random init
    # (tiny only: the official presets need a directory for their Qwen2 tokenizer).
    pretrained_path: Optional[str] = None
    # Released expert weights (pretrained_expert_*.pth) or our own export; None = keep what the model has.
    expert_path: Optional[str] = None
    # auto picks flash_attention_2 when flash-attn and CUDA are present, sdpa otherwise.
    attn_implementation: str = "auto"
    # auto: bf16 on GPU, fp32 on CPU; or bf16 / fp16 / fp32.
    dtype: str = "auto"
    activation_checkpointing: bool = False
    # Score thresholds that pick the adverb "slightly" / "moderately" / "highly". None = the
    # loaded checkpoint's own (the paper's 0.3 / 0.7 for a new model), so a trained model is
    # evaluated with the thresholds it was trained with.
    adverb_thresholds: Optional[list[float]] = None
    # Text-only batches run tower + expert on a dummy view with zero contribution (ZeRO-3 needs every
    # rank to run the same modules).
    vision_dummy_for_text_only: bool = True
    # Preset overrides (dimension names of aov_dist/model/presets.py), e.g. {"text_layers": 4}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Seed of the random initialisation (tiny / random-init models).
    init_seed: int = 0
    # Build the preset's architecture with random weights and the local tokenizer instead of
    # loading pretrained_path: GPU checks, planning and benchmarks at real dimensions, no download.
    # (tiny is always random-init.) Never for a real training run.
    random_init: bool = False
