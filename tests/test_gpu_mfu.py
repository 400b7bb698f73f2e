"""benchmarks/gpu_mfu.py: the toy (CPU) run, the FLOP formula, and a GPU run where CUDA exists."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_mfu.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_mfu  # noqa: E402
from gpu_mfu import FlopModel, SampleShape, train_flops_per_sample  # noqa: E402

# What a bare GPU machine lacks: the benchmark must run without any of them.
HEAVY_MODULES = ("deepspeed", "ray", "mlflow", "webdataset", "hydra", "omegaconf", "accelerate", "boto3", "s3fs",
                 "torchvision", "scipy", "sklearn", "pandas", "pyarrow", "psutil")


def _parse_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table that ends the output: (header cells, rows of cells)."""
    lines = text.rstrip("\n").splitlines()
    start = len(lines)
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:]]
    assert len(table) >= 3, f"no table at the end of the output:\n{text}"
    assert set("".join(table[1])) == {"-"}, table[1]
    return table[0], table[2:]


def test_toy_main_prints_the_table_last_with_finite_positive_numbers(capsys):
    results = gpu_mfu.main(["--toy"])
    out = capsys.readouterr().out
    header, rows = _parse_table(out)
    assert tuple(header) == gpu_mfu.TABLE_COLUMNS
    assert [r[0] for r in rows] == ["sdpa"]  # CPU: flash-attn left out, with a note
    assert "note: flash-attn needs CUDA: SDPA row only" in out
    assert gpu_mfu.FLOP_FORMULA in out
    for cell in rows[0][1:]:
        value = float(cell)
        assert math.isfinite(value) and value > 0, (header, rows[0])
    # The printed row is the returned result, and its numbers are consistent with each other.
    (res,) = results
    assert rows[0] == list(res.row())
    assert res.tokens_per_s == pytest.approx(res.samples_per_s * 426, rel=1e-9)  # toy S = 426
    assert res.mfu_pct == pytest.approx(100 * res.achieved_tflops / res.peak_tflops, rel=1e-9)
    assert res.samples_per_s == pytest.approx(1000 / res.step_ms, rel=1e-9)  # batch 1


def test_flop_formula_on_a_hand_computed_case():
    fm = FlopModel(llm_matmul_params=100, llm_layers=2, llm_attn_width=8, projector_params=10,
                   vision_matmul_params=20, vision_layers=1, vision_attn_width=4, expert_token_params=5)
    shape = SampleShape(seq_len=16, views=2, view_tokens=9, projected_tokens=20)
    assert train_flops_per_sample(fm, shape) == {
        "llm_matmul": 6 * 100 * 16,  # 9600
        "llm_attention": 12 * 2 * 8 * 16 * 16,  # 49152
        "projector": 6 * 10 * 20,  # 1200
        "vision_matmul": 2 * 20 * 2 * 9,  # 720
        "vision_attention": 4 * 1 * 4 * 9 * 9 * 2,  # 2592
        "expert": 2 * 5 * 2 * 9,  # 180
        "total": 63444,
    }


def test_formula_agrees_with_torch_flop_counter_on_the_tiny_model():
    """Eager attention, so FlopCounterMode sees every matmul of the step (CPU fused SDPA it does not)."""
    processor = gpu_mfu.benchmark_processor("tiny")
    vocab = len(processor.tokenizer)
    batch, shape = gpu_mfu.make_batch(processor, vocab, batch_size=2, text_len=64)
    model = gpu_mfu.build_benchmark_model("tiny", vocab, processor.adverb_token_ids, "eager",
                                          torch.device("cpu"), torch.float32)
    model.stage_parameter_groups("stage2")
    counted = gpu_mfu.count_step_flops(model, batch)
    formula = 2 * train_flops_per_sample(gpu_mfu.flop_model(model), shape)["total"]
    # The formula slightly overcounts (projector's first-layer input gradient, ~0.3 % here) and
    # leaves out the expert's small per-view matmuls: within 1 %.
    assert formula == pytest.approx(counted, rel=0.01)


def test_0_5b_sizes_and_sequence_layout_by_hand():
    processor = gpu_mfu.benchmark_processor("aov_0.5b")
    batch, shape = gpu_mfu.make_batch(processor, 152000, batch_size=2, text_len=384)
    # 2x2 grid at 384 px / patch 14: base 729 + crops 54x54 + 54 newlines = 3699 visual tokens;
    # anomaly tokens 1 + 4 + 4 * (4 + 1) = 25; one adverb slot; the rest is the 384 text tokens.
    assert shape == SampleShape(seq_len=384 + 3699 + 1 + 25, views=5, view_tokens=729, projected_tokens=5 * 729 + 25)
    assert batch["input_ids"].shape == (2, 4109) and batch["pixel_values"].shape == (10, 3, 384, 384)
    assert int((batch["labels"] != -100).sum()) > 2 * 300  # the lengthened text is trained on
    with torch.device("meta"):
        from aov_dist.model.presets import build_config

        fm = gpu_mfu.flop_model(gpu_mfu.AnomalyOVForConditionalGeneration(build_config("aov_0.5b")))
    per_layer = 2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864  # q, o; k, v (2 kv heads x 64); gate, up, down
    assert fm.llm_matmul_params == 24 * per_layer + 152000 * 896  # + the (tied) LM head
    assert fm.projector_params == 1152 * 896 + 896 * 896
    siglip_layer = 4 * 1152 * 1152 + 2 * 1152 * 4304
    assert fm.vision_matmul_params == 26 * siglip_layer + 3 * 14 * 14 * 1152  # + patch conv
    assert fm.expert_token_params == 5 * 1152 * 512
    assert (fm.llm_layers, fm.llm_attn_width, fm.vision_layers, fm.vision_attn_width) == (24, 896, 26, 1152)


def test_too_short_seq_len_is_a_clear_error():
    with pytest.raises(SystemExit, match=r"--seq-len 3: the chat layout alone holds \d+ text tokens"):
        gpu_mfu.main(["--toy", "--seq-len", "3"])


def test_runs_without_the_training_stack_installed():
    """A bare GPU machine has torch, transformers and Pillow only: hide the rest and run the toy end to end."""
    code = (
        "import runpy, sys\n"
        f"for name in {HEAVY_MODULES!r}: sys.modules[name] = None  # import -> ImportError, find_spec -> None\n"
        f"sys.argv = ['gpu_mfu.py', '--toy', '--steps', '1', '--warmup', '0']\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, rows = _parse_table(proc.stdout)
    assert tuple(header) == gpu_mfu.TABLE_COLUMNS and len(rows) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_run_of_the_0_5b_preset(capsys):
    results = gpu_mfu.main(["--steps", "2", "--warmup", "1", "--batch-size", "1", "--seq-len", "128",
                            "--matmul-size", "4096"])
    header, rows = _parse_table(capsys.readouterr().out)
    assert tuple(header) == gpu_mfu.TABLE_COLUMNS
    expected = gpu_mfu.attn_rows("both", torch.device("cuda"))[0]
    assert [r.attn for r in results] == expected
    for r in results:
        assert 0 < r.mfu_pct < 100 and math.isfinite(r.final_loss)
        assert r.peak_mem_gib > 1.0  # ~0.9 B bf16 parameters alone are 1.7 GiB
