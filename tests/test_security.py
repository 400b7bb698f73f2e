"""Security properties: no credential in params / config artifacts / checkpoints / manifests / logs;
weights are loaded only through safetensors or torch.load(weights_only=True); the registered
MLflow model holds no pickle; shard names cannot escape their folder; UIs bind to loopback."""
from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "aov_dist"
PLANTED = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYPLANTED"


def test_max_tokens_are_not_mistaken_for_secrets_but_keys_are():
    from aov_dist.config import TrainJobConfig
    from aov_dist.tracking.redact import MASK, flatten, redact

    flat = flatten(redact(OmegaConf.to_container(OmegaConf.structured(TrainJobConfig()))))
    assert flat["eval.judge.max_tokens"] == 256 and flat["eval.max_new_tokens"] == 64
    assert redact({"aws_secret_access_key": PLANTED, "judge": {"api_key": PLANTED, "api_key_env": "X"},
                   "AWS_SESSION_TOKEN": PLANTED}) == {
        "aws_secret_access_key": MASK, "judge": {"api_key": MASK, "api_key_env": "X"}, "AWS_SESSION_TOKEN": MASK}


def _planted_container() -> dict:
    from aov_dist.config import TrainJobConfig

    c = OmegaConf.to_container(OmegaConf.structured(TrainJobConfig()))
    c["cluster"]["k8s"]["s3_secret"] = PLANTED  # a secret-looking key somebody filled in
    return c


def test_planted_secret_never_reaches_params_or_the_config_artifact(tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    from aov_dist.tracking.config import TrackingConfig
    from aov_dist.tracking.mlflow_tracker import create_run
    from aov_dist.tracking.redact import redact
    from aov_dist.tracking.run_info import compared_params

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)
    caplog.set_level(logging.DEBUG)
    container = _planted_container()
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"),
                         experiment="sec", system_metrics=False)
    # a param under a secret-looking key (a user's own addition) is masked as well
    params = {**compared_params(container), "cluster.k8s.s3_secret": PLANTED}
    run_id = create_run(cfg, "job", params, OmegaConf.to_yaml(OmegaConf.create(redact(container))))
    client = MlflowClient(cfg.uri)
    run = client.get_run(run_id)
    assert PLANTED not in repr(run.data.params) and PLANTED not in repr(run.data.tags)
    assert run.data.params["cluster.k8s.s3_secret"] == "***"
    assert run.data.params["stage.name"] == "stage1"
    text = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert PLANTED not in text and "max_tokens: 256" in text and "s3_secret: '***'" in text
    assert PLANTED not in caplog.text


def test_checkpoint_config_yaml_is_redacted(tmp_path):
    from aov_dist.config import to_typed
    from train_harness import job_cfg, save_checkpoint

    cfg = job_cfg(str(tmp_path))
    cfg.cluster.k8s.s3_secret = PLANTED
    path = save_checkpoint(cfg, 2)
    text = Path(path, "config.yaml").read_text()
    assert PLANTED not in text
    # still a valid job config (aov-export rebuilds the model from it)
    assert to_typed(OmegaConf.to_container(OmegaConf.create(text))).eval.judge.max_tokens == 256
    for f in Path(path).rglob("*"):
        if f.is_file():
            assert PLANTED.encode() not in f.read_bytes(), f


def test_s3_credentials_never_reach_the_manifest(synthetic_data, s3_bucket, monkeypatch, caplog):
    from aov_dist import storage
    from aov_dist.data.shards import write_shards

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)  # moto accepts any secret
    caplog.set_level(logging.DEBUG, logger="aov_dist")
    write_shards([str(synthetic_data.train_json)], f"{s3_bucket}/shards", image_root=str(synthetic_data.image_root),
                 shard_size_mb=0.5)
    manifest = storage.read_bytes(f"{s3_bucket}/shards/manifest.json")
    assert b'"shards"' in manifest and PLANTED.encode() not in manifest
    assert PLANTED not in caplog.text


# ---- only safe deserialisation in our code ----

_UNSAFE = [
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(?:import|from)\s+(?:cloudpickle|dill)\b|\b(?:cloudpickle|dill)\.loads?\("), "cloudpickle/dill"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"python_model\s*=\s*[A-Za-z_]\w*\("), "pyfunc python_model object (cloudpickled)"),
]


def test_no_unsafe_deserialisation_in_the_package():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in _UNSAFE:
                if pattern.search(code):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {what}: {line.strip()}")
    assert offenders == []


def test_the_grep_catches_what_it_should():
    bad = ["import cloudpickle", "torch.load(f)", "torch.load(p, map_location='cpu')", "pickle.loads(b)",
           "AutoModel.from_pretrained(p, trust_remote_code=True)", "log_model(python_model=Wrapper(), name='m')"]
    good = ["torch.load(f, weights_only=True, map_location='cpu')", "python_model=MODEL_CODE,"]
    assert all(any(p.search(b) for p, _ in _UNSAFE) for b in bad)
    assert not any(p.search(g) for p, _ in _UNSAFE for g in good)


# ---- DeepSpeed's own checkpoint files (ds/) are unpickled safely ----

class _PlantedPayload:
    """What an attacker with write access to checkpoint storage would plant: unpickling it runs a
    shell command (here a harmless ``touch`` of a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_deepspeed_checkpoint_engine_refuses_a_planted_pickle(tmp_path):
    import torch

    from aov_dist.train.ds_safety import UnsafeCheckpointError, safe_checkpoint_engine_class

    marker = tmp_path / "code_ran"
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": _PlantedPayload(str(marker))}}, bad)
    engine = safe_checkpoint_engine_class()(None)
    with pytest.raises(UnsafeCheckpointError, match=rf"DeepSpeed checkpoint file {re.escape(str(bad))}: refused"):
        engine.load(str(bad), map_location="cpu")
    assert not marker.exists()
    # the payload is live: DeepSpeed's own engine (weights_only=False) would have run it
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    TorchCheckpointEngine(None).load(str(bad), map_location="cpu")
    assert marker.exists()


def test_export_from_shards_refuses_a_planted_pickle_before_zero_to_fp32(tmp_path):
    """aov-export --from-shards: DeepSpeed's zero_to_fp32 unpickles unsafely, so every ds/ file is
    safe-loaded first; the payload never runs."""
    import torch

    from aov_dist.train.export import merge_shards
    from aov_dist.train.ds_safety import UnsafeCheckpointError

    marker = tmp_path / "code_ran"
    step = tmp_path / "run" / "step_2"
    (step / "ds" / "state").mkdir(parents=True)
    (step / "ds" / "latest").write_text("state")
    torch.save({"optimizer_state_dict": {"loss_scaler": _PlantedPayload(str(marker))}},
               step / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        merge_shards(str(step), str(tmp_path / "out"))
    assert not marker.exists()


def test_safe_engine_loads_exactly_the_allowlisted_deepspeed_types(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from aov_dist.train.ds_safety import UnsafeCheckpointError, safe_load

    state = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "overflow": False,
             "param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}], "fp32": [torch.arange(6.0)]}
    torch.save(state, tmp_path / "ok.pt")
    back = safe_load(str(tmp_path / "ok.pt"), map_location="cpu")
    assert back["zero_stage"] is ZeroStageEnum.weights and vars(back["loss_scaler"]) == vars(state["loss_scaler"])
    assert back["param_slice_mappings"] == state["param_slice_mappings"]
    assert torch.equal(back["fp32"][0], torch.arange(6.0))
    # fp16's dynamic scaler is not on the list (our config refuses fp16): minimal, not "all of DeepSpeed"
    fp16 = DynamicLossScaler(2.0 ** 8, scale_window=1000, min_scale=1.0, delayed_shift=2, consecutive_hysteresis=False)
    torch.save({"loss_scaler": fp16}, tmp_path / "fp16.pt")
    with pytest.raises(UnsafeCheckpointError, match="DynamicLossScaler"):
        safe_load(str(tmp_path / "fp16.pt"))


def test_strategy_installs_the_safe_engine_and_load_requires_it():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from aov_dist.train.ds_safety import install_safe_checkpoint_engine, safe_checkpoint_engine_class
    from aov_dist.train.strategy import DeepSpeedStrategy

    class Engine:
        checkpoint_engine = None

    import torch

    from aov_dist.config import TrainJobConfig

    engine = Engine()
    engine.checkpoint_engine = TorchCheckpointEngine(None)
    strategy = DeepSpeedStrategy(TrainJobConfig(), device=torch.device("cpu"))
    strategy.engine = engine
    with pytest.raises(RuntimeError, match="without the safe checkpoint engine"):
        strategy.load("/nonexistent/ds")
    install_safe_checkpoint_engine(engine)
    assert type(engine.checkpoint_engine) is safe_checkpoint_engine_class()
    engine.checkpoint_engine = object()  # e.g. a fast/decoupled writer: its loads were not checked
    with pytest.raises(RuntimeError, match="only the torch engine is supported"):
        install_safe_checkpoint_engine(engine)


@pytest.mark.slow
def test_resume_from_a_real_checkpoint_with_a_planted_pickle_is_refused(tmp_path, synthetic_shards):
    """Real ZeRO-2 files (1 gloo rank) pass the safe loader; the same checkpoint with its optimizer
    file replaced by a payload stops the resume naming that file, before the payload runs and
    before anything new is committed. (ZeRO-3's round trip: test_train_golden's resume test.)"""
    import torch
    from torch.multiprocessing import ProcessRaisedException

    from aov_dist.train import checkpoint as ckpt
    from aov_dist.train.ds_safety import verify_ds_checkpoint
    from train_harness import run_ranks, tiny_overrides, typed_cfg

    def cfg(steps: int):
        return typed_cfg(tiny_overrides(synthetic_shards.manifest_path, tmp_path / "runs", world=1, num_workers=0,
                                        zero=2, steps=steps, global_batch=2, micro=2, run_name="planted",
                                        extra=["train.checkpoint_every_steps=2",
                                               "train.export_hf_in_checkpoints=false"]))

    first = run_ranks(cfg(2), tmp_path / "a")
    step2 = first[0]["checkpoints"][-1]
    files = verify_ds_checkpoint(f"{step2}/ds")  # the real ZeRO-2 files are within the allowlist
    optim = [f for f in files if f.endswith("optim_states.pt")]
    assert len(files) == 2 and len(optim) == 1
    marker = tmp_path / "code_ran"
    torch.save({"optimizer_state_dict": {"loss_scaler": _PlantedPayload(str(marker))}}, optim[0])
    with pytest.raises(ProcessRaisedException, match=rf"UnsafeCheckpointError: DeepSpeed checkpoint file "
                                                    rf"{re.escape(optim[0])}: refused"):
        run_ranks(cfg(3), tmp_path / "b")
    assert not marker.exists()
    assert [(s, ok) for s, _, ok in ckpt.list_steps(str(tmp_path / "runs"), "planted")] == [(2, True)]


def test_registered_model_is_logged_from_code_without_a_pickle(tmp_path):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from aov_dist.model import ModelConfig, build_model
    from aov_dist.tracking.config import TrackingConfig
    from aov_dist.tracking.model_registry import log_and_register

    torch.manual_seed(0)
    model, processor = build_model(ModelConfig(preset="tiny"))
    hf = tmp_path / "hf"
    model.save_pretrained(str(hf), safe_serialization=True)
    processor.save_pretrained(str(hf))
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"),
                         registered_model_name="aov-sec", system_metrics=False)
    client = MlflowClient(cfg.uri)
    exp = client.create_experiment("sec", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(exp).info.run_id
    assert log_and_register(cfg, run_id, str(hf), cfg.registered_model_name) == "models:/aov-sec/1"

    mlflow.set_tracking_uri(cfg.uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/aov-sec/1", dst_path=str(tmp_path / "dl")))
    files = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle")) or "python_model" in f and f.endswith(".pkl")], files
    assert any(f.endswith("pyfunc_model.py") for f in files), files
    assert any(f.endswith(".safetensors") for f in files), files
    # it loads (running our code file) and scores like the model itself
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (120, 30, 30)).save(image)
    scores = mlflow.pyfunc.load_model("models:/aov-sec/1").predict([str(image)])
    enc = processor.encode_images([Image.open(image).convert("RGB")])
    with torch.no_grad():
        direct = float(model.eval().expert_forward(enc.pixel_values, enc.image_grids).scores[0])
    assert scores == pytest.approx([direct], rel=1e-5)


# ---- shard names cannot escape their folder ----

def _tar_with(names: list[str], symlink: str | None = None) -> bytes:
    from shard_helpers import add_member

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in names:
            add_member(tf, name, b'{"id": "x", "conversations": [{"from": "human", "value": "hi"}], "images": []}')
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
    return buf.getvalue()


HOSTILE = ["../../escape.json", "/tmp/aov_abs_escape.json", "sub/../../escape2.json"]


def test_reader_never_writes_tar_members_to_disk(tmp_path, monkeypatch):
    from aov_dist.data.decode import iter_tar_samples

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    items = list(iter_tar_samples(io.BytesIO(_tar_with(HOSTILE, symlink="000009.img0.png")), "mem.tar"))
    # members are read into memory by their base name only; nothing lands anywhere
    assert [k for k, _ in items if isinstance(k, str)] == ["escape", "aov_abs_escape", "escape2"]
    assert not (tmp_path / "escape.json").exists() and not Path("/tmp/aov_abs_escape.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["a"] and os.listdir(work) == []


def test_inspect_refuses_traversal_and_links(tmp_path):
    from aov_dist.data.shard_inspect import ShardFormatError, _parse

    for names, link in [([n], None) for n in HOSTILE] + [([], "000000.img0.png")]:
        with pytest.raises(ShardFormatError, match="unexpected or unsafe member"):
            list(_parse(io.BytesIO(_tar_with(names, symlink=link)), "evil.tar"))


def test_manifest_urls_cannot_leave_the_shard_folder(tmp_path):
    import json

    from aov_dist.data.config import DataConfig, DatasetSpec
    from aov_dist.data.stream import build_loader

    (tmp_path / "m").mkdir()
    (tmp_path / "m/manifest.json").write_text(json.dumps({
        "format": "aov-shards", "version": 1, "shards": [{"url": "../outside.tar", "samples": 1}],
        "totals": {"samples": 1, "labels": {}}}))
    with pytest.raises(ValueError, match=r"unsafe relative path '\.\./outside\.tar'"):
        build_loader(DataConfig(datasets=[DatasetSpec("d", str(tmp_path / "m/manifest.json"), 1.0)]), 0, 1,
                     too_long_exceptions=())


# ---- user interfaces on loopback by default ----

def test_mlflow_ui_target_binds_to_loopback():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nmlflow-ui:", 1)[1].split("\n\n", 1)[0]
    assert "--host 127.0.0.1" in recipe and "0.0.0.0" not in recipe


def test_local_ray_dashboard_binds_to_loopback(monkeypatch):
    import ray

    from aov_dist.config import TrainJobConfig
    from aov_dist.train.driver import init_ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    init_ray(TrainJobConfig())
    assert len(calls) == 1 and calls[0]["dashboard_host"] == "127.0.0.1" and "address" not in calls[0]
