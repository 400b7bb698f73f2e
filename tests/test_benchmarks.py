"""The benchmark scripts: their shared helpers exactly, and each script end to end at toy size
(slow: Ray / DeepSpeed start-up) on the suite's small synthetic data set and shards (conftest's
session fixtures), reading the printed markdown table back."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import markdown_table, parse_markdown_table, run_monitored, step_stats  # noqa: E402


def test_step_stats_median_after_warmup():
    # step ends at 0, 1, 3, 4, 6, 7.5: after 1 warm-up step the intervals are 2, 1, 2, 1.5
    s = step_stats([0.0, 1.0, 3.0, 4.0, 6.0, 7.5], samples_per_step=8, warmup=1)
    assert s["step_s"] == pytest.approx(1.75)
    assert s["samples_per_s"] == pytest.approx(8 / 1.75)
    assert (s["steps_timed"], s["step_s_min"], s["step_s_max"]) == (4, 1.0, 2.0)


def test_step_stats_needs_steps_beyond_warmup():
    with pytest.raises(ValueError, match="need more than warm-up 2"):
        step_stats([0.0, 1.0, 2.0], samples_per_step=1, warmup=2)


def test_markdown_table_round_trip():
    text = "noise\n" + markdown_table(["a", "b"], [["x", 1.23456], ["y", float("nan")]]) + "\ntrailer"
    assert parse_markdown_table(text) == [{"a": "x", "b": "1.23"}, {"a": "y", "b": "n/a"}]


def test_run_monitored_counts_child_processes(tmp_path):
    # a parent that starts a child holding ~150 MB: the tree's peak must include the child
    script = textwrap.dedent("""
        import subprocess, sys
        subprocess.run([sys.executable, "-c",
                        "import time; b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"],
                       check=True)
    """)
    out = run_monitored([sys.executable, "-c", script], {"PATH": "/usr/bin:/bin"}, 60, tmp_path / "log.txt")
    assert out["rc"] == 0 and out["peak_procs"] >= 2
    assert out["peak_rss_mb"] > 150


def test_run_monitored_reports_failure_with_log_tail(tmp_path):
    with pytest.raises(RuntimeError, match="boom-marker"):
        run_monitored([sys.executable, "-c", "import sys; print('boom-marker'); sys.exit(3)"], {}, 60,
                      tmp_path / "log.txt")


def _run_script(name: str, *args: str, timeout: int = 900) -> list[dict[str, str]]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # libraries may print to stdout first (DeepSpeed's accelerator notice): the report line must be there
    assert any(line.startswith("machine: ") for line in proc.stdout.splitlines()), proc.stdout[-2000:]
    return parse_markdown_table(proc.stdout)


def _positive(cell: str) -> float:
    v = float(cell)
    assert math.isfinite(v) and v > 0, cell
    return v


@pytest.mark.slow
def test_bench_trainer_toy(synthetic_shards):
    rows = _run_script("bench_trainer.py", "--steps", "4", "--warmup", "1", "--global-batch", "4", "--micro", "2",
                       "--manifest", str(synthetic_shards.manifest_path),
                       "--train-json", str(synthetic_shards.data.train_json))
    assert [r["variant"] for r in rows] == ["ours", "official", "plain"]
    assert list(rows[0]) == ["variant", "step s (median)", "samples/s", "first step s", "peak RSS MB (tree)",
                             "ours/variant step time"]
    for r in rows:
        step, sps = _positive(r["step s (median)"]), _positive(r["samples/s"])
        # samples/s is the samples of one step over the median step time (plain: one process, half the batch)
        assert sps == pytest.approx((2 if r["variant"] == "plain" else 4) / step, rel=0.02)
        assert _positive(r["first step s"]) > step
        _positive(r["peak RSS MB (tree)"])
        _positive(r["ours/variant step time"])
    assert float(rows[0]["ours/variant step time"]) == 1.0


@pytest.mark.slow
def test_bench_eval_toy(synthetic_data):
    rows = _run_script("bench_eval.py", "--small", "4", "--large", "12", "--batch-size", "4", "--repeat", "1",
                       "--benchmark", str(synthetic_data.benchmark_dir))
    assert [r["workers"] for r in rows] == ["1", "2", "2 / 1"]
    for r in rows[:2]:
        fresh, warm = _positive(r["s per checkpoint fresh (12 images)"]), _positive(r["s per checkpoint warm"])
        assert _positive(r["samples/s fresh"]) == pytest.approx(12 / fresh, rel=0.02)
        assert _positive(r["samples/s warm"]) == pytest.approx(12 / warm, rel=0.02)
        # the warm pool skips starting actors (seconds each); 12 images take well under that
        assert warm < fresh, r
    _positive(rows[2]["samples/s fresh"])
    _positive(rows[2]["samples/s warm"])


@pytest.mark.slow
def test_bench_checkpoint_toy(synthetic_shards):
    rows = _run_script("bench_checkpoint.py", "--saves", "1", "--manifest", str(synthetic_shards.manifest_path))
    assert [r["storage"] for r in rows] == ["local", "s3"]
    for r in rows:
        blocked = _positive(r["blocked per save s"])
        assert blocked >= float(r["ds/ save s"]) * 0.5  # the whole _save includes the ds/ write
        _positive(r["restore s"])
        # the tiny model's fp32 weights alone are ~8 MB: the hf/ export is that size, ds/ adds optimizer state
        assert 5 < _positive(r["hf/ MB"]) < 12
        assert _positive(r["ds/ MB"]) > float(r["hf/ MB"])
        # (the figures are printed to 3 significant digits)
        assert _positive(r["step folder MB"]) >= (float(r["ds/ MB"]) + float(r["hf/ MB"])) * 0.99
    assert rows[0]["step folder MB"] == rows[1]["step folder MB"]  # the same files, wherever they are stored


def test_bench_loss_memory_quick():
    # ~20 s: four fresh processes run the loss for real at toy row sizes, the aov_0.5b vocabulary
    from aov_dist.model.presets import preset_dims

    vocab = preset_dims("aov_0.5b")["vocab_size"]
    rows = _run_script("bench_loss_memory.py", "--quick", timeout=600)
    assert [(r["method"], r["tokens"]) for r in rows] == [("full logits", "256"), ("label positions only", "256"),
                                                          ("full logits", "512"), ("label positions only", "512")]
    by = {(r["method"], int(r["tokens"])): r for r in rows}
    for tokens in (256, 512):
        full, labels = by[("full logits", tokens)], by[("label positions only", tokens)]
        full_mib, labels_mib = _positive(full["tracked peak MiB"]), _positive(labels["tracked peak MiB"])
        # the full way holds at least the float32 logits of every position; the other one far less
        assert full_mib * 2**20 >= tokens * vocab * 4 * 0.999, (full_mib, tokens)  # (MiB rounded to integers)
        assert labels_mib < full_mib
        # both ways give the same loss, run for real on the same inputs (printed to 9 significant digits)
        assert float(labels["loss (real)"]) == pytest.approx(_positive(full["loss (real)"]), rel=1e-5)
        for r in (full, labels):
            _positive(r["real peak MiB"])


def test_bench_packing_quick():
    rows = _run_script("bench_packing.py", "--quick", timeout=600)
    assert [(r["layout"], r["image share"]) for r in rows] == [
        ("padded", "0.5"), ("packed", "0.5"), ("padded / packed", "0.5"),
        ("padded", "0"), ("packed", "0"), ("padded / packed", "0")]
    for padded, packed in ((rows[0], rows[1]), (rows[3], rows[4])):
        # the same samples trained both ways, with less padding packed
        assert padded["real tokens"] == packed["real tokens"] and padded["micro-batches"] == packed["micro-batches"]
        assert float(packed["padding fraction"]) < _positive(padded["padding fraction"])
        _positive(padded["CPU s per 1,000 real tokens"]), _positive(packed["CPU s per 1,000 real tokens"])


def test_packing_padding_on_anyres_token_counts():
    from bench_packing import anyres_lengths, padding_table

    lengths = anyres_lengths(64, 0, 500, 1600, multi_share=0.1, text_share=0.05)
    assert 4000 < sorted(lengths)[32] < 9000  # AnyRes: one image at 500-1600 px is thousands of tokens
    for micro, _, padded, rows, one_row in padding_table(lengths, [2, 8], 32768):
        assert padded > 0.1 and rows <= 0.03 and one_row == 0.0, (micro, padded, rows)
