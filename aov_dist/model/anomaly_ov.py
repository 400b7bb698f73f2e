"""Anomaly-OV on transformers' LlavaOnevisionForConditionalGeneration.

The stock model embeds the prompt, runs SigLIP on every view, projects and packs the visual
tokens, and scatters them into the image-token positions. We do the same ourselves (reusing the
stock projector and `pack_image_features`) because we also need the intermediate SigLIP levels for
the expert, and we scatter three kinds of reserved positions (architecture.md §3, `token_type`):
1 visual tokens, 2 the adverb slot (filled with the token id picked by the expert's score), 3 the
anomaly tokens (r(I), base view tokens, crop grid with newlines, all through the projector).
Everything else is the stock language model and LM head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionCausalLMOutputWithPast,
    LlavaOnevisionForConditionalGeneration,
)

from .expert import AnomalyExpert, ExpertOutput
from .hf_config import AnomalyOVConfig
from .layout import SINGLE_VIEW
from .loss import label_positions_loss

# token_type values (architecture.md §3).
TEXT, VISUAL, ADVERB, ANOMALY = 0, 1, 2, 3
# Inputs that only the prefill step of generate() may see.
_PREFILL_ONLY = ("pixel_values", "token_type", "image_grids", "image_sizes", "image_labels")
# Layout metadata the forward reads on the host (crop grids and image sizes as Python ints): a
# batch keeps them on the CPU when it moves to an accelerator (aov_dist.devices.move_to_device),
# because reading them back from a GPU would cost a host sync per image. A packed batch's
# sample lengths are only counted on the host; the attention reads position_ids.
HOST_INPUTS = ("image_grids", "image_sizes", "sample_lengths")


# Stock LLaVA-OneVision files use legacy key names (language_model.model.*, vision_tower.*, ...) that
# transformers renames on load (and back on save) by model_type; "anomaly_ov" takes the same rules,
# so stock checkpoints load and our exports keep the stock layout (plus expert.*).
register_checkpoint_conversion_mapping("anomaly_ov", get_checkpoint_conversion_mapping("llava_onevision"), overwrite=True)


class SpliceError(ValueError):
    """The reserved positions of a batch do not match what the images produce."""


@dataclass
class AnomalyOVCausalLMOutput(LlavaOnevisionCausalLMOutputWithPast):
    expert_scores: torch.FloatTensor | None = None  # [I] sigmoid image anomaly scores
    expert_logits: torch.FloatTensor | None = None  # [I]


@dataclass
class ViewIndex:
    image_index: Tensor  # [V] long: which image each view belongs to
    is_base: Tensor  # [V] bool
    views_per_image: list[int]
    grids: list[tuple[int, int]]


def view_index(image_grids: Tensor, device: torch.device) -> ViewIndex:
    """Views are image-major, base view first then crops row-major (architecture.md §3)."""
    grids = [(int(r), int(c)) for r, c in image_grids.tolist()]
    counts = [1 if g == SINGLE_VIEW else 1 + g[0] * g[1] for g in grids]
    image_index = torch.repeat_interleave(torch.arange(len(grids)), torch.tensor(counts, dtype=torch.long))
    is_base = torch.zeros(sum(counts), dtype=torch.bool)
    is_base[torch.tensor([0, *counts[:-1]]).cumsum(0)] = True
    return ViewIndex(image_index.to(device), is_base.to(device), counts, grids)


class AnomalyOVForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    config: AnomalyOVConfig

    def __init__(self, config: AnomalyOVConfig):
        super().__init__(config)
        self.expert = AnomalyExpert(config.expert_dims())
        for module in self.expert.modules():  # marks the modules that get PyTorch's default init
            module._aov_expert = True
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # The registered legacy renaming covers every stock key but "language_model.lm_head" when the
        # class is ours (transformers 5.24 drops that root rename for non-library classes; measured):
        # an explicit key mapping restores it, for stock checkpoints and our own exports alike.
        kwargs.setdefault("key_mapping", {r"^language_model.lm_head": "lm_head"})
        return super().from_pretrained(*args, **kwargs)

    # ------------------------------------------------------------------ init
    def _init_weights(self, module: nn.Module) -> None:
        # The expert keeps PyTorch's default init (as the official code): std-0.02 normals would
        # make its 100*cosine logits and attention start far from where the paper trained them.
        if isinstance(module, AnomalyExpert):
            init.normal_(module.positive_embedding, std=1.0)
            init.normal_(module.negative_embedding, std=1.0)
        elif isinstance(module, nn.Linear) and getattr(module, "_aov_expert", False):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            bound = 1.0 / module.in_features**0.5
            init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)

    # ---------------------------------------------------------------- vision
    def _vision(self, pixel_values: Tensor, image_grids: Tensor) -> tuple[Tensor, ExpertOutput, ViewIndex]:
        """SigLIP over all views, then the expert: (visual features [V, T, D], expert output, index)."""
        cfg = self.config
        idx = view_index(image_grids, pixel_values.device)
        if sum(idx.views_per_image) != pixel_values.shape[0]:
            raise SpliceError(
                f"pixel_values holds {pixel_values.shape[0]} views but image_grids {idx.grids} need "
                f"{sum(idx.views_per_image)}"
            )
        tower = self.model.vision_tower
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        levels = [hidden[k] for k in cfg.expert_level_layers]
        expert_out = self.expert(hidden[cfg.expert_last_layer], levels, idx.image_index, idx.is_base, len(idx.grids))
        return hidden[cfg.vision_feature_layer], expert_out, idx

    def expert_forward(self, pixel_values: Tensor, image_grids: Tensor) -> ExpertOutput:
        """Stage 1: vision tower + expert only (scores, logits, maps [V, g, g], tokens, image_tokens)."""
        return self._vision(pixel_values, image_grids)[1]

    def _image_sequences(
        self, features: Tensor, expert_out: ExpertOutput, idx: ViewIndex, image_sizes: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: packed visual tokens (stock LLaVA-OV packing) and the anomaly-token sequence."""
        proj = self.model.multi_modal_projector
        newline = self.model.image_newline
        per_image = torch.split(proj(features), idx.views_per_image, dim=0)
        visual, _ = self.model.pack_image_features(
            list(per_image), image_sizes, image_newline=newline, vision_aspect_ratio=self.config.vision_aspect_ratio
        )
        tokens = torch.split(proj(expert_out.tokens), idx.views_per_image, dim=0)  # [n, p*p, H] each
        image_tokens = proj(expert_out.image_tokens)  # [I, 1, H]
        p, hidden = self.config.expert_pool, newline.shape[0]
        anomaly = []
        for i, ((rows, cols), tok) in enumerate(zip(idx.grids, tokens)):
            parts = [image_tokens[i], tok[0]]
            if (rows, cols) == SINGLE_VIEW:
                parts.append(newline[None].to(tok.dtype))
            else:
                # (rows x cols) crops of (p x p) tokens -> a (p*rows) x (p*cols) grid, newline per row.
                grid = tok[1:].reshape(rows, cols, p, p, hidden).permute(0, 2, 1, 3, 4).reshape(p * rows, p * cols, hidden)
                ends = newline.to(tok.dtype).expand(p * rows, 1, hidden)
                parts.append(torch.cat([grid, ends], dim=1).reshape(-1, hidden))
            anomaly.append(torch.cat(parts, dim=0))
        return visual, anomaly

    def adverb_ids(self, scores: Tensor) -> Tensor:
        """[I] token ids: adverb_token_ids[0] below thresholds[0], [1] below thresholds[1], else [2]."""
        if self.config.adverb_token_ids is None:
            raise SpliceError("config.adverb_token_ids is not set (build the model with presets.build_model)")
        bounds, ids = self._adverb_tables(scores.device)
        bucket = torch.bucketize(scores.detach().float(), bounds, right=True)
        return ids[bucket]

    def _adverb_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Thresholds and adverb ids on ``device``, made once per device: building them from
        Python lists at every forward is a blocking host-to-device copy on a GPU."""
        key = (str(device), tuple(self.config.adverb_thresholds), tuple(self.config.adverb_token_ids))
        cache = self.__dict__.setdefault("_adverb_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = (torch.tensor(self.config.adverb_thresholds, device=device, dtype=torch.float32),
                          torch.tensor(self.config.adverb_token_ids, device=device))
        return cache[key]

    def _embed(
        self, input_ids: Tensor, token_type: Tensor, pixel_values: Tensor, image_grids: Tensor, image_sizes: Tensor
    ) -> tuple[Tensor, ExpertOutput]:
        features, expert_out, idx = self._vision(pixel_values, image_grids)
        visual, anomaly = self._image_sequences(features, expert_out, idx, image_sizes)
        visual_src, anomaly_src = torch.cat(visual, dim=0), torch.cat(anomaly, dim=0)
        _check_counts(token_type, {ADVERB: ("adverb slots (token_type 2)", len(idx.grids), "images"),
                                   VISUAL: ("visual positions (token_type 1)", visual_src.shape[0], "visual tokens"),
                                   ANOMALY: ("anomaly positions (token_type 3)", anomaly_src.shape[0], "anomaly tokens")})
        slots = token_type == ADVERB
        ids = input_ids.masked_scatter(slots, self.adverb_ids(expert_out.scores))
        embeds = self.get_input_embeddings()(ids)
        for kind, source in ((VISUAL, visual_src), (ANOMALY, anomaly_src)):
            embeds = embeds.masked_scatter((token_type == kind)[..., None], source.to(embeds.dtype))
        return embeds, expert_out

    def _dummy_vision(self, device: torch.device) -> Tensor:
        """Text-only batch: run tower + expert + projector on one blank view and return 0 x their sum
        (to add to the embeddings), so that every rank runs (and, under ZeRO-3, gathers) the same
        modules with zero effect."""
        size = self.config.vision_config.image_size
        pixels = torch.zeros(1, 3, size, size, device=device)  # _vision casts to the tower's dtype
        grids = torch.zeros(1, 2, dtype=torch.long)
        sizes = torch.tensor([[size, size]])  # host-side, like a batch's image_sizes (HOST_INPUTS)
        features, expert_out, idx = self._vision(pixels, grids)
        visual, anomaly = self._image_sequences(features, expert_out, idx, sizes)
        return (visual[0].sum() + anomaly[0].sum() + expert_out.logits.sum()) * 0.0

    # --------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        token_type: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grids: Tensor | None = None,
        image_sizes: Tensor | None = None,
        image_labels: Tensor | None = None,  # stage-1 targets; accepted so model(**batch) works
        sample_lengths: Tensor | None = None,  # packed batches: tokens per sample, for counting only
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs,
    ) -> AnomalyOVCausalLMOutput:
        if sample_lengths is not None and position_ids is not None and position_ids.shape[0] > 1 \
                and self.config._attn_implementation == "flash_attention_2":
            # transformers' FlashAttention path finds packed samples only in a single row: rows of
            # several samples would attend across samples without any error
            raise ValueError(f"packed batch of {position_ids.shape[0]} rows under flash_attention_2: "
                             "FlashAttention-2 varlen needs the samples in one row (processor.collate_packed "
                             "with one_row=True)")
        expert_out = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("AnomalyOV.forward needs input_ids or inputs_embeds")
            has_images = pixel_values is not None and pixel_values.shape[0] > 0
            if has_images:
                if token_type is None or image_grids is None or image_sizes is None:
                    raise ValueError("pixel_values given without token_type / image_grids / image_sizes")
                inputs_embeds, expert_out = self._embed(input_ids, token_type, pixel_values, image_grids, image_sizes)
            else:
                if token_type is not None and bool((token_type != TEXT).any()):
                    raise SpliceError("token_type marks image positions but the batch has no pixel_values")
                # token_type present = a processor batch (training step or generate's prefill);
                # decode steps never carry it, so they stay text-only. The dummy vision pass runs
                # before the embedding lookup, in the image path's order (_embed): under ZeRO-3 every
                # rank gathers parameters module by module, and a different order on a text-only rank
                # is a collective mismatch (gloo: "Received data size doesn't match expected size").
                zero = None
                if token_type is not None and self.config.vision_dummy_for_text_only:
                    zero = self._dummy_vision(input_ids.device)
                inputs_embeds = self.get_input_embeddings()(input_ids)
                if zero is not None:
                    inputs_embeds = inputs_embeds + zero.to(inputs_embeds.dtype)
        if labels is not None:
            return self._training_forward(inputs_embeds, attention_mask, position_ids, labels, expert_out, **kwargs)
        out = super().forward(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return AnomalyOVCausalLMOutput(
            **out,
            expert_scores=None if expert_out is None else expert_out.scores,
            expert_logits=None if expert_out is None else expert_out.logits,
        )

    def _training_forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                          labels: Tensor, expert_out: ExpertOutput | None, **kwargs) -> AnomalyOVCausalLMOutput:
        """With labels: the loss from the LM head on labelled positions only (loss.py); no logits
        are returned (call without labels for them)."""
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False, **kwargs)[0]
        return AnomalyOVCausalLMOutput(
            loss=label_positions_loss(hidden, labels, self.lm_head),
            expert_scores=None if expert_out is None else expert_out.scores,
            expert_logits=None if expert_out is None else expert_out.logits,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # The splice happens in the prefill; later steps only feed the new token through the cache.
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in _PREFILL_ONLY:
                inputs.pop(key, None)
        return inputs

    # ---------------------------------------------------------------- stages
    def stage_parameter_groups(self, stage: str | int, train_vision_tower: bool = False) -> dict[str, list[nn.Parameter]]:
        """Trainable parameter groups of a stage; sets requires_grad (everything else frozen).

        stage1: {"expert"}. stage2: {"projector" (projector + image_newline), "llm" (language model
        + LM head)}; the vision tower and the expert stay frozen.
        ``train_vision_tower`` adds a "vision_tower" group to stage 1: only for towers without
        pretrained weights (the random-init tiny preset of the demo), never for released SigLIP.
        """
        name = f"stage{stage}" if isinstance(stage, int) else str(stage)
        if name == "stage1":
            groups = {"expert": list(self.expert.parameters())}
            if train_vision_tower:
                # the layers the expert reads; the unused post-layernorm would get no gradient
                groups["vision_tower"] = [p for n, p in self.model.vision_tower.named_parameters()
                                          if "post_layernorm" not in n and ".head." not in n]
        elif name == "stage2":
            groups = {
                "projector": [*self.model.multi_modal_projector.parameters(), self.model.image_newline],
                "llm": [*self.model.language_model.parameters(), *self.lm_head.parameters()],
            }
        else:
            raise ValueError(f"stage_parameter_groups: unknown stage {stage!r} (expected 'stage1' or 'stage2')")
        seen: set[int] = set()
        for key, params in groups.items():  # tied weights (lm_head = embed_tokens) appear once
            groups[key] = [p for p in params if id(p) not in seen and not seen.add(id(p))]
        for p in self.parameters():
            p.requires_grad_(id(p) in seen)
        return groups


def _check_counts(token_type: Tensor, expected: dict[int, tuple[str, int, str]]) -> None:
    """Reserved positions per token type against what the images produced. One read-back of a
    few counts per forward (the only host sync of the splice on a GPU)."""
    reserved = torch.bincount(token_type.reshape(-1).long(), minlength=4).tolist()
    for kind, (positions, have, produced) in expected.items():
        if reserved[kind] != have:
            per_row = (token_type == kind).sum(dim=-1).tolist()
            raise SpliceError(f"batch reserves {reserved[kind]} {positions} (per row {per_row}) but the images "
                              f"produced {have} {produced}")
