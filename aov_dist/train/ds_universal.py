"""Resharding a ZeRO checkpoint for another number of workers with DeepSpeed's Universal Checkpointing.

Why DeepSpeed's own conversion rather than ours: ``ds_to_universal`` already knows how ZeRO lays out
the flat fp32 partitions and the Adam moments of every rank (padding, uneven splits such as 4 -> 3,
parameter groups), and the engine's ``load_universal`` path re-partitions them for the new world on
load. Its ZeRO-3 support is data-parallel only, which is all we run. What we add: the input is
safe-loaded first (the converter unpickles with ``weights_only=False``), the output is written to a
node-local folder we create, never read back from checkpoint storage, and the conversion runs in the
calling process (no process pool inside a Ray worker).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging

from aov_dist.train.ds_safety import verify_ds_checkpoint

log = logging.getLogger(__name__)


def convert_to_universal(ds_state_dir: str, out_dir: str) -> None:
    """Write the universal form of the ZeRO files in ``ds_state_dir`` (one ``ds/<tag>`` folder of any
    world size) to ``out_dir`` (a new folder; DeepSpeed also writes ``latest_universal`` beside it)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    verify_ds_checkpoint(ds_state_dir)
    args = argparse.Namespace(input_folder=ds_state_dir, output_folder=out_dir, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    # the converter prints its progress (and tqdm bars) to stdout: keep it out of the job's console
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        ds_to_universal(args)
    log.info("converted %s to a universal checkpoint in %s", ds_state_dir, out_dir)
