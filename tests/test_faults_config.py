"""Bad configs and inputs: one clear error naming the key, raised by the driver before any Ray
resource (or MLflow run, or checkpoint folder) is taken."""
from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from aov_dist.config import ConfigError
from train_harness import compose_cfg, tiny_overrides


def _container(manifest, tmp_path, extra=()):
    cfg = compose_cfg(tiny_overrides(manifest, tmp_path / "runs", run_name="bad", tracking=True,
                                     extra=[f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra]))
    return OmegaConf.to_container(cfg, resolve=True)


def _set(d: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    for k in path:
        d = d[k]
    d[last] = value


CASES = [
    # (key to set, bad value, key named in the error, words in the error)
    ("stage.max_steps", "ten", "stage.max_steps", "ten"),                      # wrong type
    ("data.micro_batch_size", 1.5, "data.micro_batch_size", ""),               # wrong type
    ("train.bogus_option", 1, "train.bogus_option", ""),                       # unknown key
    ("stage.lr", {"expert": 1e-4, "llm": 1e-5}, "stage.lr", "trains the groups"),
    ("data.on_error", "ignore", "data.on_error", "skip"),
    ("model.expert_path", "/nonexistent/expert.pth", "model.expert_path", "does not exist"),
    ("stage.init_from", "/nonexistent/step_9", "stage.init_from", "does not exist"),
    ("train.resume_from", "/nonexistent/run/step_9", "train.resume_from", "not a committed checkpoint"),
]


@pytest.mark.parametrize("key,value,named,words", CASES, ids=[c[0] + "=" + str(c[1])[:12] for c in CASES])
def test_bad_config_is_one_error_before_any_resource(tmp_path, synthetic_shards, key, value, named, words):
    ray = pytest.importorskip("ray")
    from aov_dist.train.driver import main

    cfg = _container(synthetic_shards.manifest_path, tmp_path)
    _set(cfg, key, value)
    assert not ray.is_initialized()
    with pytest.raises(ConfigError) as e:
        main(cfg, show_progress=False)
    assert e.value.key == named and str(e.value).startswith(named + ":") and words in str(e.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_missing_manifest_names_the_dataset(tmp_path, synthetic_shards):
    from aov_dist.train.driver import main

    cfg = _container(synthetic_shards.manifest_path, tmp_path)
    cfg["data"]["datasets"][0]["manifest"] = str(tmp_path / "nowhere/manifest.json")
    with pytest.raises(ConfigError, match=r"^data.datasets\[0\].manifest: .*nowhere/manifest.json' does not exist"):
        main(cfg, show_progress=False)
    import ray

    assert not ray.is_initialized()


def test_resume_from_a_folder_without_marker_is_refused(tmp_path, synthetic_shards):
    from aov_dist.train.driver import main

    (tmp_path / "runs/bad/step_4/ds").mkdir(parents=True)
    cfg = _container(synthetic_shards.manifest_path, tmp_path)
    cfg["train"]["resume_from"] = str(tmp_path / "runs/bad/step_4")
    with pytest.raises(ConfigError, match=r"^train.resume_from: .*step_4' is not a committed checkpoint"):
        main(cfg, show_progress=False)
    assert os.listdir(tmp_path / "runs/bad") == ["step_4"] and not (tmp_path / "mlflow.db").exists()
