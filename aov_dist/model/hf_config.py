"""AnomalyOVConfig: LlavaOnevisionConfig + the expert's dimensions, SigLIP level indices and the
adverb splice settings. Saved in config.json with model_type "anomaly_ov".

transformers 5 configs are strict dataclasses (huggingface_hub `@strict`): new fields are declared
as typed class attributes with defaults on a `@strict` subclass; type errors raise at construction.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlavaOnevisionConfig

from .expert import ExpertDims

# With output_hidden_states, hidden_states[0] is the patch embedding and hidden_states[k] the output
# of encoder layer k: the released expert reads layers 7, 13, 19, 25 and the 26th (last kept) layer.
OFFICIAL_LEVEL_LAYERS = [7, 13, 19, 25]
OFFICIAL_LAST_LAYER = 26


def proportional_levels(num_layers: int) -> tuple[list[int], int]:
    """Level indices for a tower of another depth, at the official fractions of a 26-layer tower."""
    levels = [max(1, min(num_layers, round(k * num_layers / OFFICIAL_LAST_LAYER))) for k in OFFICIAL_LEVEL_LAYERS]
    return levels, num_layers


@strict
class AnomalyOVConfig(LlavaOnevisionConfig):
    model_type = "anomaly_ov"

    expert_embed_dim: int = 512
    expert_pool: int = 2
    expert_logit_scale: float = 100.0
    # hidden_states indices (0 = patch embedding); None -> official (26-layer tower) or proportional.
    expert_level_layers: list[int] | None = None
    expert_last_layer: int | None = None
    # Score thresholds picking adverb_token_ids[0|1|2] ("slightly" < 0.3 <= "moderately" < 0.7 <= "highly").
    adverb_thresholds: list[float] | None = None
    # Token ids of " slightly", " moderately", " highly" in the model's tokenizer (built with the
    # tokenizer by presets / the processor, never hard-coded). Filled into the adverb slots.
    adverb_token_ids: list[int] | None = None
    # Text-only batches still run tower + expert on a dummy view (zero contribution), so that every
    # ZeRO-3 rank gathers the same parameters in the same order.
    vision_dummy_for_text_only: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.vision_config.num_hidden_layers
        if self.expert_level_layers is None or self.expert_last_layer is None:
            if layers == OFFICIAL_LAST_LAYER:
                levels, last = list(OFFICIAL_LEVEL_LAYERS), OFFICIAL_LAST_LAYER
            else:
                levels, last = proportional_levels(layers)
            self.expert_level_layers = self.expert_level_layers if self.expert_level_layers is not None else levels
            self.expert_last_layer = self.expert_last_layer if self.expert_last_layer is not None else last
        if self.adverb_thresholds is None:
            self.adverb_thresholds = [0.3, 0.7]
        self._check()

    def _check(self) -> None:
        layers = self.vision_config.num_hidden_layers
        for idx in [*self.expert_level_layers, self.expert_last_layer]:
            if not 0 <= idx <= layers:
                raise ValueError(
                    f"AnomalyOVConfig: expert layer index {idx} out of range for a {layers}-layer vision tower "
                    f"(expert_level_layers={self.expert_level_layers}, expert_last_layer={self.expert_last_layer})"
                )
        t = self.adverb_thresholds
        if len(t) != 2 or not 0.0 <= t[0] <= t[1] <= 1.0:
            raise ValueError(f"AnomalyOVConfig: adverb_thresholds must be two increasing values in [0, 1], got {t}")
        if self.adverb_token_ids is not None and len(self.adverb_token_ids) != 3:
            raise ValueError(f"AnomalyOVConfig: adverb_token_ids must hold 3 ids, got {self.adverb_token_ids}")
        if self.vision_feature_select_strategy != "full":
            raise ValueError("AnomalyOVConfig: the expert needs every patch token: vision_feature_select_strategy='full'")

    def expert_dims(self) -> ExpertDims:
        v = self.vision_config
        return ExpertDims(
            vision_dim=v.hidden_size,
            grid=v.image_size // v.patch_size,
            embed_dim=self.expert_embed_dim,
            pool=self.expert_pool,
            num_levels=len(self.expert_level_layers),
            logit_scale=self.expert_logit_scale,
        )


AutoConfig.register("anomaly_ov", AnomalyOVConfig, exist_ok=True)
