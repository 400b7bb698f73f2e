"""`aov-export`: a consolidated HF-format model from a committed checkpoint.

    aov-export <step folder | run folder> [out dir] [--config-dir HF_DIR] [--overwrite]

Uses the checkpoint's hf/ export when present (copied); otherwise merges DeepSpeed's ZeRO-2/3
shards of every rank (ds/) into full fp32 weights (DeepSpeed's zero_to_fp32 reader, on one
machine, no process group) and saves them with the model's save_pretrained next to the processor.
The model is rebuilt from the checkpoint's own config.yaml (or from --config-dir, an HF folder
with the run's model config and processor). Default output: ``<step folder>/hf``, what the
evaluator loads. Local or s3:// checkpoints.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Optional

from aov_dist import storage
from aov_dist.model.partial import PARTIAL_FILE
from aov_dist.train import checkpoint as ckpt


def resolve_step(path: str) -> str:
    """A committed step folder: ``path`` itself, or the newest committed one of a run folder."""
    path = path.rstrip("/")
    if ckpt.step_of(path) is not None:
        if not ckpt.is_committed(path):
            raise FileNotFoundError(f"{path}: no {ckpt.COMMIT_MARKER} marker, not a complete checkpoint")
        return path
    parent, run = path.rsplit("/", 1) if "/" in path else (".", path)
    latest = ckpt.latest_committed(parent, run)
    if latest is None:
        raise FileNotFoundError(f"{path}: no committed step_<N> folder in it")
    return latest


def _copy_tree(src: str, dst: str) -> None:
    if not storage.is_remote(src) and not storage.is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="aov-export-") as tmp:
        local = _local_copy(src, "src", tmp)
        if storage.is_remote(dst):
            storage.copy_from_local(local, dst)
        else:
            shutil.copytree(local, dst, dirs_exist_ok=True)


def _local_copy(url: str, name: str, into: str) -> str:
    if not storage.is_remote(url):
        return url
    target = os.path.join(into, name)
    storage.copy_to_local(url, target)
    return target


def _build_model(step: str, config_dir: Optional[str]):
    from omegaconf import OmegaConf

    from aov_dist.config import to_typed
    from aov_dist.model import ModelConfig, build_model
    from aov_dist.train.tasks import make_task

    if config_dir is not None:  # a complete HF folder: what the shards lack comes from it
        model, processor = build_model(ModelConfig(pretrained_path=config_dir))
        return model, processor, None
    if not storage.exists(f"{step}/{ckpt.CONFIG_FILE}"):
        raise FileNotFoundError(f"{step} has neither hf/ nor {ckpt.CONFIG_FILE}: pass --config-dir with the "
                                "run's model config and processor")
    cfg = to_typed(OmegaConf.create(storage.read_bytes(f"{step}/{ckpt.CONFIG_FILE}").decode()))
    model, processor = make_task(cfg.stage.name).build_model(cfg)
    trained = {id(p) for group in model.stage_parameter_groups(
        cfg.stage.name, train_vision_tower="vision_tower" in cfg.stage.lr).values() for p in group}
    return model, processor, {n for n, p in model.named_parameters() if id(p) not in trained}


def merge_shards(step: str, out: str, config_dir: Optional[str] = None) -> str:
    """Every rank's ZeRO partitions -> one HF folder at ``out``. The shards hold the parameters the
    stage trained; the frozen ones are not saved there and come from the model rebuilt as the job
    built it (its config's sources: the pretrained folder, ``stage.init_from``, a seeded init)."""
    from aov_dist.train.strategy import DeepSpeedStrategy

    with tempfile.TemporaryDirectory(prefix="aov-export-") as tmp:
        state = DeepSpeedStrategy.state_dict_from_shards(_local_copy(f"{step}/ds", "ds", tmp))
        model, processor, frozen = _build_model(step, config_dir)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _is_tied(model, k)  # tied weights are stored once
                   and frozen is not None and k not in frozen]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {step} does not match the model built from its config: "
                               f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        _save_hf(model, processor, out, tmp)
    return out


def export(step: str, out: Optional[str] = None, config_dir: Optional[str] = None, from_shards: bool = False) -> str:
    """Write model + processor of committed ``step`` to ``out`` (default ``<step>/hf``); returns it."""
    hf = f"{step}/{ckpt.HF_DIR}"
    out = out or hf
    if not from_shards and storage.exists(f"{hf}/{PARTIAL_FILE}"):
        if out.rstrip("/") == hf:
            raise ValueError(f"{hf} holds only the weights its stage trained: give another output folder for the "
                             "complete model")
        return _complete(hf, out)
    if not from_shards and storage.exists(f"{hf}/config.json"):
        if out.rstrip("/") != hf:
            _copy_tree(hf, out)
        return out
    return merge_shards(step, out, config_dir)


def _complete(hf: str, out: str) -> str:
    """A complete HF folder from a partial one: its base with the trained weights, saved whole."""
    from aov_dist.model import ModelConfig, build_model

    with tempfile.TemporaryDirectory(prefix="aov-export-") as tmp:
        model, processor = build_model(ModelConfig(pretrained_path=_local_copy(hf, "hf", tmp)))
        _save_hf(model, processor, out, tmp)
    return out


def _is_tied(model, key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    ptr = params[key].data_ptr()
    return any(other != key and p.data_ptr() == ptr for other, p in params.items())


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="aov-export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a committed step folder, or a run folder (its newest committed step)")
    p.add_argument("out", nargs="?", default=None, help="output folder (default: <step folder>/hf)")
    p.add_argument("--config-dir", default=None,
                   help="HF folder whose config/processor to use when the checkpoint has no config.yaml")
    p.add_argument("--from-shards", action="store_true", help="merge the ZeRO shards even when hf/ exists")
    args = p.parse_args(argv)
    try:
        step = resolve_step(args.checkpoint)
        print(f"exported {step} -> {export(step, args.out, args.config_dir, args.from_shards)}")
    except (FileNotFoundError, RuntimeError) as e:
        print(f"aov-export: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    cli(sys.argv[1:])


def _save_hf(model, processor, out: str, tmp: str) -> None:
    """Model + processor as an HF folder at ``out`` (staged in ``tmp`` when ``out`` is remote)."""
    local_out = os.path.join(tmp, "hf-out") if storage.is_remote(out) else out
    model.save_pretrained(local_out, safe_serialization=True)
    processor.save_pretrained(local_out)
    if storage.is_remote(out):
        storage.copy_from_local(local_out, out)
