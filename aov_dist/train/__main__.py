"""`aov-train` / `python -m aov_dist.train`: the Hydra app around aov_dist.train.driver.main."""
from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, open_dict

from aov_dist.cluster.config import ClusterConfigError
from aov_dist.config import CONF_DIR, register_configs


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    if "plan" in cfg:  # +plan=true (or +plan.json=...): the pre-launch plan instead of training
        with open_dict(cfg):
            plan = cfg.pop("plan")
        from aov_dist.train.plan_cli import PlanOptions, main as plan_main

        try:
            options = PlanOptions.from_node(plan)
        except ClusterConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            raise SystemExit(2)
        if options is not None:
            raise SystemExit(plan_main(cfg, options))
    from aov_dist.train.driver import main

    try:
        result = main(cfg)
    except ClusterConfigError as e:  # ConfigError is one too: every config problem, one type
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"run {result.run_id}: {len(result.losses)} steps, final loss "
          f"{result.losses[-1] if result.losses else float('nan'):.4f}; checkpoints in {result.run_dir}"
          + (f"; model {result.registered_model}" if result.registered_model else ""))


def cli() -> None:
    logging.basicConfig(level=os.environ.get("AOV_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    register_configs()
    _app()


if __name__ == "__main__":
    cli()
