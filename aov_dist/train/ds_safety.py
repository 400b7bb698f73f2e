"""Safe loading of DeepSpeed checkpoint files: an allowlisted weights_only unpickler, the checkpoint
engine that uses it, and a check for readers outside the engine."""
from __future__ import annotations

import functools
import glob
import os
import pickle
from typing import Any

import torch

# DeepSpeed's TorchCheckpointEngine.load unpickles with torch.load(weights_only=False): a ds/ file
# planted in checkpoint storage would run code in the next resume. Our engine loads with
# weights_only=True and allows, besides tensors and containers, only the few DeepSpeed types its
# ZeRO-2/3 states hold (found by saving real checkpoints of both stages). fp32 and bf16 keep a static
# LossScaler; fp16's DynamicLossScaler is left out because our config refuses fp16.


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object outside the allowlist: refused, nothing was run."""


def ds_checkpoint_globals() -> list[type]:
    """The non-tensor types DeepSpeed pickles into our ZeRO-2 / ZeRO-3 checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # optimizer state: 'loss_scaler'
    from deepspeed.runtime.zero.config import ZeroStageEnum  # optimizer state: 'zero_stage'
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-2: param slice table

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location: Any = None) -> Any:
    """torch.load of a DeepSpeed checkpoint file with weights_only=True and our allowlist."""
    try:
        with torch.serialization.safe_globals(ds_checkpoint_globals()):
            return torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as e:
        reason = str(e).split("Unsupported global: ")[-1].split(" was not an allowed global")[0]
        raise UnsafeCheckpointError(
            f"DeepSpeed checkpoint file {path}: refused to load, it pickles something other than tensors "
            f"and DeepSpeed's known state types ({reason.strip()[:200]}). Only load checkpoints written "
            f"by our jobs; see docs/reliability.md") from e


@functools.cache
def safe_checkpoint_engine_class() -> type:
    """DeepSpeed's torch checkpoint engine with a safe load (built lazily: importing DeepSpeed is slow)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    return SafeTorchCheckpointEngine


def install_safe_checkpoint_engine(engine) -> None:
    """Swap the engine's TorchCheckpointEngine for the safe subclass (same state, safe load).
    Any other engine kind (fast / decoupled writers, datastates) is refused: they were not checked."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if isinstance(current, safe_checkpoint_engine_class()):
        return
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed checkpoint engine {type(current).__name__}: only the torch engine is "
                           f"supported (its loads are made safe here); remove checkpoint writer settings")
    current.__class__ = safe_checkpoint_engine_class()  # keeps its config


def verify_ds_checkpoint(directory: str) -> list[str]:
    """Safe-load every file of a ds/ folder (raises UnsafeCheckpointError naming the first bad one).
    For readers outside the engine, e.g. DeepSpeed's zero_to_fp32 (it unpickles with
    weights_only=False): call this first on the same local folder. Returns the files checked."""
    files = sorted(glob.glob(os.path.join(directory, "**", "*.pt"), recursive=True))
    for f in files:
        safe_load(f, map_location="cpu")
    return files
