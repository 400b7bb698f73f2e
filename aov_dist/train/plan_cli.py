"""`aov-plan` / `python -m aov_dist.train.plan_cli`: the config side of the planner and its Hydra app.

    aov-plan <hydra overrides> [--json PATH] [--samples N] [--shards K]

The three options may also be given as Hydra overrides (``+plan.json=PATH +plan.samples=N
+plan.shards=K``), which is how ``aov-train ... +plan=true`` takes them. Exit code: 0 fits or
tight, 1 does not fit, 2 config error (``config error: <key>: ...`` on stderr).

Mandatory values: what a real run must still give (a ``???`` that survived composition, such as
the Anomaly-Instruct manifest; model.pretrained_path of an official preset without
``model.random_init`` or ``stage.init_from``; train.storage_path of a multi-node job that points at
a local path) gets a placeholder, so that the combination can be
validated, and is listed as "must be set before launching".
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ValidationError

from aov_dist import storage
from aov_dist.cluster.config import ClusterConfigError
from aov_dist.config import CONF_DIR, ConfigError, TrainJobConfig, register_configs, validate

PLACEHOLDER = "s3://aov-plan-placeholder/{key}"
_FLAGS = {"--json": "json", "--samples": "samples", "--shards": "shards"}


@dataclass
class PlanOptions:
    json_path: Optional[str] = None
    samples: int = 512  # records read from the shards
    shards: int = 16  # shards read per dataset (evenly spaced)

    @classmethod
    def from_node(cls, node: Any) -> Optional["PlanOptions"]:
        """``plan=true`` or ``plan={json: ..., samples: ..., shards: ...}``; None for ``plan=false``."""
        if not isinstance(node, (DictConfig, dict)):
            return cls() if node else None
        d = OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node)
        unknown = sorted(set(d) - {"json", "samples", "shards"})
        if unknown:
            raise ConfigError(f"plan.{unknown[0]}", "unknown plan option (json, samples, shards)")
        for key in ("samples", "shards"):
            if not isinstance(d.get(key, 1), int) or d.get(key, 1) < 1:
                raise ConfigError(f"plan.{key}", f"must be an integer >= 1, got {d[key]!r}")
        return cls(d.get("json"), d.get("samples", 512), d.get("shards", 16))


def fill_missing(cfg: DictConfig) -> dict[str, str]:
    """Give every missing mandatory value a placeholder (None where a string cannot go): {key: hint or ""}."""
    missing: dict[str, str] = {}

    def fill(node, k, key: str) -> None:
        if key == "model.pretrained_path" and cfg.model.get("random_init"):
            node[k] = None  # random weights need no directory (and exclude one)
            return
        missing[key] = ""
        value: Any = PLACEHOLDER.format(key=key)
        if key == "model.pretrained_path":
            missing[key] = "weights and Qwen2 tokenizer of the official presets; model.random_init=true for checks"
        try:
            node[k] = value
        except ValidationError:
            node[k] = None

    def walk(node, prefix: str) -> None:
        for k in range(len(node)) if isinstance(node, ListConfig) else list(node.keys()):
            key = f"{prefix}[{k}]" if isinstance(node, ListConfig) else f"{prefix}.{k}" if prefix else str(k)
            child = node._get_node(k)
            if OmegaConf.is_missing(node, k):
                fill(node, k, key)
            elif isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
                walk(child, key)

    walk(cfg, "")
    cl, storage_path = cfg.cluster, cfg.train.get("storage_path")
    if cl.nodes > 1 and not cl.get("shared_filesystem") and not storage.is_remote(str(storage_path or "")):
        missing["train.storage_path"] = "storage every node reaches (s3://bucket/prefix)"
        cfg.train.storage_path = PLACEHOLDER.format(key="train.storage_path")
    m = cfg.model  # the rule of config.validate: an official preset loads its weights from a directory
    if m.get("preset") != "tiny" and not (m.get("random_init") or m.get("pretrained_path")
                                          or cfg.stage.get("init_from")):
        fill(m, "pretrained_path", "model.pretrained_path")
    return missing


def prepare(cfg: DictConfig) -> tuple[TrainJobConfig, dict[str, str]]:
    """Typed config validated without the path checks, and the missing mandatory keys."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("plan", None)
        cfg.pop("hydra", None)
    missing = fill_missing(cfg)
    return validate(cfg, check_paths=False), missing


def main(cfg: DictConfig, options: Optional[PlanOptions] = None) -> int:
    """Plan ``cfg`` (composed), print it, write the JSON; returns the exit code."""
    from aov_dist.train.plan import final_line, plan_job, render

    try:
        if options is None:
            options = PlanOptions.from_node(cfg.get("plan", True)) or PlanOptions()
        c, missing = prepare(cfg)
        plan = plan_job(c, missing, options)
    except ClusterConfigError as e:  # ConfigError is one too; the message starts with the key
        print(f"config error: {e}", file=sys.stderr)
        return 2
    render(plan)
    if options.json_path:
        with open(options.json_path, "w") as f:
            json.dump(plan, f, indent=2)
    print(final_line(plan))
    return plan["exit_code"]


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra arguments, ``+plan.<key>=<value>`` overrides made from --json/--samples/--shards)."""
    rest, overrides = [], []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name not in _FLAGS:
            rest.append(arg)
            continue
        if not eq:
            value = next(it, None)
            if value is None:
                raise SystemExit(f"aov-plan: {name} needs a value")
        overrides.append(f"+plan.{_FLAGS[name]}={value}")
    return rest, overrides


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    raise SystemExit(main(cfg))


def cli() -> None:
    logging.basicConfig(level=os.environ.get("AOV_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    register_configs()
    rest, overrides = split_flags(sys.argv[1:])
    sys.argv = [sys.argv[0], *rest, *overrides]
    _app()


if __name__ == "__main__":
    cli()
