"""aov-plan: token counts, parameter counts, the memory model and the planner's output (no Ray, no DeepSpeed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aov_dist.model.presets import PRESETS, preset_dims, tiny_processor
from aov_dist.model.tokenizer import DETECTION_PROMPT
from aov_dist.train import memory as mem
from aov_dist.train.plan_cli import main, prepare
from train_harness import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["aov_0.5b_stage1", "aov_0.5b_stage2", "aov_7b_stage1", "aov_7b_stage2"]
HUGE = 10**9


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------ token counts
@pytest.fixture(scope="module")
def official_proc():
    return tiny_processor(preset_dims("aov_0.5b"))  # the 384-px, 6x6-pinpoint layout with the tiny tokenizer


def _conv(n_images: int, answer: str = "Yes") -> list[dict]:
    return [{"from": "human", "value": "<image>" * n_images + "\n" + DETECTION_PROMPT}, {"from": "gpt", "value": answer},
            {"from": "human", "value": "Where is the defect?"}, {"from": "gpt", "value": "Near the top left edge."}]


def test_count_tokens_equals_encoded_length_for_text_only(official_proc):
    conv = [{"from": "human", "value": "Describe a screw."}, {"from": "gpt", "value": "A small metal screw " * 30}]
    assert official_proc.count_tokens([], conv) == len(official_proc.encode_conversation([], conv, HUGE)["input_ids"])


@pytest.mark.parametrize("size", [(384, 384), (480, 640), (640, 480), (1000, 1500), (300, 2000), (2000, 300), (50, 900)])
def test_count_tokens_equals_encoded_length_for_single_images(official_proc, size):
    conv = _conv(1)
    encoded = official_proc.encode_conversation([image(*size)], conv, HUGE)
    assert official_proc.count_tokens([size], conv) == len(encoded["input_ids"])
    labelled = int((encoded["labels"] != -100).sum())
    assert official_proc.count_tokens_and_labels([size], conv) == (len(encoded["input_ids"]), labelled) and labelled > 0


@pytest.mark.parametrize("sizes", [[(64, 64), (90, 140)], [(300, 200), (200, 300), (384, 384), (1000, 700)]])
def test_count_tokens_equals_encoded_length_for_multi_view(official_proc, sizes):
    conv = _conv(len(sizes))
    images = [image(h, w, i) for i, (h, w) in enumerate(sizes)]
    assert official_proc.count_tokens(sizes, conv) == len(official_proc.encode_conversation(images, conv, HUGE)["input_ids"])


def test_count_tokens_with_the_tiny_layout_and_placeholder_mismatch():
    proc = tiny_processor()
    for size in [(112, 112), (112, 224), (300, 200), (40, 500)]:
        assert proc.count_tokens([size], _conv(1)) == len(proc.encode_conversation([image(*size)], _conv(1), HUGE)["input_ids"])
    with pytest.raises(ValueError, match="placeholders"):
        proc.count_tokens([(112, 112)], _conv(2))


# --------------------------------------------------------- parameter counts
def _expected(preset: str, vocab: int) -> dict[str, int]:
    """Parameter counts by hand from the preset's dimensions (SigLIP, expert, projector, Qwen2)."""
    d = PRESETS[preset]
    v, vi, lv, p, s = d["vision_hidden"], d["vision_intermediate"], d["vision_layers"], d["patch_size"], d["image_size"]
    t = (s // p) ** 2
    vision = (3 * p * p * v + v) + t * v + lv * (4 * v + 4 * (v * v + v) + 2 * v * vi + vi + v) + 2 * v
    e = d["expert_embed_dim"]
    expert = (2 * e + (t + 1) + (v * e + e + e * e + e) + 4 * (v * e + e) + 4 * (2 * e * e + e)
              + (v * e + e + e + 1) + 2 * (v * e + e))
    h, i, lt = d["text_hidden"], d["text_intermediate"], d["text_layers"]
    kv = h // d["text_heads"] * d["text_kv_heads"]
    projector = (v * h + h) + (h * h + h) + h  # two linears + image_newline
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    llm = vocab * h + lt * layer + h + (0 if d["tie_embeddings"] else vocab * h)
    return {"vision_tower": vision, "expert": expert, "projector": projector, "llm": llm}


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", []), ("tiny", ["+stage.lr.vision_tower=1e-3"]), ("aov_0.5b", ["experiment=aov_0.5b_stage1"]),
    ("aov_0.5b", ["experiment=aov_0.5b_stage2"]), ("aov_7b", ["experiment=aov_7b_stage1"]),
    ("aov_7b", ["experiment=aov_7b_stage2"]), ("tiny", ["stage=stage2", "stage.require_init=false"]),
])
def test_parameter_counts_on_meta_device_match_hand_computed_totals(preset, overrides):
    from aov_dist.train.plan import count_parameters

    c, missing = prepare(compose_cfg(overrides))
    report, dims, _ = count_parameters(c, missing)
    vocab = len(tiny_processor().tokenizer) if preset == "tiny" else PRESETS[preset]["vocab_size"]
    expected = _expected(preset, vocab)
    assert report["total"] == sum(expected.values()) == dims.total_params
    trains = set(c.stage.lr)
    for group, n in expected.items():
        got = report["groups"][group]
        assert got["trainable"] + got["frozen"] == n, group
        if group in trains:
            post_layernorm = 2 * PRESETS[preset]["vision_hidden"] if group == "vision_tower" else 0
            assert got["trainable"] == n - post_layernorm, group  # the unused post-layernorm stays frozen
        else:
            assert got["trainable"] == 0, group
    assert dims.trainable_params == report["trainable"] == sum(g["trainable"] for g in report["groups"].values())


def test_tied_embeddings_are_counted_once():
    from aov_dist.train.plan import count_parameters

    c, missing = prepare(compose_cfg(["experiment=aov_0.5b_stage2"]))
    report, _, _ = count_parameters(c, missing)
    assert report["groups"]["llm"]["trainable"] == _expected("aov_0.5b", 152000)["llm"]  # no second V x h


def test_parameters_come_from_a_readable_pretrained_config(tmp_path):
    from aov_dist.model.presets import build_config
    from aov_dist.train.plan import count_parameters

    build_config("aov_0.5b", {"text_layers": 2}).save_pretrained(tmp_path)
    c, missing = prepare(compose_cfg(["experiment=aov_0.5b_stage2", f"model.pretrained_path={tmp_path}"]))
    report, dims, _ = count_parameters(c, missing)
    assert "model.pretrained_path" not in missing and report["source"].endswith("config.json")
    h, i, kv = 896, 4864, 128  # Qwen2-0.5B: 22 of its 24 decoder layers fewer
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert dims.text_layers == 2 and report["total"] == sum(_expected("aov_0.5b", 152000).values()) - 22 * layer


# ------------------------------------------------------------- memory model
DIMS = mem.ModelDims(total_params=10**9, trainable_params=5 * 10**8, largest_module_params=10**8, text_hidden=1000,
                     text_intermediate=3000, text_layers=10, text_heads=10, text_kv_heads=2, vocab_size=1000,
                     vision_hidden=100, vision_layers=9, tokens_per_view=10, expert_embed_dim=10, expert_levels=4)
JOB = mem.JobShape(stage="stage2", nodes=1, workers_per_node=8, zero_stage=3, bytes_per_param=2, offload_optimizer=False,
                   offload_params=False, activation_checkpointing=False, micro_batch_size=2, tokens_per_sample=100,
                   views_per_sample=3)
OVERHEAD = 2.5 * 1024**3


def _terms(**changes) -> dict[str, float]:
    import dataclasses

    e = mem.estimate(DIMS, dataclasses.replace(JOB, **changes))
    return {**e.terms, **{f"host {k}": v for k, v in e.host.items()}}


def test_memory_zero3_bf16_every_term_by_hand():
    t = _terms()
    assert t["parameters"] == 10**9 * 2 / 8
    assert t["gradients"] == 5 * 10**8 * 2 / 8
    assert t["optimizer states"] == 5 * 10**8 * 12 / 8  # fp32 master + m + v
    assert t["ZeRO-3 gathered parameters"] == 2 * 10**8 * 2
    # S = 2 x 100 tokens; per token per layer 2*(7*1000 + 2*200 + 4*3000) = 38800 bytes
    assert mem.activation_bytes_per_token_layer(DIMS, 2) == 38800
    assert t["LLM activations"] == 200 * 10 * 38800
    assert t["LM head logits + loss"] == 200 * 1000 * 12
    # 6 views x 10 tokens x 2 bytes x max(10 hidden states x 100, projector 100 + 2 x 1000)
    assert t["vision activations"] == 6 * 10 * 2 * 2100
    assert t["fixed overhead (CUDA/NCCL, runtime)"] == OVERHEAD
    assert mem.estimate(DIMS, JOB).total == pytest.approx(sum(t.values()))


def test_memory_lm_head_is_sized_at_the_labelled_positions_when_known():
    # 2 samples x 30 labelled tokens of 100: the head's logits and loss for 60 positions, not 200
    assert _terms(label_positions_per_sample=30)["LM head logits + loss"] == 60 * 1000 * 12
    assert _terms(label_positions_per_sample=30)["LLM activations"] == _terms()["LLM activations"]


def test_memory_zero2_keeps_full_parameters_and_gathers_nothing():
    t = _terms(zero_stage=2)
    assert t["parameters"] == 10**9 * 2
    assert t["gradients"] == 5 * 10**8 * 2 / 8
    assert t["ZeRO-3 gathered parameters"] == 0


def test_memory_fp32_uses_four_bytes_and_no_master_copy():
    t = _terms(bytes_per_param=4)
    assert t["parameters"] == 10**9 * 4 / 8
    assert t["gradients"] == 5 * 10**8 * 4 / 8
    assert t["optimizer states"] == 5 * 10**8 * 8 / 8
    assert t["LM head logits + loss"] == 200 * 1000 * 12
    assert t["LLM activations"] == 200 * 10 * 4 * (7000 + 400 + 12000)


def test_memory_offload_moves_parameters_and_optimizer_to_host():
    t = _terms(offload_params=True, offload_optimizer=True)
    assert t["parameters"] == 0 and t["host parameters"] == 10**9 * 2 / 8
    assert t["optimizer states"] == 0 and t["host optimizer states"] == 5 * 10**8 * 12 / 8
    assert t["gradients"] == 5 * 10**8 * 2 / 8
    e = mem.estimate(DIMS, JOB.__class__(**{**JOB.__dict__, "offload_optimizer": True}))
    assert mem.footprint(e, host_counts=True) == e.total + 5 * 10**8 * 12 / 8  # CPU clusters: same memory


def test_memory_activation_checkpointing_keeps_layer_inputs_plus_one_layer():
    assert _terms(activation_checkpointing=True)["LLM activations"] == 200 * (10 * 2 * 1000 + 38800)


def test_memory_stage1_has_no_llm_and_keeps_the_expert_inputs():
    t = _terms(stage="stage1")
    assert t["LLM activations"] == 0 and t["LM head logits + loss"] == 0
    # 10 hidden states x 100 + expert: 2 x 4 levels x 10 + 100 + 10
    assert t["vision activations"] == 6 * 10 * 2 * (1000 + 80 + 110)


def test_verdict_thresholds_and_alternatives():
    assert mem.verdict(85, 100) == "fits" and mem.verdict(85.5, 100) == "tight"
    assert mem.verdict(100, 100) == "tight" and mem.verdict(100.5, 100) == "does not fit"
    budget = mem.estimate(DIMS, JOB).total * 0.9
    overrides = [o for o, _, _ in mem.alternatives(DIMS, JOB, budget)]
    assert "model.activation_checkpointing=true" in overrides and "data.micro_batch_size=1" in overrides
    assert "deepspeed=zero3_offload" in overrides and "cluster.nodes=2" in overrides
    assert all(total < mem.estimate(DIMS, JOB).total for _, total, _ in mem.alternatives(DIMS, JOB, budget))


# ---------------------------------------------------------------- planner
def _manifest_override(path) -> str:
    return f"data.datasets=[{{name: s, manifest: '{path}', weight: 1.0}}]"


def _plan(overrides: list[str], tmp_path, capsys) -> tuple[int, dict, str]:
    cfg = compose_cfg(overrides)
    out = tmp_path / "plan.json"
    from aov_dist.train.plan_cli import PlanOptions

    code = main(cfg, PlanOptions(json_path=str(out)))
    printed = capsys.readouterr()
    return code, json.loads(out.read_text()) if out.exists() else {}, printed.out + printed.err


@pytest.mark.parametrize("experiment", EXPERIMENTS + [None])
@pytest.mark.parametrize("with_data", [True, False])
def test_planner_prints_a_verdict_consistent_with_the_exit_code(experiment, with_data, synthetic_shards, tmp_path, capsys):
    overrides = [f"experiment={experiment}"] if experiment else []
    if with_data:
        overrides.append(_manifest_override(synthetic_shards.manifest_path))
    elif experiment is None:  # the tiny job always names a manifest: one that does not exist
        overrides.append(_manifest_override(tmp_path / "absent" / "manifest.json"))
    code, plan, out = _plan(overrides, tmp_path, capsys)
    last = out.strip().splitlines()[-1]
    assert last.startswith("verdict: ") and plan["verdict"] in last and "estimate" in out.lower()
    assert code == (1 if plan["verdict"] == "does not fit" else 0) == plan["exit_code"]
    expected_missing = {"model.pretrained_path"} if experiment else set()
    if experiment == "aov_7b_stage2":  # 8 nodes need storage every node reaches
        expected_missing.add("train.storage_path")
    if not with_data and experiment is None:
        assert plan["data"]["status"] == "no readable manifest" and "cannot be read" in out
        assert plan["problems"] and plan["problems"][0].startswith("data.datasets[0].manifest: ")
    elif not with_data:
        expected_missing.add("data.datasets[0].manifest")
        assert plan["data"]["status"] == "no manifest given" and "no manifest given" in out
    else:
        assert plan["data"]["records"] == synthetic_shards.manifest["totals"]["samples"]
    assert set(plan["missing"]) == expected_missing
    for key in expected_missing:
        assert f"must be set before launching: {key}" in out and key in last
    stage = plan["job"]["stage"]
    if stage == "stage1" and with_data:
        assert "views" in plan["data"] and "stage-1 filters apply" in out
    if stage == "stage2" and with_data:
        assert "tokens" in plan["data"] and "over data.max_length" in out


def test_planner_reports_does_not_fit_with_exit_1_and_the_fix(tmp_path, capsys):
    code, plan, out = _plan(["experiment=aov_7b_stage2", "model.activation_checkpointing=false"], tmp_path, capsys)
    assert code == 1 and plan["verdict"] == "does not fit"
    assert out.strip().splitlines()[-1].startswith("verdict: does not fit")
    assert "model.activation_checkpointing=true" in [a["override"] for a in plan["alternatives"]]


def test_fraction_over_max_length_matches_a_count_with_the_processor(synthetic_shards, tmp_path, capsys):
    from aov_dist.data.decode import decode_sample, iter_tar_samples

    proc = tiny_processor(preset_dims("aov_0.5b"))
    lengths = []
    for shard in synthetic_shards.manifest["shards"]:
        with open(synthetic_shards.dir / shard["url"], "rb") as f:
            for key, members in iter_tar_samples(f, shard["url"]):
                raw = decode_sample(members, key, shard["url"], "s", stage="stage2", min_image_side=2)
                lengths.append(len(proc.encode_conversation(raw["images"], raw["conversations"], HUGE)["input_ids"]))
    max_length = sorted(lengths)[-5]  # at most 4 samples are longer
    over = sum(t > max_length for t in lengths)
    assert 0 < over < len(lengths)
    code, plan, out = _plan(["experiment=aov_0.5b_stage2", _manifest_override(synthetic_shards.manifest_path),
                             f"data.max_length={max_length}"], tmp_path, capsys)
    tokens = plan["data"]["tokens"]
    assert tokens["over_max_length"] == over and tokens["fraction_over_max_length"] == over / len(lengths)
    assert tokens["max"] == max(lengths)
    assert f"over data.max_length={max_length}: {over} ({over / len(lengths):.1%})" in out
    p99 = sorted(lengths)[int(np.ceil(0.99 * len(lengths))) - 1]
    assert plan["data_verdict"] == f"raise data.max_length (p99 is {p99} tokens)"  # over/len > 1 % skip budget
    assert plan["memory"]["tokens_per_micro_batch"] == max_length  # truncated to max_length
    code, plan, _ = _plan(["experiment=aov_0.5b_stage2", _manifest_override(synthetic_shards.manifest_path),
                           f"data.max_length={max(lengths)}"], tmp_path, capsys)
    assert plan["data"]["tokens"]["over_max_length"] == 0 and plan["data_verdict"].startswith("ok")


def test_command_line_values_are_not_listed_as_missing(synthetic_shards, tmp_path, capsys):
    code, plan, out = _plan(["experiment=aov_7b_stage2", "train.storage_path=s3://bucket/runs",
                             f"data.datasets.0.manifest={synthetic_shards.manifest_path}"], tmp_path, capsys)
    assert set(plan["missing"]) == {"model.pretrained_path"}
    assert plan["data"]["status"] == "sampled"


def test_config_error_names_the_key_and_exits_2(tmp_path, capsys):
    code, _, out = _plan(["experiment=aov_0.5b_stage2", "deepspeed.zero_stage=1"], tmp_path, capsys)
    assert code == 2 and "config error: deepspeed.zero_stage: must be 2 or 3" in out
    code, _, out = _plan(["experiment=aov_7b_stage2", "cluster.gpu_memory_gib=0"], tmp_path, capsys)
    assert code == 2 and "config error: cluster.gpu_memory_gib:" in out


def _run_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """A subprocess in which importing Ray fails: the planner must never start (or import) it."""
    fake = tmp_path / "no_ray"
    (fake / "ray").mkdir(parents=True, exist_ok=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('the planner must not import ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_aov_train_plan_true_runs_the_planner_without_ray(tmp_path):
    r = _run_cli(["-m", "aov_dist.train", "experiment=aov_0.5b_stage2", "+plan=true"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("verdict: fits") and "Memory per worker" in r.stdout
    assert "must be set before launching: data.datasets[0].manifest" in r.stdout


def _cli(module_cli, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        module_cli()
    printed = capsys.readouterr()
    return e.value.code, printed.out + printed.err


def test_aov_train_plan_options_write_json_and_exit_1_when_it_does_not_fit(tmp_path, monkeypatch, capsys):
    from aov_dist.train.__main__ import cli

    out = tmp_path / "p.json"
    code, printed = _cli(cli, ["aov-train", "experiment=aov_7b_stage2", "model.activation_checkpointing=false",
                               f"+plan.json={out}", "+plan.samples=4"], monkeypatch, capsys)
    assert code == 1 and json.loads(out.read_text())["verdict"] == "does not fit"
    assert printed.strip().splitlines()[-1].startswith("verdict: does not fit")
    code, printed = _cli(cli, ["aov-train", "+plan.sample=4"], monkeypatch, capsys)
    assert code == 2 and "config error: plan.sample: unknown plan option" in printed


def test_aov_plan_cli_flags_and_config_error(tmp_path, monkeypatch, capsys):
    from aov_dist.train.plan_cli import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.json"
    code, printed = _cli(cli, ["aov-plan", "--json", str(out), "--samples=8", "experiment=aov_0.5b_stage1"],
                         monkeypatch, capsys)
    assert code == 0 and printed.strip().splitlines()[-1].startswith("verdict: fits")
    assert json.loads(out.read_text())["estimate"] is True
    code, printed = _cli(cli, ["aov-plan", "experiment=aov_7b_stage2", "cluster.workers_per_node=4"], monkeypatch, capsys)
    assert code == 2 and "config error: cluster.workers_per_node: must equal cluster.gpus_per_node" in printed
    assert sorted(os.listdir(tmp_path)) == ["p.json"]  # Hydra stayed inert: no outputs/ folder


def test_fill_missing_replaces_surviving_question_marks_and_records_the_keys():
    from omegaconf import OmegaConf

    from aov_dist.train.plan_cli import PLACEHOLDER, fill_missing

    cfg = OmegaConf.create({"model": {"preset": "tiny", "random_init": False, "pretrained_path": None},
                            "data": {"datasets": [{"name": "a", "manifest": "???"}, {"name": "b", "manifest": "m.json"}]},
                            "stage": {"init_from": None}, "cluster": {"nodes": 2, "shared_filesystem": False},
                            "train": {"storage_path": "/local/runs"}})
    missing = fill_missing(cfg)
    assert set(missing) == {"data.datasets[0].manifest", "train.storage_path"}  # 2 nodes, a local path
    assert cfg.train.storage_path == PLACEHOLDER.format(key="train.storage_path")
    assert cfg.data.datasets[0].manifest == PLACEHOLDER.format(key="data.datasets[0].manifest")
    assert cfg.data.datasets[1].manifest == "m.json"


def test_sample_is_spread_over_evenly_spaced_shards():
    from aov_dist.data.sample import spread_shards

    assert spread_shards(3, 16) == [0, 1, 2]
    picked = spread_shards(100, 16)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 99
    assert spread_shards(1, 16) == [0]


def test_planner_samples_an_s3_manifest(s3_bucket, synthetic_shards, tmp_path, capsys):
    from aov_dist import storage

    for f in synthetic_shards.dir.iterdir():
        storage.write_bytes(f"{s3_bucket}/shards/{f.name}", f.read_bytes())
    code, plan, out = _plan(["experiment=aov_0.5b_stage2", _manifest_override(f"{s3_bucket}/shards/manifest.json")],
                            tmp_path, capsys)
    assert code == 0 and plan["data"]["status"] == "sampled"
    assert plan["data"]["records"] == synthetic_shards.manifest["totals"]["samples"]
