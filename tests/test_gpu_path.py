"""The GPU path on a machine without a GPU: what reaches the model is on the engine's device, and
what reaches a collective is on the process group's device.

The engine and the predictor report a CUDA device and the process group reports CUDA as its
collective device (as NCCL does); ``tests/fake_device.py`` keeps the data on the CPU but tags every
tensor our placement moved there, so a tensor that skipped the move is seen for what it would be
on a GPU node: a CPU tensor handed to a CUDA model, or to an NCCL collective. Real DeepSpeed ZeRO-3
on two gloo ranks, the real loop, the real tasks and the real predictor.
"""
from __future__ import annotations

import pytest
import torch

from fake_device import FAKE_CUDA, CollectiveSpy, ModelInputs, install_place
from train_harness import run_ranks, tiny_overrides, train_rank, typed_cfg

HOST_INPUTS = ("image_grids", "image_sizes")


def fake_cuda_rank(cfg, rank: int, world: int) -> dict:
    """One spawned rank: the real loop with a strategy whose engine and group report FAKE_CUDA."""
    from aov_dist.train.strategy import DeepSpeedStrategy

    install_place()
    spy = CollectiveSpy()
    spy.install()
    inputs = ModelInputs()

    class FakeCudaStrategy(DeepSpeedStrategy):
        def __init__(self, c):
            super().__init__(c, device=FAKE_CUDA)
            self._collective_device = FAKE_CUDA  # an NCCL group reduces CUDA tensors

        def initialize(self, model, *args, **kwargs):
            engine = super().initialize(model, *args, **kwargs)
            inputs.hook_forward(engine.module)
            return engine

    out = train_rank(cfg, rank, world, strategy=FakeCudaStrategy(cfg))
    out.update(model_inputs=inputs.seen, collectives=spy.calls)
    return out


def _assert_on_device(seen: list, expected_keys: set[str]) -> None:
    keys = {key for _, key, _ in seen}
    assert keys == expected_keys, keys
    for what, key, device in seen:
        want = "cpu" if key in HOST_INPUTS else str(FAKE_CUDA)
        assert device == want, f"{what}({key}=...) reached the model on {device}, expected {want}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_every_tensor_of_a_training_step_reaches_the_model_on_the_engines_device(synthetic_shards, tmp_path, stage):
    extra = [] if stage == "stage1" else ["stage=stage2", "stage.require_init=false", "data.max_length=1024"]
    # 2 ranks x micro 2 x accumulation 2: several forwards per step; the last step saves (barriers)
    cfg = typed_cfg(tiny_overrides(synthetic_shards.manifest_path, tmp_path / "runs", world=2, num_workers=0,
                                   steps=1, global_batch=8, micro=2, extra=extra))
    ranks = run_ranks(cfg, tmp_path / "out", rank_fn=fake_cuda_rank)
    expected = {"pixel_values", "image_grids"} if stage == "stage1" else \
        {"input_ids", "attention_mask", "labels", "token_type", "pixel_values", "image_grids", "image_sizes"}
    for r in ranks:
        assert r["step"] == 1 and torch.isfinite(torch.tensor(r["losses"])).all()
        assert len({c for c, _, _ in r["model_inputs"]}) == 1  # one call site: the forward
        assert len(r["model_inputs"]) == 2 * len(expected)  # two micro-batches per rank
        _assert_on_device(r["model_inputs"], expected)


@pytest.mark.slow
def test_every_collective_of_a_training_step_uses_a_tensor_on_the_groups_device(synthetic_shards, tmp_path):
    cfg = typed_cfg(tiny_overrides(synthetic_shards.manifest_path, tmp_path / "runs", world=2, num_workers=0,
                                   steps=2, global_batch=4, micro=2, extra=["train.checkpoint_every_steps=1"]))
    ranks = run_ranks(cfg, tmp_path / "out", rank_fn=fake_cuda_rank)
    for r in ranks:
        calls = r["collectives"]
        # per step: the step totals (one all-reduce); per checkpoint (local storage): one barrier
        # before the commit
        assert [name for name, _, _ in calls] == ["all_reduce", "barrier"] * 2, calls
        for name, caller, device in calls:
            assert device == str(FAKE_CUDA), f"{name} from {caller} used {device}, not the group's {FAKE_CUDA}"


def test_an_eval_batch_reaches_the_model_on_the_predictors_device(synthetic_data, tmp_path, monkeypatch):
    from aov_dist.eval.benchmark import load_benchmark
    from aov_dist.eval.predictor import AnomalyOVBackend, Predictor
    from aov_dist.model import ModelConfig, build_model

    model, processor = build_model(ModelConfig())
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    backend = AnomalyOVBackend(str(tmp_path / "hf"), max_new_tokens=3, device="cpu")
    backend.device = FAKE_CUDA  # the predictor reports a GPU; the tagging move keeps data on the CPU
    install_place(monkeypatch)
    inputs = ModelInputs()
    inputs.wrap_method(backend.model, "generate")
    inputs.wrap_method(backend.model, "expert_forward")

    bench = load_benchmark(str(synthetic_data.benchmark_dir))
    rows = Predictor(lambda: backend, bench.root).detect(bench.detection[:3])
    assert len(rows) == 3 and all(isinstance(r["reply"], str) for r in rows)
    generate = [s for s in inputs.seen if s[0] == "generate"]
    expert = [s for s in inputs.seen if s[0] == "expert_forward"]
    assert {k for _, k, _ in generate} == {"input_ids", "attention_mask", "token_type", "pixel_values",
                                          "image_grids", "image_sizes"}
    assert {k for _, k, _ in expert} == {"pixel_values", "image_grids"}
    for what, key, device in inputs.seen:
        want = "cpu" if key in HOST_INPUTS else str(FAKE_CUDA)
        assert device == want, f"{what}({key}=...) reached the model on {device}, expected {want}"


def test_the_collective_device_is_the_groups_not_the_models():
    from aov_dist.devices import collective_device

    cuda = torch.device("cuda", 3)
    assert collective_device(cuda, "nccl") == cuda
    assert collective_device(cuda, "gloo") == torch.device("cpu")  # a gloo group on a GPU worker
    assert collective_device(cuda, "cpu:gloo,cuda:nccl") == cuda
    assert collective_device(torch.device("cpu"), "cpu:gloo,cuda:nccl") == torch.device("cpu")
    assert collective_device(torch.device("cpu"), "gloo") == torch.device("cpu")


def test_a_batch_moves_whole_except_the_host_layout_keys(monkeypatch):
    from aov_dist.devices import move_to_device

    install_place(monkeypatch)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "image_grids": torch.zeros(1, 2, dtype=torch.long),
             "nested": [torch.zeros(1), {"x": torch.zeros(2)}], "name": "not a tensor"}
    moved = move_to_device(batch, FAKE_CUDA, keep_on_host=HOST_INPUTS)
    from fake_device import device_of

    assert device_of(moved["input_ids"]) == FAKE_CUDA
    assert moved["image_grids"] is batch["image_grids"]
    assert device_of(moved["nested"][0]) == FAKE_CUDA and device_of(moved["nested"][1]["x"]) == FAKE_CUDA
    assert moved["name"] == "not a tensor"
