"""The training config: Hydra composition against the typed schema, and validation that names the
key and starts nothing (no Ray, no MLflow run) when the config cannot work."""
from __future__ import annotations

import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from aov_dist.config import ConfigError, micro_steps_per_step, validate
from train_harness import compose_cfg


def _job(tmp_path, *overrides: str):
    """The composed job with ``overrides`` on a stand-in manifest, storage and MLflow store under
    ``tmp_path``."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    base = [f"data.datasets.0.manifest={manifest}", f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    return compose_cfg(base + list(overrides))


def test_defaults_compose_and_validate(tmp_path):
    c = validate(_job(tmp_path))
    assert (c.stage.name, c.deepspeed.zero_stage, c.cluster.num_workers) == ("stage1", 3, 2)
    assert c.train.run_name == "aov-tiny-stage1"  # interpolated from the stage
    assert c.stage.lr == {"expert": 1e-4} and c.stage.schedule == "cosine_restarts"
    # 128 = 2 workers x micro 2 x 32 accumulation steps
    assert micro_steps_per_step(c) == 32


def test_stage2_group_has_its_own_schedule(tmp_path):
    c = validate(_job(tmp_path, "stage=stage2", "stage.require_init=false", "deepspeed=zero2"))
    assert c.stage.lr == {"projector": 1e-5, "llm": 1e-5}
    assert (c.stage.schedule, c.stage.warmup_ratio, c.deepspeed.zero_stage) == ("warmup_cosine", 0.03, 2)


@pytest.mark.parametrize("overrides, key, words", [
    (["stage.global_batch_size=6"], "stage.global_batch_size", "not divisible by workers x micro batch = 2 x 2 = 4"),
    (["deepspeed.zero_stage=1"], "deepspeed.zero_stage", "must be 2 or 3"),
    (["stage=stage2"], "stage.init_from", "stage2 needs trained expert weights"),
    (["train.resume_from=/nonexistent/run/step_5"], "train.resume_from", "not a committed checkpoint"),
    (["cluster.nodes=2"], "train.storage_path", "node-local path but cluster.nodes=2"),
    (["+stage.lr.llm=1e-5"], "stage.lr", "stage1 trains the groups ['expert']"),
    (["deepspeed.precision=bf16"], "deepspeed.precision", "needs GPUs"),
    (["stage.init_from=/nonexistent/expert.pth", "stage=stage2"], "stage.init_from", "does not exist"),
    (["cluster.backend=nccl"], "cluster.backend", "nccl needs GPUs"),
    (["data.packing=true"], "data.packing", "stage1 has no text to pack"),
    (["train.step_timeout_s=0"], "train.step_timeout_s", "must be > 0 seconds"),
])
def test_impossible_configs_name_the_key(tmp_path, overrides, key, words):
    with pytest.raises(ConfigError) as e:
        validate(_job(tmp_path, *overrides))
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ") and words in str(e.value)


def test_missing_manifest_names_the_dataset_key(tmp_path):
    cfg = _job(tmp_path, f"data.datasets.0.manifest={tmp_path / 'nope.json'}")
    with pytest.raises(ConfigError, match=r"^data.datasets\[0\].manifest: .*nope.json' does not exist"):
        validate(cfg)


def test_unknown_key_and_wrong_type_fail_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException, match="stage.lr_typo"):
        _job(tmp_path, "stage.lr_typo=1")
    # a forced '+' addition gets past Hydra, not past the schema check
    with pytest.raises(ConfigError) as e:
        validate(_job(tmp_path, "+stage.lr_typo=1"))
    assert e.value.key == "stage.lr_typo"
    with pytest.raises(ConfigCompositionException) as e:
        _job(tmp_path, "stage.global_batch_size=many")
    assert "stage.global_batch_size" in str(e.value.__cause__ or e.value)


def test_unknown_key_and_wrong_type_from_python_name_the_key(tmp_path):
    cfg = OmegaConf.to_container(_job(tmp_path), resolve=True)
    cfg["train"]["checkpoint_every"] = 5
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == "train.checkpoint_every"
    cfg = OmegaConf.to_container(_job(tmp_path), resolve=True)
    cfg["deepspeed"]["zero_stage"] = "three"
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == "deepspeed.zero_stage"


def test_main_rejects_before_starting_ray_or_mlflow(tmp_path):
    """The driver validates first: a bad config leaves no Ray instance and no tracking store."""
    ray = pytest.importorskip("ray")
    from aov_dist.train.driver import main

    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match="^stage.global_batch_size"):
        main(_job(tmp_path, "stage.global_batch_size=6"))
    assert not ray.is_initialized()
    assert not os.path.exists(tmp_path / "mlflow.db")
    assert not os.path.exists(tmp_path / "runs")


def test_cli_reports_config_error_with_exit_code_2(tmp_path, monkeypatch, capsys):
    import sys

    from aov_dist.train.__main__ import cli

    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "m.json"
    manifest.write_text("{}")
    monkeypatch.setattr(sys, "argv", ["aov-train", f"data.datasets.0.manifest={manifest}", "deepspeed.zero_stage=1"])
    with pytest.raises(SystemExit) as e:
        cli()
    assert e.value.code == 2
    assert "config error: deepspeed.zero_stage: must be 2 or 3" in capsys.readouterr().err
    # Hydra stayed inert: no outputs/ or .hydra folder, no log file, same working directory
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_tracking_presets(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.aov.svc:5000")
    cfg = compose_cfg(["tracking=server"])
    assert (cfg.tracking.uri, cfg.tracking.artifact_location) == ("http://mlflow.aov.svc:5000", None)
    assert validate(_job(tmp_path, "tracking=off")).tracking.enabled is False


@pytest.mark.parametrize("overrides, key, words", [
    (["model.dtype=bf16"], "model.dtype", "disagrees with the training precision 'fp32'"),
    (["model.random_init=true", "model.pretrained_path=/x"], "model.random_init", "exclude each other"),
    (["deepspeed=zero2", "deepspeed.offload_params=true"], "deepspeed.offload_params", "needs ZeRO-3"),
    (["data.max_skip_fraction=0.5", "data.fail_skip_fraction=0.1"], "data.max_skip_fraction",
     "max_skip_fraction <= fail_skip_fraction"),
    (["cluster.max_failures=-2"], "cluster.max_failures", "-1 (unlimited) or >= 0"),
    (["data.micro_batch_size=0"], "data.micro_batch_size", "must be >= 1"),
    (["train.storage_path=gs://bucket/runs"], "train.storage_path", "the scheme 'gs' is not supported"),
    (["stage=stage2", "stage.init_from=az://c/run/step_2"], "stage.init_from", "the scheme 'az' is not supported"),
    (["model=aov_0.5b"], "model.pretrained_path", "loads its weights and Qwen2 tokenizer"),
])
def test_gpu_era_settings_that_cannot_work_name_the_key(tmp_path, overrides, key, words):
    with pytest.raises(ConfigError) as e:
        validate(_job(tmp_path, *overrides))
    assert e.value.key == key and words in str(e.value)


def test_training_precision_is_bf16_on_gpu_clusters_and_fp32_on_cpu(tmp_path):
    from aov_dist.config import training_precision

    assert training_precision(validate(_job(tmp_path))) == "fp32"
    gpu = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(validate(_job(tmp_path))),
                                              {"cluster": {"use_gpu": True}}))
    assert training_precision(gpu) == "bf16"
    gpu.deepspeed.precision = "fp32"
    assert training_precision(gpu) == "fp32"


@pytest.mark.parametrize("preset, stage, configured, name", [
    ("tiny", "stage1", None, "aov-tiny-stage1"), ("aov_0.5b", "stage2", None, "aov-0.5b-stage2"),
    ("aov_7b", "stage1", None, "aov-7b-stage1"), ("aov_7b", "stage2", "team-model", "team-model"),
    ("aov_7b", "stage2", "", None)])
def test_the_registered_model_is_named_after_preset_and_stage(preset, stage, configured, name):
    from aov_dist.tracking.config import TrackingConfig, registered_model_name

    assert registered_model_name(TrackingConfig(registered_model_name=configured), preset, stage) == name


def test_a_manifest_the_data_group_marks_mandatory_is_named_when_missing():
    with pytest.raises(ConfigError, match=r"^data.datasets\[0\].manifest: must be set"):
        validate(compose_cfg(["data=anomaly_instruct"]))
