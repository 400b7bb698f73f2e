"""AnomalyOVProcessor: raw samples -> tensors of the model batch (architecture.md §3), and the collator.

transformers' LlavaOnevisionProcessor cannot be built without torchvision (its video processor),
so this pairs the PIL image processor (`LlavaOnevisionImageProcessorPil`, the same AnyRes crops)
with the tokenizer and lays the sequence out itself. All positions the model fills at forward
time are reserved here, so lengths are known before the model runs:
  <visual: token_type 1> "with" <adverb slot: 2> " suspicious features: " <anomaly tokens: 3>
Reserved positions hold the pad id; every position of an image block has label -100.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from aov_dist.storage import localize
from .layout import SINGLE_VIEW, VisionLayout, crop_grid, num_anomaly_tokens, num_views, num_visual_tokens
from .loss import IGNORE_INDEX
from .tokenizer import ADVERBS, DEFAULT_SYSTEM_PROMPT, adverb_token_ids

IMAGE_PLACEHOLDER = "<image>"
SETTINGS_FILE = "aov_processor.json"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ImageTokensExceedMaxLength(ValueError):
    """The image blocks of a sample alone do not fit in max_length (the loader drops and counts it)."""

    def __init__(self, sample_id: str | None, needed: int, max_length: int):
        super().__init__(
            f"sample {sample_id!r}: its image tokens end at position {needed}, beyond max_length={max_length}; "
            "truncation never cuts through image tokens"
        )
        self.sample_id, self.needed, self.max_length = sample_id, needed, max_length


class EncodedImages(NamedTuple):
    pixel_values: torch.Tensor  # [V, 3, S, S]
    image_grids: torch.Tensor  # [I, 2] long, (0, 0) = single view
    image_sizes: torch.Tensor  # [I, 2] long, original (height, width)


# What the token layout of one image depends on: (crop grid (rows, cols), height, width).
ImageLayout = tuple[tuple[int, int], int, int]


def _image_layouts(enc: EncodedImages) -> list[ImageLayout]:
    return [((int(r), int(c)), int(h), int(w)) for (r, c), (h, w) in zip(enc.image_grids.tolist(), enc.image_sizes.tolist())]


class AnomalyOVProcessor:
    def __init__(
        self,
        tokenizer,
        image_processor: LlavaOnevisionImageProcessorPil,
        layout: VisionLayout,
        adverbs: Sequence[str] = ADVERBS,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ):
        self.tokenizer, self.image_processor, self.layout = tokenizer, image_processor, layout
        self.adverbs, self.system_prompt = tuple(adverbs), system_prompt
        self.adverb_token_ids = adverb_token_ids(tokenizer, self.adverbs)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token (reserved positions hold it)")
        self.pad_id = int(tokenizer.pad_token_id)
        self._prefix, self._suffix = self._inserted_text_pieces()
        if image_processor.size["height"] != layout.image_size or image_processor.size["width"] != layout.image_size:
            raise ValueError(f"image processor size {image_processor.size} != layout image_size {layout.image_size}")

    def _inserted_text_pieces(self) -> tuple[list[int], list[int]]:
        """Token ids before and after the adverb in "with <adv> suspicious features: ", checked to be
        the same for every adverb (so the slot can be filled after tokenization)."""
        encodings = [self._encode_text(f"with {a} suspicious features: ") for a in self.adverbs]
        for adverb, ids, adv_id in zip(self.adverbs, encodings, self.adverb_token_ids):
            slots = [i for i, t in enumerate(ids) if t == adv_id]
            same = len(ids) == len(encodings[0]) and len(slots) == 1
            if not same or ids[: slots[0]] + ids[slots[0] + 1 :] != encodings[0][: slots[0]] + encodings[0][slots[0] + 1 :]:
                raise ValueError(f"tokenizer: the spliced text around adverb {adverb!r} is not context-free: {encodings}")
        slot = encodings[0].index(self.adverb_token_ids[0])
        return encodings[0][:slot], encodings[0][slot + 1 :]

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---------------------------------------------------------------- images
    def encode_images(self, images: Sequence[Image.Image]) -> EncodedImages:
        """One image -> AnyRes (base view + crops); several (a multi-view sample) -> one view each."""
        s = self.layout.image_size
        if not images:
            empty = torch.zeros(0, 2, dtype=torch.long)
            return EncodedImages(torch.zeros(0, 3, s, s), empty, empty.clone())
        multi = len(images) > 1
        # Nested list = one sample of several images: the image processor then pads each to a square
        # and makes a single view, as transformers does for multi-image prompts.
        out = self.image_processor.preprocess([list(images)] if multi else list(images), do_pad=False, return_tensors=None)
        sizes = [tuple(int(x) for x in hw) for hw in out["image_sizes"]]
        grids = self.image_grids(sizes)
        for i, (views, grid) in enumerate(zip(out["pixel_values"], grids)):
            if len(views) != num_views(grid):  # the image processor and our layout must agree
                raise RuntimeError(f"image {i} ({sizes[i]}): image processor made {len(views)} views, layout expects grid {grid}")
        pixels = torch.cat([torch.as_tensor(v) for v in out["pixel_values"]], dim=0).float()
        return EncodedImages(pixels, torch.tensor(grids, dtype=torch.long), torch.tensor(sizes, dtype=torch.long))

    def image_grids(self, image_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Crop grid per image of one sample, from (height, width): AnyRes for a single image, one
        view each (SINGLE_VIEW) for the images of a multi-view sample."""
        multi = len(image_sizes) > 1
        return [SINGLE_VIEW if multi else crop_grid(self.layout, int(h), int(w)) for h, w in image_sizes]

    def encode_expert_sample(self, images: Sequence[Image.Image], label: int) -> dict[str, torch.Tensor]:
        """Stage 1: images and their label only (no text)."""
        enc = self.encode_images(images)
        return {**enc._asdict(), "image_labels": torch.full((len(images),), float(label))}

    def image_block_length(self, grid: tuple[int, int], height: int, width: int) -> int:
        return (
            num_visual_tokens(self.layout, grid, height, width)
            + len(self._prefix) + 1 + len(self._suffix)
            + num_anomaly_tokens(grid, self.layout.pool)
        )

    # ------------------------------------------------------------------ text
    def encode_conversation(
        self,
        images: Sequence[Image.Image],
        conversations: Sequence[dict[str, str]],
        max_length: int,
        label: int | None = None,
        sample_id: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """A training sample: Qwen chat format, labels on assistant turns (content + <|im_end|>)."""
        enc = self.encode_images(images)
        ids, labels, types, image_end = self._layout_turns(_image_layouts(enc), conversations, sample_id, generation_prompt=False)
        if image_end > max_length:
            raise ImageTokensExceedMaxLength(sample_id, image_end, max_length)
        out = {
            "input_ids": torch.tensor(ids[:max_length], dtype=torch.long),
            "labels": torch.tensor(labels[:max_length], dtype=torch.long),
            "token_type": torch.tensor(types[:max_length], dtype=torch.int8),
            **enc._asdict(),
        }
        if label is not None:
            out["image_labels"] = torch.full((len(images),), float(label))
        return out

    def encode_prompt(self, images: Sequence[Image.Image], messages: Sequence[dict[str, str]]) -> dict[str, torch.Tensor]:
        """A generation prompt: the messages then "<|im_start|>assistant\\n" (no labels)."""
        enc = self.encode_images(images)
        ids, _, types, _ = self._layout_turns(_image_layouts(enc), messages, None, generation_prompt=True)
        return {"input_ids": torch.tensor(ids), "token_type": torch.tensor(types, dtype=torch.int8), **enc._asdict()}

    def count_tokens(self, image_sizes: Sequence[tuple[int, int]], conversations: Sequence[dict[str, str]]) -> int:
        """Length of ``encode_conversation(images, conversations, max_length=inf)["input_ids"]`` from
        the images' (height, width) alone: no pixel is decoded or resized (a planner reads only the
        image headers). The same layout code as encode_conversation, so the counts cannot drift."""
        return self.count_tokens_and_labels(image_sizes, conversations)[0]

    def count_tokens_and_labels(self, image_sizes: Sequence[tuple[int, int]],
                                conversations: Sequence[dict[str, str]]) -> tuple[int, int]:
        """(tokens, labelled tokens) of a sample, from the images' sizes alone (see count_tokens):
        the LM head of a training forward runs on the labelled positions only (model/loss.py)."""
        layouts = [(grid, int(h), int(w)) for grid, (h, w) in zip(self.image_grids(image_sizes), image_sizes)]
        ids, labels, _, _ = self._layout_turns(layouts, conversations, None, generation_prompt=False)
        return len(ids), sum(label != IGNORE_INDEX for label in labels)

    def _layout_turns(self, images: Sequence[ImageLayout], turns, sample_id, generation_prompt: bool):
        """Token ids, labels and token types of a conversation; ``images`` holds per image its
        (crop grid, height, width), which is all the layout depends on."""
        ids: list[int] = []
        labels: list[int] = []
        types: list[int] = []

        def put(tokens: list[int], train: bool = False, kind: int = 0) -> None:
            ids.extend(tokens)
            labels.extend(tokens if train else [IGNORE_INDEX] * len(tokens))
            types.extend([kind] * len(tokens))

        turns = [_normalise_turn(t, i, sample_id) for i, t in enumerate(turns)]
        if not turns or turns[0][0] != "system":
            turns.insert(0, ("system", self.system_prompt))
        n_images = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
        if n_images != len(images):
            raise ValueError(f"sample {sample_id!r}: {n_images} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
        image, image_end = 0, 0
        for role, text in turns:
            put(self._encode_text(f"<|im_start|>{role}\n"))
            if role == "assistant":
                put(self._encode_text(text + "<|im_end|>"), train=True)
                put(self._encode_text("\n"))
                continue
            pieces = text.split(IMAGE_PLACEHOLDER) if role == "user" else [text]
            for k, piece in enumerate(pieces):
                if k > 0:
                    self._put_image(put, *images[image])
                    image, image_end = image + 1, len(ids)
                if piece:
                    put(self._encode_text(piece))
            put(self._encode_text("<|im_end|>\n"))
        if generation_prompt:
            put(self._encode_text("<|im_start|>assistant\n"))
        return ids, labels, types, image_end

    def _put_image(self, put, grid: tuple[int, int], height: int, width: int) -> None:
        pad = self.pad_id
        put([pad] * num_visual_tokens(self.layout, grid, height, width), kind=1)
        put(self._prefix)
        put([pad], kind=2)
        put(self._suffix)
        put([pad] * num_anomaly_tokens(grid, self.layout.pool), kind=3)

    # --------------------------------------------------------------- collate
    def collate(self, encoded: Sequence[dict[str, torch.Tensor]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad text keys to the longest sample; concatenate the image keys in sample order."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not encoded:
            raise ValueError("collate: empty list")
        keys = set(encoded[0])
        for i, item in enumerate(encoded):
            if set(item) != keys:
                raise ValueError(f"collate: sample {i} has keys {sorted(item)}, sample 0 has {sorted(keys)}")
        batch: dict[str, torch.Tensor] = {}
        if "input_ids" in keys:
            length = max(len(item["input_ids"]) for item in encoded)
            fills = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "token_type": 0}
            for key, fill in fills.items():
                if key in keys:
                    batch[key] = torch.stack([_pad(item[key], length, fill, padding_side) for item in encoded])
            ones = [torch.ones(len(item["input_ids"]), dtype=torch.long) for item in encoded]
            batch["attention_mask"] = torch.stack([_pad(o, length, 0, padding_side) for o in ones])
        for key in ("pixel_values", "image_grids", "image_sizes", "image_labels"):
            if key in keys:
                batch[key] = torch.cat([item[key] for item in encoded], dim=0)
        return batch

    def collate_packed(self, encoded: Sequence[dict[str, torch.Tensor]], max_length: int,
                       one_row: bool = False) -> dict[str, torch.Tensor]:
        """Samples laid end to end (data/packing.py decides the rows): ``position_ids`` restart at 0
        for every sample and for the padding at the end of a row, which is how transformers tells
        samples apart (a block-diagonal mask under SDPA, varlen FlashAttention-2 in one row); no
        ``attention_mask``. The first label of every sample is -100 (nothing predicts it across a
        boundary). Images follow the samples' order in the rows, so each sample's splice is its
        own. ``sample_lengths`` lists the samples' tokens in that order (for counting).
        ``one_row``: every sample in one row, no padding (what FlashAttention-2 needs)."""
        from aov_dist.data.packing import pack_rows

        if not encoded:
            raise ValueError("collate_packed: empty list")
        lengths = [len(item["input_ids"]) for item in encoded]
        rows = [list(range(len(encoded)))] if one_row else pack_rows(lengths, max_length)
        width = max(sum(lengths[i] for i in row) for row in rows)
        fills = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "token_type": 0}
        batch: dict[str, list] = {key: [] for key in (*fills, "position_ids")}
        for row in rows:
            parts: dict[str, list[torch.Tensor]] = {key: [] for key in batch}
            for i in row:
                for key in fills:
                    parts[key].append(encoded[i][key])
                parts["labels"][-1] = parts["labels"][-1].clone()
                parts["labels"][-1][0] = IGNORE_INDEX
                parts["position_ids"].append(torch.arange(lengths[i]))
            pad = width - sum(lengths[i] for i in row)
            if pad:
                for key, fill in fills.items():
                    parts[key].append(torch.full((pad,), fill, dtype=encoded[row[0]][key].dtype))
                parts["position_ids"].append(torch.arange(pad))
            for key in batch:
                batch[key].append(torch.cat(parts[key]))
        out = {key: torch.stack(rows_) for key, rows_ in batch.items()}
        order = [i for row in rows for i in row]
        for key in ("pixel_values", "image_grids", "image_sizes", "image_labels"):
            if key in encoded[0]:
                out[key] = torch.cat([encoded[i][key] for i in order], dim=0)
        out["sample_lengths"] = torch.tensor([lengths[i] for i in order], dtype=torch.long)
        return out

    # ------------------------------------------------------------- save/load
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        settings = {
            "image_size": self.layout.image_size,
            "patch_size": self.layout.patch_size,
            "grid_pinpoints": [list(p) for p in self.layout.grid_pinpoints],
            "vision_aspect_ratio": self.layout.vision_aspect_ratio,
            "pool": self.layout.pool,
            "adverbs": list(self.adverbs),
            "system_prompt": self.system_prompt,
        }
        (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "AnomalyOVProcessor":
        """Our saved processor, or a stock LLaVA-OneVision HF directory (layout read from config.json)."""
        local = localize(directory)
        tokenizer = AutoTokenizer.from_pretrained(local)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(local)
        settings_file = local / SETTINGS_FILE
        if settings_file.exists():
            s = json.loads(settings_file.read_text())
            layout = VisionLayout(
                s["image_size"], s["patch_size"], tuple(tuple(p) for p in s["grid_pinpoints"]), s["vision_aspect_ratio"], s["pool"]
            )
            return cls(tokenizer, image_processor, layout, s["adverbs"], s["system_prompt"])
        config_file = local / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{directory}: neither {SETTINGS_FILE} nor config.json found")
        return cls(tokenizer, image_processor, layout_from_hf_config(json.loads(config_file.read_text())))


def layout_from_hf_config(config: dict[str, Any] | Any) -> VisionLayout:
    """VisionLayout from a LLaVA-OneVision / Anomaly-OV config (object or config.json dict)."""
    get = (lambda o, k, d=None: o.get(k, d)) if isinstance(config, dict) else (lambda o, k, d=None: getattr(o, k, d))
    vision = get(config, "vision_config")
    pinpoints = get(config, "image_grid_pinpoints")
    if pinpoints is None:
        raise ValueError("config has no image_grid_pinpoints")
    return VisionLayout(
        image_size=int(get(vision, "image_size", 384)),
        patch_size=int(get(vision, "patch_size", 14)),
        grid_pinpoints=tuple(tuple(int(x) for x in p) for p in pinpoints),
        vision_aspect_ratio=get(config, "vision_aspect_ratio", "anyres_max_9"),
        pool=int(get(config, "expert_pool", 2)),
    )


def _normalise_turn(turn: dict[str, str], index: int, sample_id) -> tuple[str, str]:
    """LLaVA {"from", "value"} or chat {"role", "content"} -> (qwen role, text)."""
    who = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if who not in _ROLES or not isinstance(text, str):
        raise ValueError(f"sample {sample_id!r}: turn {index} must have from/role in {sorted(_ROLES)} and a string value, got {turn!r}")
    return _ROLES[who], text


def _pad(x: torch.Tensor, length: int, fill: int, side: str) -> torch.Tensor:
    pad = x.new_full((length - len(x),), fill)
    return torch.cat([x, pad] if side == "right" else [pad, x])
