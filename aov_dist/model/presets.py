"""Architecture presets and `build_model(cfg) -> (model, processor)`.

tiny      : a few million parameters, random init, local tokenizer; CPU tests and the demo.
aov_0.5b  : SigLIP-so400m (26 layers kept, 1152) + Qwen2-0.5B (896), as llava-onevision-qwen2-0.5b-ov-hf.
aov_7b    : SigLIP-so400m + Qwen2-7B (3584), as llava-onevision-qwen2-7b-ov-hf.
The official presets build on the meta device for shape checks (`build_config` + `meta_model`) and
load weights from an HF-format directory (`model.pretrained_path`) plus an expert file.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional

import torch
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from .anomaly_ov import AnomalyOVForConditionalGeneration
from .attention import resolve_attn_implementation
from .config import ModelConfig
from .expert import load_expert_weights
from .hf_config import AnomalyOVConfig
from .partial import is_partial, read_partial
from aov_dist.storage import localize
from .processor import AnomalyOVProcessor, layout_from_hf_config
from .tokenizer import build_tiny_tokenizer

_SIGLIP_SO400M = dict(
    vision_hidden=1152, vision_intermediate=4304, vision_layers=26, vision_heads=16, image_size=384, patch_size=14, max_grid=6
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision_hidden=128, vision_intermediate=512, vision_layers=4, vision_heads=4, image_size=112, patch_size=14,
        max_grid=4, text_hidden=128, text_intermediate=384, text_layers=4, text_heads=4, text_kv_heads=2,
        vocab_size=None, tie_embeddings=False, rope_theta=10000.0, max_position=4096, expert_embed_dim=64,
        tokenizer_vocab=1024,
    ),
    "aov_0.5b": dict(
        **_SIGLIP_SO400M, text_hidden=896, text_intermediate=4864, text_layers=24, text_heads=14, text_kv_heads=2,
        vocab_size=152000, tie_embeddings=True, rope_theta=1000000.0, max_position=32768, expert_embed_dim=512,
    ),
    "aov_7b": dict(
        **_SIGLIP_SO400M, text_hidden=3584, text_intermediate=18944, text_layers=28, text_heads=28, text_kv_heads=4,
        vocab_size=152128, tie_embeddings=False, rope_theta=1000000.0, max_position=32768, expert_embed_dim=512,
    ),
}


# Overrides allowed when loading a directory: settings a stock LLaVA-OV config.json cannot hold.
LOAD_OVERRIDES = {"expert_embed_dim", "expert_level_layers", "expert_last_layer"}


def preset_dims(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    dims = dict(PRESETS[preset])
    unknown = sorted(set(overrides or {}) - set(dims))
    if unknown:
        raise ValueError(f"model.overrides: unknown keys {unknown} for preset {preset!r}; known: {sorted(dims)}")
    dims.update(overrides or {})
    return dims


def grid_pinpoints(image_size: int, max_grid: int) -> list[list[int]]:
    """AnyRes candidates: every (rows x cols) crop grid up to max_grid x max_grid (official: 6 x 6 at 384)."""
    return [[image_size * r, image_size * c] for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]


def build_config(preset: str, overrides: dict[str, Any] | None = None, **extra: Any) -> AnomalyOVConfig:
    d = preset_dims(preset, overrides)
    if d["vocab_size"] is None:
        raise ValueError(f"preset {preset!r}: vocab_size comes from the tokenizer; pass overrides={{'vocab_size': n}}")
    vision = dict(
        model_type="siglip_vision_model", hidden_size=d["vision_hidden"], intermediate_size=d["vision_intermediate"],
        num_hidden_layers=d["vision_layers"], num_attention_heads=d["vision_heads"], image_size=d["image_size"],
        patch_size=d["patch_size"], vision_use_head=False,
    )
    text = dict(
        model_type="qwen2", hidden_size=d["text_hidden"], intermediate_size=d["text_intermediate"],
        num_hidden_layers=d["text_layers"], num_attention_heads=d["text_heads"], num_key_value_heads=d["text_kv_heads"],
        vocab_size=d["vocab_size"], tie_word_embeddings=d["tie_embeddings"], max_position_embeddings=d["max_position"],
        rope_parameters={"rope_type": "default", "rope_theta": d["rope_theta"]},
    )
    return AnomalyOVConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=grid_pinpoints(d["image_size"], d["max_grid"]),
        tie_word_embeddings=d["tie_embeddings"], expert_embed_dim=d["expert_embed_dim"], **extra,
    )


def meta_model(preset: str, overrides: dict[str, Any] | None = None) -> AnomalyOVForConditionalGeneration:
    """The preset's model on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return AnomalyOVForConditionalGeneration(build_config(preset, overrides))


def resolve_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in table:
        raise ValueError(f"model.dtype must be auto or one of {sorted(table)}, got {name!r}")
    return table[name]


def tiny_processor(dims: dict[str, Any] | None = None) -> AnomalyOVProcessor:
    d = dims or preset_dims("tiny")
    size = d["image_size"]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=grid_pinpoints(size, d["max_grid"])
    )
    tokenizer = build_tiny_tokenizer(d.get("tokenizer_vocab", 1024))
    config_like = {"vision_config": {"image_size": size, "patch_size": d["patch_size"]},
                   "image_grid_pinpoints": grid_pinpoints(size, d["max_grid"])}
    return AnomalyOVProcessor(tokenizer, image_processor, layout_from_hf_config(config_like))


def build_model(cfg: ModelConfig, gather: Optional[Callable[[torch.nn.Module], ContextManager]] = None
                ) -> tuple[AnomalyOVForConditionalGeneration, AnomalyOVProcessor]:
    """The model and its processor. Random init (tiny, or ``random_init``) or an HF-format directory
    (any preset); then the expert file, if given. Built inside zero.Init (ZeRO-3), its parameters
    are partitioned: ``gather(module)`` (the training strategy's ``gathered_for_update``) gives the
    expert's full parameters to load the file into."""
    if cfg.pretrained_path and is_partial(localize(cfg.pretrained_path)):
        return _build_on_base(cfg, gather)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    dtype = resolve_dtype(cfg.dtype)
    anomaly: dict[str, Any] = dict(vision_dummy_for_text_only=cfg.vision_dummy_for_text_only)
    if cfg.adverb_thresholds is not None:
        anomaly["adverb_thresholds"] = list(cfg.adverb_thresholds)
    if cfg.pretrained_path:
        local = localize(cfg.pretrained_path)
        processor = AnomalyOVProcessor.from_pretrained(local)
        # A stock llava_onevision config.json loads into AnomalyOVConfig (expert fields get defaults).
        unknown = sorted(set(cfg.overrides) - LOAD_OVERRIDES)
        if unknown:
            raise ValueError(f"model.overrides {unknown}: with pretrained_path the architecture comes from the directory; "
                             f"only {sorted(LOAD_OVERRIDES)} may be overridden")
        config = AnomalyOVConfig.from_pretrained(local, adverb_token_ids=processor.adverb_token_ids, **anomaly, **cfg.overrides)
        model = AnomalyOVForConditionalGeneration.from_pretrained(local, config=config, dtype=dtype, attn_implementation=attn)
        _realign(model)
    else:
        if cfg.preset != "tiny" and not cfg.random_init:
            raise ValueError(
                f"model.preset={cfg.preset!r} needs model.pretrained_path (an HF-format LLaVA-OneVision directory, "
                "for its weights and Qwen2 tokenizer); only 'tiny' builds from scratch (or model.random_init=true "
                "for checks at real dimensions)"
            )
        dims = preset_dims(cfg.preset, cfg.overrides)
        processor = tiny_processor(dims)
        # random-init official presets keep their vocabulary (the LM head costs what it costs);
        # the local tokenizer's ids are a subset of it
        overrides = {**cfg.overrides, "vocab_size": dims["vocab_size"] or len(processor.tokenizer)}
        config = build_config(cfg.preset, overrides, adverb_token_ids=processor.adverb_token_ids, **anomaly)
        with _seeded(cfg.init_seed):
            model = AnomalyOVForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    if cfg.expert_path:
        if gather is None and any(hasattr(p, "ds_id") for p in model.expert.parameters()):
            raise ValueError("build_model: the model was built partitioned (ZeRO-3); pass the strategy's "
                             "gather to load model.expert_path into it")
        with _gathering(gather, model.expert.parameters()):
            load_expert_weights(model.expert, cfg.expert_path)
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def _gathering(gather, params) -> ContextManager:
    """``gather(params)`` when given (full ZeRO-3 parameters to write into), else nothing to do."""
    return gather(list(params)) if gather is not None else contextlib.nullcontext()


def _build_on_base(cfg: ModelConfig, gather) -> tuple[AnomalyOVForConditionalGeneration, AnomalyOVProcessor]:
    """A partial export (model/partial.py): its base, built as it was for training, with the
    trained tensors loaded on top; this job's runtime settings (dtype, attention, thresholds,
    checkpointing) and its own expert file win."""
    import dataclasses

    local = localize(cfg.pretrained_path)
    base_fields, state = read_partial(local)
    base = dataclasses.replace(ModelConfig(**base_fields), dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                               activation_checkpointing=cfg.activation_checkpointing,
                               vision_dummy_for_text_only=cfg.vision_dummy_for_text_only,
                               adverb_thresholds=cfg.adverb_thresholds or base_fields.get("adverb_thresholds"))
    model, processor = build_model(base, gather)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{cfg.pretrained_path}: trained tensors {unknown[:5]} are not parameters of its base model")
    with _gathering(gather, (params[k] for k in state)), torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))
    if cfg.expert_path:
        with _gathering(gather, model.expert.parameters()):
            load_expert_weights(model.expert, cfg.expert_path)  # this job's expert file beats the trained one
    return model, processor


def _realign(model: torch.nn.Module) -> None:
    """Copy CPU parameters that safetensors left at unaligned mmap offsets into fresh memory: BLAS
    picks different kernels for unaligned data, so a reloaded model would round differently (1 ulp)
    from the one that was saved. GPU copies are aligned anyway; ZeRO-3 partitions are skipped."""
    for p in model.parameters():
        if p.device.type == "cpu" and not hasattr(p, "ds_id") and p.data_ptr() % 64:
            p.data = p.data.clone()


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
