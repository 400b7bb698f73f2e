"""benchmarks/gpu_mfu.py: the toy (CPU) run, its model FLOPs (aov_dist.model.flops), and a GPU run where CUDA exists."""
from __future__ import annotations

import json
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

from aov_dist.model.flops import batch_shape, training_flops  # noqa: E402
from aov_dist.model.presets import build_config  # noqa: E402

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
    assert "aov_dist.model.flops.training_flops" in out  # where the count comes from, no formula of its own
    for cell in rows[0][1:]:
        value = float(cell)
        assert math.isfinite(value) and value > 0, (header, rows[0])
    # The printed row is the returned result, and its numbers are consistent with each other.
    (res,) = results
    assert rows[0] == list(res.row())
    assert res.tokens_per_s == pytest.approx(res.samples_per_s * 426, rel=1e-9)  # toy S = 426
    assert res.mfu_pct == pytest.approx(100 * res.achieved_tflops / res.peak_tflops, rel=1e-9)
    assert res.achieved_tflops * 1e12 * res.step_ms / 1e3 == pytest.approx(res.model_flops_per_step, rel=1e-9)
    assert res.samples_per_s == pytest.approx(1000 / res.step_ms, rel=1e-9)  # batch 1


def test_reported_flops_are_training_flops_of_the_batch_and_what_the_flop_counter_sees(tmp_path):
    """What gpu_mfu divides by step time is aov_dist.model.flops.training_flops of its batch, and
    (--check-flops, SDPA's math kernel) exactly what FlopCounterMode counts for the real step."""
    out = tmp_path / "mfu.json"
    (res,) = gpu_mfu.main(["--toy", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--check-flops",
                           "--json", str(out)])
    processor = gpu_mfu.benchmark_processor("tiny")
    vocab = len(processor.tokenizer)
    batch = gpu_mfu.make_batch(processor, vocab, batch_size=2, text_len=64)
    config = build_config("tiny", {"vocab_size": vocab}, adverb_token_ids=processor.adverb_token_ids)
    expected = training_flops(config, batch_shape(batch), "stage2")
    assert res.model_flops_per_step == expected
    assert res.counted_flops_per_step == expected
    saved = json.loads(out.read_text())
    assert saved["model_flops_per_step"] == expected
    assert sum(c["forward"] + c["backward"] for c in saved["flops_breakdown"].values()) == expected
    assert saved["batch_shape"]["sample_lengths"] == [426, 426] and saved["results"][0]["model_flops_per_step"] == expected


def test_step_flops_sum_over_micro_batches():
    processor = gpu_mfu.benchmark_processor("tiny")
    vocab = len(processor.tokenizer)
    config = gpu_mfu.benchmark_config("tiny", vocab, processor.adverb_token_ids)
    a = gpu_mfu.make_batch(processor, vocab, batch_size=1, text_len=64)
    b = gpu_mfu.make_batch(processor, vocab, batch_size=2, text_len=96, seed=1)
    assert gpu_mfu.step_model_flops(config, [a, b]) == \
        training_flops(config, batch_shape(a), "stage2") + training_flops(config, batch_shape(b), "stage2")
    breakdown = gpu_mfu.step_flops_breakdown(config, [a, b])
    assert list(breakdown) == ["vision_tower", "expert", "projector", "llm", "lm_head"]
    assert sum(c.total for c in breakdown.values()) == gpu_mfu.step_model_flops(config, [a, b])
    assert breakdown["vision_tower"].backward == 0 and breakdown["expert"].backward == 0  # frozen in stage 2


def test_0_5b_sequence_layout_by_hand():
    processor = gpu_mfu.benchmark_processor("aov_0.5b")
    batch = gpu_mfu.make_batch(processor, 152000, batch_size=2, text_len=384)
    # 2x2 grid at 384 px / patch 14: base 729 + crops 54x54 + 54 newlines = 3699 visual tokens;
    # anomaly tokens 1 + 4 + 4 * (4 + 1) = 25; one adverb slot; the rest is the 384 text tokens.
    assert batch["input_ids"].shape == (2, 384 + 3699 + 1 + 25) and batch["pixel_values"].shape == (10, 3, 384, 384)
    shape = batch_shape(batch)
    assert shape.sample_lengths == (4109, 4109) and (shape.views, shape.images) == (10, 2)
    assert shape.label_positions > 2 * 300  # the lengthened text is trained on


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
