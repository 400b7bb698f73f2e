"""`make gpu-check`: rehearse a cluster node on one GPU machine that has only PyTorch installed.

Runs, without Ray, the per-worker loop Ray Train runs (``aov_dist.train.loop.run_training``: the
DeepSpeed strategy, ZeRO-3, the device placement, the loop's collectives, committed checkpoints),
one process per visible GPU over NCCL (gloo on CPU), and prints one JSON summary:

(a) stage-2 steps of a random-init model with the ``aov_0.5b`` dimensions (SigLIP-so400m + Qwen2
    0.5B, its 152k vocabulary), bf16, ZeRO-3, SDPA; FlashAttention-2 as well when ``flash_attn``
    imports, with its step-1 loss checked against SDPA's (same weights, same batch);
(b) tokens/s and MFU as the training loop logs them: its goodput ledger counts each step's model
    FLOPs (``aov_dist/model/flops.py``: training_flops of every micro-batch of every rank), and the
    bf16 matmul peak measured in the same run goes in as ``train.peak_flops_per_device``, so the
    summary's MFU is the loop's own ``mfu`` metric (on CPU the loop logs none: there the summary
    divides the loop's ``goodput/model_flops`` by the step time and the measured fp32 matmul peak);
(c) a checkpoint, a resume from it in a new engine, and the next step's loss compared with the
    uninterrupted run's (same weights and batch: equal up to kernel nondeterminism);
(d) one evaluation batch with ``generate`` through the evaluation backend on the checkpoint's hf/;
(e) packing (rank 0, one process, no DeepSpeed, the same preset and precision): a few micro-batches
    of synthetic stage-2 samples of varied lengths (AnyRes grids from 1x1 to 1x3, text lengths drawn
    from a seeded range) trained padded (``processor.collate``) and packed
    (``processor.collate_packed``: one row under FlashAttention-2 when ``flash_attn`` imports, else
    rows of up to data.max_length under SDPA), forward + backward on the same weights: real tokens/s
    of both layouts, their ratio, the padding fractions, and the first micro-batch's loss packed
    against padded (equal up to reduction order: rel 2e-2 in bf16, 1e-5 in fp32 on CPU).

Batches are synthetic and deterministic per (rank, position): one 768x768 image (a 2x2 AnyRes grid,
5 SigLIP views) plus ``--text-len`` random text tokens per sample (``aov_dist.train.synthetic``),
so a resumed loader hands out exactly the batches an uninterrupted one would.

    python benchmarks/gpu_check.py                 # every visible GPU, aov_0.5b, bf16
    python benchmarks/gpu_check.py --allow-cpu     # no CUDA: the same script at tiny size, 2 gloo ranks
    make gpu-check [GPU_CHECK_ARGS=...]            # installs the carried wheels first (make gpu-wheels)

Exit code: 0 when every check passed, 1 when one failed, 2 when there is no GPU (without --allow-cpu).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

NO_GPU = ("gpu-check: no CUDA device is visible. It rehearses a GPU cluster node and needs one; "
          "`make gpu-check GPU_CHECK_ARGS=--allow-cpu` runs the same script at tiny size on the CPU.")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA: tiny preset, fp32, 2 gloo ranks")
    p.add_argument("--world", type=int, default=None, help="ranks (default: every visible GPU; 2 on CPU)")
    p.add_argument("--preset", default=None, help="model preset (default aov_0.5b; tiny on CPU)")
    p.add_argument("--steps", type=int, default=6, help="training steps of the uninterrupted run (>= 3)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per rank and micro-step (default 4; 1 on CPU)")
    p.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--text-len", type=int, default=None, help="text tokens per sample (default 384; 64 on CPU)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 peak matmul (default 8192; 256 on CPU)")
    p.add_argument("--workdir", default=None, help="checkpoints go here (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (a checkpoint in the middle, a resumed step after it)")
    return args


# ----------------------------------------------------------------------------------- the config
MAX_LENGTH = 32768  # data.max_length of the runs, and the packed rows' limit of check (e)
PACK_MICRO, PACK_BATCHES, PACK_REPEATS = 4, 3, 2  # (e): samples per micro-batch, micro-batches, timed passes
PACK_GRIDS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3))  # (e): AnyRes grids the samples' images are cut into


def job_config(opts: dict, attn: str, run_name: str, resume_from: Optional[str] = None, peak_flops: float = 0.0):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from aov_dist.config import CONF_DIR, register_configs, to_typed

    gpu, world = opts["gpu"], opts["world"]
    cluster = (["cluster=h100", "cluster.nodes=1", f"cluster.workers_per_node={world}", f"cluster.gpus_per_node={world}",
                "cluster.accelerator_type=null"] if gpu else ["cluster=local", f"cluster.workers_per_node={world}"])
    overrides = [
        f"model={opts['preset']}", "model.pretrained_path=null", f"model.random_init={opts['preset'] != 'tiny'}",
        f"model.attn_implementation={attn}", f"model.activation_checkpointing={opts['grad_ckpt']}",
        "stage=stage2", "stage.require_init=false",
        # one step more than is run: the loop stops before its final save (the middle one is tested)
        f"stage.max_steps={opts['steps'] + 1}",
        f"stage.global_batch_size={opts['micro'] * world * opts['accum']}", f"data.micro_batch_size={opts['micro']}",
        "data.datasets=[{name: synthetic, manifest: in-memory, weight: 1.0}]", f"data.max_length={MAX_LENGTH}",
        "deepspeed=zero3", *cluster, "cluster.max_failures=0", "tracking.enabled=false",
        f"train.storage_path={opts['workdir']}", f"train.run_name={run_name}",
        f"train.checkpoint_every_steps={opts['checkpoint_at']}", "train.keep_checkpoints=5",
        # the loop's mfu metric (GPU runs only) divides by this
        f"train.peak_flops_per_device={peak_flops:.6e}",
    ]
    if resume_from:
        overrides.append(f"train.resume_from={resume_from}")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=overrides))


# ---------------------------------------------------------------------------------- one rank
def _train(opts: dict, attn: str, run_name: str, rank: int, world: int, stop_after: int, peak: float,
           resume_from: Optional[str] = None) -> dict[str, Any]:
    from aov_dist.train.loop import run_training
    from aov_dist.train.synthetic import synthetic_stage2_task

    steps: list[dict] = []
    t0 = time.perf_counter()
    if opts["gpu"]:
        torch.cuda.reset_peak_memory_stats()
    result = run_training(job_config(opts, attn, run_name, resume_from, peak), rank, world,
                          task=synthetic_stage2_task(opts["text_len"]),
                          stop_after=stop_after, on_step=lambda m: steps.append({**m, "t": time.perf_counter() - t0}))
    out = {"losses": result.losses, "checkpoints": result.checkpoints, "optimizer": result.optimizer,
           "first_step_s": steps[0]["t"] if steps else None, "steps": steps,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if opts["gpu"] else None}
    import gc

    gc.collect()
    if opts["gpu"]:
        torch.cuda.empty_cache()
    return out


def _speed(run: dict, opts: dict, peak: float) -> dict[str, Any]:
    """From the loop's per-step metrics: the median step of those after the first (the first
    includes start-up). The step time is the loop's own (samples / samples_per_s)."""
    later = run["steps"][1:]
    step_s = statistics.median(s["goodput/samples"] / s["samples_per_s"] for s in later)
    flops = statistics.median(s["goodput/model_flops"] for s in later)  # the same shape every step
    tokens = statistics.median(s["goodput/text_tokens"] + s["goodput/image_tokens"] for s in later)
    if all("mfu" in s for s in later):  # GPU: the loop's metric, against train.peak_flops_per_device
        mfu, source = statistics.median(s["mfu"] for s in later), "loop metric mfu"
    else:  # CPU: the loop logs no mfu; the same quotient against the measured CPU matmul peak
        mfu, source = flops / step_s / (peak * opts["world"]), "goodput/model_flops / step time / measured CPU peak"
    return {"step_ms_median": 1e3 * step_s, "samples_per_s": opts["global_batch"] / step_s,
            "tokens_per_s": tokens / step_s, "model_flops_per_step": flops, "mfu_pct": 100 * mfu,
            "mfu_source": source, "first_step_s": run["first_step_s"], "peak_mem_gib": run["peak_mem_gib"],
            "losses": run["losses"]}


def _eval_batch(hf_dir: str, device: str) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from aov_dist.eval.predictor import DETECTION_QUESTION, AnomalyOVBackend, first_question

    t0 = time.perf_counter()
    backend = AnomalyOVBackend(hf_dir, max_new_tokens=8, device=device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(768, 768), (512, 1024)]]
    replies = backend.generate(images, [[{"from": "human", "value": first_question(DETECTION_QUESTION)}]] * 2)
    scores = backend.image_scores(images)
    return {"replies": replies, "expert_scores": scores, "seconds": time.perf_counter() - t0,
            "device": str(backend.device)}


def _fwd_bwd_pass(model: torch.nn.Module, batches: list[dict], device: torch.device) -> tuple[float, float]:
    """Seconds of forward + backward over the micro-batches (no optimizer step: the weights stay
    the ones both layouts are compared on), and the first micro-batch's loss."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, first = time.perf_counter(), None
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        first = loss.detach() if first is None else first
    sync()
    return time.perf_counter() - t0, float(first)


def _packing(opts: dict, device: torch.device, dtype: torch.dtype, peak: float) -> dict[str, Any]:
    """Check (e): the same samples padded and packed, forward + backward on the same weights."""
    import gc

    import numpy as np

    import gpu_mfu
    from aov_dist.devices import move_to_device
    from aov_dist.model.anomaly_ov import HOST_INPUTS
    from aov_dist.model.presets import preset_dims
    from aov_dist.train.synthetic import synthetic_sample

    attn = "flash_attention_2" if opts["fa2"] else "sdpa"
    one_row = attn == "flash_attention_2"
    processor = gpu_mfu.benchmark_processor(opts["preset"])
    vocab = preset_dims(opts["preset"])["vocab_size"] or len(processor.tokenizer)
    rng = np.random.default_rng(0)
    low, high = min(64, opts["text_len"]), 2 * opts["text_len"]
    samples = [synthetic_sample(processor, vocab, int(rng.integers(low, high + 1)), seed=i,
                                grid=PACK_GRIDS[int(rng.integers(len(PACK_GRIDS)))])
               for i in range(PACK_MICRO * PACK_BATCHES)]
    groups = [samples[i:i + PACK_MICRO] for i in range(0, len(samples), PACK_MICRO)]
    host = {"padded": [processor.collate(g) for g in groups],
            "packed": [processor.collate_packed(g, MAX_LENGTH, one_row=one_row) for g in groups]}
    config = gpu_mfu.benchmark_config(opts["preset"], vocab, processor.adverb_token_ids)
    flops = {name: gpu_mfu.step_model_flops(config, batches) for name, batches in host.items()}
    real = sum(len(s["input_ids"]) for s in samples)

    def to_device(b: dict) -> dict:
        # the training path's one move (layout metadata stays on the host, as in the loop)
        b = move_to_device(b, device, keep_on_host=HOST_INPUTS)
        b["pixel_values"] = b["pixel_values"].to(dtype)
        return b

    layouts = {name: [to_device(b) for b in batches] for name, batches in host.items()}
    model = gpu_mfu.build_benchmark_model(opts["preset"], vocab, processor.adverb_token_ids, attn, device, dtype,
                                          grad_ckpt=opts["grad_ckpt"])
    model.stage_parameter_groups("stage2")

    losses = {name: _fwd_bwd_pass(model, batches, device)[1] for name, batches in layouts.items()}  # + warm-up
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(PACK_REPEATS):  # alternating, so drifts hit both layouts alike
        for name, batches in layouts.items():
            seconds[name].append(_fwd_bwd_pass(model, batches, device)[0])
    del model, layouts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    out: dict[str, Any] = {"attn": attn, "layout": "one row" if one_row else f"rows of <= {MAX_LENGTH} tokens",
                           "micro_batch": PACK_MICRO, "micro_batches": PACK_BATCHES,
                           "sample_tokens": sorted(len(s["input_ids"]) for s in samples), "real_tokens": real,
                           "timing": f"forward + backward, best of {PACK_REPEATS} passes after a warm-up pass"}
    for name, batches in host.items():
        best = min(seconds[name])
        out[name] = {"seconds": best, "tokens_per_s": real / best,
                     "padding_fraction": 1 - real / sum(b["input_ids"].numel() for b in batches),
                     "rows": sum(int(b["input_ids"].shape[0]) for b in batches), "model_flops": flops[name],
                     "mfu_pct": 100 * flops[name] / best / peak, "loss_first_micro_batch": losses[name]}
    out["packed_over_padded_tokens_per_s"] = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    a, b = losses["padded"], losses["packed"]
    out["loss_rel_diff"] = abs(b - a) / abs(a)
    out["loss_rel_tol"] = 2e-2 if dtype == torch.bfloat16 else 1e-5
    return out


def rank_main(rank: int, world: int, port: int, opts: dict, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR=opts["accelerator"])
    import torch.distributed as dist

    import gpu_mfu

    if opts["gpu"]:
        torch.cuda.set_device(rank)  # what Ray Train does for its workers
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if opts["gpu"] else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if opts["gpu"] else torch.device("cpu")
    try:
        dtype = torch.bfloat16 if opts["gpu"] else torch.float32
        peak = gpu_mfu.matmul_peak_flops(device, dtype, opts["matmul_size"])
        c, n = opts["checkpoint_at"], opts["steps"]
        runs = {"sdpa": _train(opts, "sdpa", "sdpa", rank, world, stop_after=n, peak=peak)}
        resumed = _train(opts, "sdpa", "sdpa", rank, world, stop_after=c + 1, peak=peak,
                         resume_from=runs["sdpa"]["checkpoints"][0])
        if opts["fa2"]:
            runs["flash_attention_2"] = _train(opts, "flash_attention_2", "fa2", rank, world, stop_after=n, peak=peak)
        summary: dict[str, Any] = {"peak_tflops": peak / 1e12}
        if rank == 0:
            summary["eval"] = _eval_batch(f"{runs['sdpa']['checkpoints'][0]}/hf", str(device))
            summary["packing"] = _packing(opts, device, dtype, peak)
        dist.barrier()
        summary.update(runs=runs, resumed=resumed)
        if rank == 0:
            Path(out_path).write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- summary
def summarize(raw: dict, opts: dict) -> dict[str, Any]:
    import gpu_mfu
    from aov_dist.model.flops import batch_shape
    from aov_dist.model.presets import preset_dims

    processor = gpu_mfu.benchmark_processor(opts["preset"])
    vocab = preset_dims(opts["preset"])["vocab_size"] or len(processor.tokenizer)
    micro_batch = gpu_mfu.make_batch(processor, vocab, opts["micro"], opts["text_len"])  # the loader's shape
    seq_len = batch_shape(micro_batch).sample_lengths[0]
    # what the loop's ledger must have counted: every micro-batch of every rank (aov_dist/model/flops.py)
    config = gpu_mfu.benchmark_config(opts["preset"], vocab, processor.adverb_token_ids)
    step_flops = gpu_mfu.step_model_flops(config, [micro_batch]) * opts["world"] * opts["accum"]
    peak = raw["peak_tflops"] * 1e12
    runs = {attn: _speed(run, opts, peak) for attn, run in raw["runs"].items()}
    packing = raw["packing"]
    c = opts["checkpoint_at"]
    uninterrupted, resumed = raw["runs"]["sdpa"]["losses"][c], raw["resumed"]["losses"][c]
    resume = {"checkpoint_step": c, "next_step": c + 1, "loss_uninterrupted": uninterrupted, "loss_resumed": resumed,
              "rel_diff": abs(resumed - uninterrupted) / abs(uninterrupted)}
    checks = {
        "losses_finite": all(math.isfinite(x) for r in runs.values() for x in r["losses"]),
        # bf16 kernels may reduce in another order after a reload; fp32 on CPU is exact
        "resume_equals_uninterrupted": resume["rel_diff"] <= (1e-3 if opts["gpu"] else 1e-6),
        "eval_generates_text": len(raw["eval"]["replies"]) == 2 and all(isinstance(r, str) for r in raw["eval"]["replies"]),
        "loop_flops_equal_flops_py": all(r["model_flops_per_step"] == step_flops for r in runs.values()),
        "packed_loss_equals_padded": packing["loss_rel_diff"] <= packing["loss_rel_tol"],
    }
    fa2 = None
    if "flash_attention_2" in runs:
        a, b = runs["sdpa"]["losses"][0], runs["flash_attention_2"]["losses"][0]
        fa2 = {"loss_step1_sdpa": a, "loss_step1_fa2": b, "rel_diff": abs(a - b) / abs(a)}
        checks["flash_attention_2_matches_sdpa"] = fa2["rel_diff"] <= 1e-2
    import deepspeed
    import transformers

    return {
        "ok": all(checks.values()), "checks": checks,
        "device": torch.cuda.get_device_name(0) if opts["gpu"] else "CPU", "world": opts["world"],
        "backend": "nccl" if opts["gpu"] else "gloo", "accelerator": opts["accelerator"],
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "deepspeed": deepspeed.__version__},
        "preset": opts["preset"], "precision": "bf16" if opts["gpu"] else "fp32", "zero_stage": 3,
        "optimizer": raw["runs"]["sdpa"]["optimizer"], "grad_ckpt": opts["grad_ckpt"],
        "sample": {"image": "768x768 (2x2 AnyRes grid, 5 views)", "text_tokens": opts["text_len"],
                   "seq_len": seq_len, "micro_batch": opts["micro"], "accum": opts["accum"],
                   "global_batch": opts["global_batch"]},
        "flops_per_step": step_flops, "flops_rule": "aov_dist/model/flops.py training_flops, stage2",
        "peak_tflops_measured": raw["peak_tflops"],
        "runs": runs,
        "flash_attention_2": fa2 or ("skipped: flash_attn not importable" if opts["gpu"] else "skipped: CPU"),
        "resume": resume, "eval": raw["eval"], "packing": packing,
    }


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        print(NO_GPU, file=sys.stderr)
        return 2
    import importlib.util

    import torch.multiprocessing as mp

    world = args.world or (torch.cuda.device_count() if gpu else 2)
    micro = args.micro_batch or (4 if gpu else 1)
    opts = {"gpu": gpu, "world": world, "accelerator": "cuda" if gpu else "cpu",
            "preset": args.preset or ("aov_0.5b" if gpu else "tiny"), "steps": args.steps,
            "checkpoint_at": args.steps // 2, "micro": micro, "accum": args.accum, "global_batch": micro * world * args.accum,
            "text_len": args.text_len or (384 if gpu else 64), "grad_ckpt": args.grad_ckpt,
            "matmul_size": args.matmul_size or (8192 if gpu else 256),
            "fa2": gpu and importlib.util.find_spec("flash_attn") is not None}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aov-gpu-check-") as tmp:
        opts["workdir"] = args.workdir or tmp
        raw_path = os.path.join(tmp, "raw.json")
        from common import free_port

        mp.spawn(rank_main, args=(world, free_port(), opts, raw_path), nprocs=world, join=True)
        summary = summarize(json.loads(Path(raw_path).read_text()), opts)
    summary["wall_s"] = time.perf_counter() - t0
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
