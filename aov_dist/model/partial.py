"""An HF-format folder that holds only the weights a training stage changed, on top of the base
model it names.

Stage 1 trains the 7 M-parameter anomaly expert (and, for the random-init tiny preset, its vision
tower) inside a model of up to 8 B parameters that stays as it was loaded. Its checkpoints'
``hf/`` therefore hold ``trained.safetensors`` (the trained parameters), the processor, the model's
``config.json`` and ``aov_partial.json``: the ``ModelConfig`` the base is built from (an HF folder
local or on s3://, or a preset's seeded random init) and the keys of the trained tensors.
``presets.build_model`` recognises such a folder under ``model.pretrained_path`` (evaluation,
``stage.init_from`` of stage 2, the registry's model) and builds base + trained weights;
``aov-export`` turns it into a complete HF folder.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

PARTIAL_FILE = "aov_partial.json"
WEIGHTS_FILE = "trained.safetensors"
FORMAT = 1


def is_partial(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(directory, PARTIAL_FILE))


def save_partial(directory: str, state: dict[str, torch.Tensor], processor: Any, config: Any, base: dict) -> None:
    """Write the trained tensors, the processor, the config and what the base is."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(directory)
    processor.save_pretrained(directory)
    with open(os.path.join(directory, PARTIAL_FILE), "w") as f:
        json.dump({"format": FORMAT, "base": base, "keys": sorted(tensors)}, f, indent=2)


def read_partial(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the base's ModelConfig fields, the trained tensors)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, PARTIAL_FILE)) as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise ValueError(f"{directory}/{PARTIAL_FILE}: format {info.get('format')!r}, expected {FORMAT}")
    state = load_file(os.path.join(directory, WEIGHTS_FILE))
    if sorted(state) != info["keys"]:
        raise ValueError(f"{directory}: {WEIGHTS_FILE} holds other tensors than {PARTIAL_FILE} lists")
    return info["base"], state
