"""GPU benchmark: stage-2 training steps of Anomaly-OV, tokens/s, samples/s, peak memory and MFU.

Runs on one CUDA device with only torch, transformers and Pillow installed (numpy, tokenizers and
huggingface_hub come with transformers; Pillow does not, and aov_dist.model's processor and the
PIL image processor import it): it imports `aov_dist.model` from this checkout (and
`aov_dist.train.synthetic`, which imports only that), nothing else.
    pip install torch==2.13.0 transformers==5.24.0 pillow==13.0.0   # flash-attn optional

What a step is: the preset (default ``aov_0.5b``) built with random init directly on the device
(no download), stage-2 trainable groups (projector + image_newline + LLM and LM head; vision tower
and expert frozen), AdamW (fused on CUDA) over those groups, and per step
``model(**batch).loss.backward(); optimizer.step(); zero_grad()``. Every sample holds one image at
a 2 x 2 AnyRes grid (an image of 2x2 base views, so 5 SigLIP views) and ``--seq-len`` text tokens
(synthetic ids; the tiny local tokenizer lays out the chat text, the vocabulary is the preset's,
so the LM head costs what it costs in the real model). Parameters are held in ``--dtype`` and
AdamW keeps its state in that dtype too (no fp32 master copy as DeepSpeed bf16 keeps, so peak
memory is lower than a DeepSpeed run; the FLOPs are the same).

Model FLOPs per step: ``aov_dist.model.flops.training_flops(model.config, batch_shape(batch),
"stage2")`` summed over the step's micro-batches (here one, of ``--batch-size`` samples): the rule
the training loop's goodput ledger uses for its ``mfu`` metric, tested exactly against torch's
FlopCounterMode. aov_dist/model/flops.py's docstring says what it counts (the matmuls of the
forward and of the gradients each part needs: frozen tower and expert forward only, the LM head on
label positions only, attention per sample; no padding, no recomputation from --grad-ckpt).
The output breaks the step's count down per component (flops_breakdown). ``--check-flops`` also
counts one step with FlopCounterMode, with SDPA's math kernel (fused kernels add a backward
recomputation that model FLOPs exclude; FlashAttention-2's kernels are invisible to the counter).

MFU = (model FLOPs per step / step time) / peak, where the peak is MEASURED: the best of several
timed ``--matmul-size``^3 matmuls in ``--dtype`` on the device (or ``--peak-tflops`` if given).

    python benchmarks/gpu_mfu.py                       # aov_0.5b, bf16, cuda; flash-attn and SDPA rows
    python benchmarks/gpu_mfu.py --batch-size 8 --seq-len 512 --attn sdpa
    python benchmarks/gpu_mfu.py --toy                 # tiny preset, fp32, CPU, 3 steps (the test's path)
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as a script from anywhere: import the package of this checkout (no install needed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from aov_dist.model.anomaly_ov import AnomalyOVForConditionalGeneration  # noqa: E402
from aov_dist.model.flops import BatchShape, Cost, batch_shape, flops_breakdown, training_flops  # noqa: E402
from aov_dist.model.presets import build_config, preset_dims, resolve_dtype, tiny_processor  # noqa: E402
from aov_dist.model.processor import AnomalyOVProcessor  # noqa: E402
from aov_dist.train.synthetic import GRID, synthetic_sample  # noqa: E402  (GRID: every benchmark image's crops)
TABLE_COLUMNS = ("attn", "tokens/s", "samples/s", "step_ms", "TFLOP/s", "peak_TFLOP/s", "MFU_%", "peak_mem_GiB")
STAGE = "stage2"


# ------------------------------------------------------------------------------------------ FLOPs
def _shape(config, batch: dict[str, torch.Tensor]) -> BatchShape:
    return batch_shape(batch, config.vision_dummy_for_text_only)


def step_model_flops(config, micro_batches: list[dict[str, torch.Tensor]]) -> int:
    """Model FLOPs of one optimizer step: aov_dist.model.flops.training_flops of each micro-batch."""
    return sum(training_flops(config, _shape(config, b), STAGE) for b in micro_batches)


def step_flops_breakdown(config, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Cost]:
    """The same count per component (vision_tower, expert, projector, llm, lm_head): forward, backward."""
    total: dict[str, Cost] = {}
    for b in micro_batches:
        for name, c in flops_breakdown(config, _shape(config, b), STAGE).items():
            prev = total.get(name, Cost(0, 0))
            total[name] = Cost(prev.forward + c.forward, prev.backward + c.backward)
    return total


def count_step_flops(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward + backward as torch's FlopCounterMode counts them, with SDPA's math
    kernel (attention as matmuls, what flops.py counts). Equal to step_model_flops for sdpa and
    eager; flash-attn's own kernels are invisible to the counter. A cross-check, not used for MFU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------- inputs
def benchmark_processor(preset: str) -> AnomalyOVProcessor:
    """The preset's image processor and token layout with the tiny local tokenizer (ids < 1024)."""
    return tiny_processor(preset_dims(preset))


def make_batch(
    processor: AnomalyOVProcessor, vocab_size: int, batch_size: int, text_len: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """`batch_size` samples of one 2x2-grid image and exactly `text_len` text tokens each
    (aov_dist.train.synthetic: a detection exchange in the real token layout, lengthened with random
    ids over the model vocabulary as training targets), collated (all the same length: no padding)."""
    try:
        sample = synthetic_sample(processor, vocab_size, text_len, seed=seed, grid=GRID)
    except ValueError as exc:  # too short for the chat layout: say it in the CLI's words
        raise ValueError(str(exc).replace(f"text_len {text_len}", f"--seq-len {text_len}")) from None
    return processor.collate([sample] * batch_size)


# -------------------------------------------------------------------------------------- the model
def benchmark_config(preset: str, vocab_size: int, adverb_ids: list[int]):
    """The model config of the benchmark model (what its FLOPs are counted from)."""
    return build_config(preset, {"vocab_size": vocab_size}, adverb_token_ids=adverb_ids)


def build_benchmark_model(
    preset: str, vocab_size: int, adverb_ids: list[int], attn: str, device: torch.device, dtype: torch.dtype,
    seed: int = 0, grad_ckpt: bool = False,
) -> AnomalyOVForConditionalGeneration:
    """Random init, constructed on `device` (no host copy of the weights)."""
    config = benchmark_config(preset, vocab_size, adverb_ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AnomalyOVForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    model.to(device)  # a no-op when construction honoured the device context
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10, inner: int = 10) -> float:
    """Best achieved FLOP/s of an n x n x n matmul (2 n^3 FLOPs), `inner` back-to-back per timing."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * inner / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process max RSS


@dataclass
class BenchResult:
    attn: str
    tokens_per_s: float
    samples_per_s: float
    step_ms: float
    achieved_tflops: float
    peak_tflops: float
    mfu_pct: float
    peak_mem_gib: float
    final_loss: float
    model_flops_per_step: int  # aov_dist.model.flops.training_flops of the step's micro-batch(es)
    counted_flops_per_step: int | None = None  # FlopCounterMode cross-check (--check-flops)

    def row(self) -> tuple[str, ...]:
        return (self.attn, f"{self.tokens_per_s:.1f}", f"{self.samples_per_s:.3f}", f"{self.step_ms:.1f}",
                f"{self.achieved_tflops:.4g}", f"{self.peak_tflops:.4g}", f"{self.mfu_pct:.2f}",
                f"{self.peak_mem_gib:.2f}")


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_one(args: argparse.Namespace, attn: str, processor: AnomalyOVProcessor, vocab_size: int,
            batch: dict[str, torch.Tensor], step_flops: int, step_tokens: int, peak: float,
            device: torch.device, dtype: torch.dtype) -> BenchResult:
    """Time ``args.steps`` optimizer steps on ``batch``; ``step_flops`` and ``step_tokens`` (real
    tokens) are the step's model FLOPs and tokens, counted on the host batch beforehand."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_benchmark_model(args.preset, vocab_size, processor.adverb_token_ids, attn, device, dtype,
                                  seed=args.seed, grad_ckpt=args.grad_ckpt)
    groups = model.stage_parameter_groups("stage2")
    optimizer = torch.optim.AdamW([{"params": params} for params in groups.values()], lr=1e-5,
                                  fused=device.type == "cuda")
    counted = count_step_flops(model, batch) if args.check_flops else None
    for _ in range(args.warmup):
        _train_step(model, optimizer, batch)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = _train_step(model, optimizer, batch)
    _sync(device)
    elapsed = time.perf_counter() - start
    final_loss = float(loss)
    if not math.isfinite(final_loss):
        raise RuntimeError(f"attn={attn}: training loss is {final_loss} after {args.warmup + args.steps} steps")
    peak_mem = _peak_memory_gib(device)
    del model, optimizer, groups
    gc.collect()
    per_step = elapsed / args.steps
    achieved = step_flops / per_step
    return BenchResult(
        attn=attn, tokens_per_s=step_tokens / per_step, samples_per_s=args.batch_size / per_step,
        step_ms=per_step * 1e3, achieved_tflops=achieved / 1e12, peak_tflops=peak / 1e12,
        mfu_pct=100 * achieved / peak, peak_mem_gib=peak_mem, final_loss=final_loss,
        model_flops_per_step=step_flops, counted_flops_per_step=counted,
    )


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="tiny preset, fp32, CPU, 3 steps: the same code path on a CPU")
    p.add_argument("--preset", default=None, help="model preset (default aov_0.5b; tiny with --toy)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda; cpu with --toy)")
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default bf16; fp32 with --toy)")
    p.add_argument("--attn", default="both", choices=["both", "flash_attention_2", "sdpa", "eager"],
                   help="both = flash_attention_2 and sdpa rows when flash_attn imports, else sdpa only")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --toy)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 3; 1 with --toy)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 4; 1 with --toy)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="text tokens per sample; the image's tokens come on top (default 384; 64 with --toy)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="n of the n^3 peak matmul (default 8192; 256 with --toy)")
    p.add_argument("--peak-tflops", type=float, default=None, help="use this peak instead of measuring one")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="activation checkpointing (recompute is not in model FLOPs)")
    p.add_argument("--check-flops", action="store_true",
                   help="also count one step's FLOPs with FlopCounterMode (SDPA math kernel): equal to the "
                        "reported model FLOPs for sdpa and eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    defaults = dict(preset="tiny", device="cpu", dtype="fp32", steps=3, warmup=1, batch_size=1, seq_len=64,
                    matmul_size=256) if args.toy else \
        dict(preset="aov_0.5b", device="cuda", dtype="bf16", steps=20, warmup=3, batch_size=4, seq_len=384,
             matmul_size=8192)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "batch_size", "seq_len", "matmul_size"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    return args


def attn_rows(requested: str, device: torch.device) -> tuple[list[str], str | None]:
    """The attention implementations to time, and a note when flash-attn had to be left out."""
    if requested != "both":
        return [requested], None
    if device.type != "cuda":
        return ["sdpa"], "flash-attn needs CUDA: SDPA row only"
    try:
        importlib.import_module("flash_attn")
    except Exception as exc:  # not installed, or built against another torch/CUDA
        return ["sdpa"], f"flash_attn not importable ({type(exc).__name__}: {exc}): SDPA row only"
    return ["flash_attention_2", "sdpa"], None


def format_table(results: list[BenchResult]) -> str:
    rows = [TABLE_COLUMNS, *(r.row() for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[BenchResult]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (use --toy for the CPU path)")
    dtype = resolve_dtype(args.dtype)
    attns, note = attn_rows(args.attn, device)

    processor = benchmark_processor(args.preset)
    dims = preset_dims(args.preset)
    vocab_size = dims["vocab_size"] or len(processor.tokenizer)
    try:
        host_batch = make_batch(processor, vocab_size, args.batch_size, args.seq_len, seed=args.seed)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    # Model FLOPs and real tokens of a step, on the host batch (aov_dist/model/flops.py)
    config = benchmark_config(args.preset, vocab_size, processor.adverb_token_ids)
    shape = _shape(config, host_batch)
    step_flops = step_model_flops(config, [host_batch])
    breakdown = step_flops_breakdown(config, [host_batch])
    step_tokens = sum(shape.sample_lengths)
    batch = {k: v.to(device) for k, v in host_batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak_flops(device, dtype, args.matmul_size)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} | torch {torch.__version__} | preset {args.preset} | {args.dtype} | "
          f"batch {args.batch_size} | steps {args.steps} (+{args.warmup} warm-up) | grad_ckpt {args.grad_ckpt}")
    print(f"sample: 1 image at a {GRID[0]}x{GRID[1]} AnyRes grid ({shape.views // args.batch_size} SigLIP views), "
          f"{args.seq_len} text tokens, LLM sequence {shape.sample_lengths[0]} tokens, "
          f"{shape.label_positions // args.batch_size} label positions")
    print(f"model FLOPs/step: {step_flops:.4g} = aov_dist.model.flops.training_flops(config, batch_shape(batch), "
          f"'{STAGE}') (see aov_dist/model/flops.py)")
    print("  by component, forward + backward: " + ", ".join(
        f"{k} {c.forward:.4g} + {c.backward:.4g}" for k, c in breakdown.items()))
    peak_how = "given by --peak-tflops" if args.peak_tflops else \
        f"measured: best {args.matmul_size}^3 {args.dtype} matmul"
    print(f"peak: {peak / 1e12:.4g} TFLOP/s ({peak_how})")
    if device.type != "cuda":
        print("note: CPU run: peak_mem_GiB is the process max RSS, not device memory")
    if note:
        print(f"note: {note}")

    results = []
    for attn in attns:
        result = run_one(args, attn, processor, vocab_size, batch, step_flops, step_tokens, peak, device, dtype)
        results.append(result)
        counted = "" if result.counted_flops_per_step is None else \
            f", FlopCounterMode (SDPA math kernel) {result.counted_flops_per_step:.4g} vs flops.py " \
            f"{step_flops:.4g} FLOPs/step" + (" (flash-attn kernels not counted)" if attn == "flash_attention_2" else "")
        print(f"{attn}: final loss {result.final_loss:.4f}{counted}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "batch_shape": asdict(shape), "model_flops_per_step": step_flops,
            "flops_breakdown": {k: c._asdict() for k, c in breakdown.items()},
            "results": [asdict(r) for r in results]}, indent=2))
    print()
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
