"""Packing benchmark: padding fraction on AnyRes token counts, and CPU step time per 1,000 real
tokens, padded vs packed, side by side in one run.

1. Padding fraction (no model, exact layout arithmetic): token counts of stage-2 samples laid out
   by the aov_0.5b processor (SigLIP 384 px, anyres_max_9, the expert's anomaly tokens) through
   ``processor.count_tokens``, the same code that lays out real samples. Image sizes are drawn
   uniformly per side in [--min-side, --max-side] px (VisA's and MVTec's images are 700-1600 px);
   --multi-share of the samples hold two images (one view each), --text-share none; answers are
   5-120 words. Micro-batches of consecutive samples of a seeded order, as the loader forms them.
   For each micro-batch size: padded (every sample padded to the micro-batch's longest), packed
   into rows of at most --max-length (SDPA; rows padded to the longest row) and packed into one
   row (FlashAttention-2's varlen layout, no padding by construction).
2. Step time (tiny model, fp32, CPU, one process, no DeepSpeed): the same micro-batches of real
   encoded samples (tiny processor; --image-share of them hold one image of a random size, the rest
   are text; answers of 5-120 words, so lengths vary) trained padded and packed,
   forward + backward + SGD step, alternating the two layouts per repeat; median seconds per 1,000
   real tokens.

    python benchmarks/bench_packing.py            # both parts, prints markdown tables
    python benchmarks/bench_packing.py --quick    # small sizes (the test's path)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fmt, machine, machine_line, markdown_table  # noqa: E402

from aov_dist.data.packing import pack_rows, padding_fraction  # noqa: E402
from aov_dist.model import ModelConfig, build_model  # noqa: E402
from aov_dist.model.presets import preset_dims, tiny_processor  # noqa: E402

WORDS = ("scratch", "crack", "dent", "stain", "missing", "part", "surface", "left", "top", "edge", "normal")


def answer(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(5, 121))))


def conversation(rng: np.random.Generator, images: int) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>" * images + "\nIs there any defect? Explain."},
            {"from": "gpt", "value": answer(rng)}]


def anyres_lengths(n: int, seed: int, min_side: int, max_side: int, multi_share: float, text_share: float) -> list[int]:
    """Token counts of n stage-2 samples under the aov_0.5b layout (see the module docstring)."""
    proc = tiny_processor(preset_dims("aov_0.5b"))
    rng = np.random.default_rng(seed)
    lengths = []
    for _ in range(n):
        u = rng.random()
        images = 0 if u < text_share else 2 if u < text_share + multi_share else 1
        sizes = [tuple(int(x) for x in rng.integers(min_side, max_side + 1, size=2)) for _ in range(images)]
        lengths.append(proc.count_tokens(sizes, conversation(rng, images)))
    return lengths


def padding_table(lengths: list[int], micro_sizes: list[int], max_length: int) -> list[list]:
    rows = []
    for micro in micro_sizes:
        padded_slots = packed_slots = real = 0
        for start in range(0, len(lengths) - micro + 1, micro):
            mb = lengths[start:start + micro]
            real += sum(mb)
            padded_slots += max(mb) * micro
            layout = pack_rows(mb, max_length)
            packed_slots += sum(mb) / (1.0 - padding_fraction(mb, layout))
        rows.append([micro, max_length, 1 - real / padded_slots, 1 - real / packed_slots, 0.0])
    return rows


def step_time(micro: int, batches: int, repeats: int, max_length: int, seed: int, image_share: float) -> list[list]:
    from PIL import Image

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model, proc = build_model(ModelConfig(preset="tiny"))
    model.stage_parameter_groups("stage2")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(micro * batches):
        images = int(rng.random() < image_share)
        pics = [Image.fromarray(rng.integers(0, 255, (int(rng.integers(60, 330)), int(rng.integers(60, 330)), 3),
                                             dtype=np.uint8)) for _ in range(images)]
        samples.append(proc.encode_conversation(pics, conversation(rng, images), max_length))
    groups = [samples[i:i + micro] for i in range(0, len(samples), micro)]
    layouts = {"padded": [proc.collate(g) for g in groups],
               "packed": [proc.collate_packed(g, max_length) for g in groups]}
    real = sum(len(s["input_ids"]) for s in samples)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, batches_ in layouts.items():
            t0 = time.perf_counter()
            for batch in batches_:
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    out = []
    for name, batches_ in layouts.items():
        slots = sum(b["input_ids"].numel() for b in batches_)
        med = statistics.median(times[name][1:] if repeats > 2 else times[name])
        out.append([name, image_share, micro, len(groups), real, 1 - real / slots, med / real * 1000])
    ratio = out[0][-1] / out[1][-1]
    return out + [["padded / packed", image_share, "", "", "", "", ratio]]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=500)
    ap.add_argument("--max-side", type=int, default=1600)
    ap.add_argument("--multi-share", type=float, default=0.1)
    ap.add_argument("--text-share", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=32768)
    ap.add_argument("--micro", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--step-micro", type=int, default=4)
    ap.add_argument("--step-batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step-max-length", type=int, default=2048)
    ap.add_argument("--image-share", type=float, nargs="+", default=[0.5, 0.0],
                    help="share of step-time samples with one image (the tiny vision tower costs as much "
                         "as its tiny LLM, so the text-only row shows the LLM's part alone)")
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds")
    a = ap.parse_args(argv)
    if a.quick:
        a.samples, a.step_batches, a.repeats = 64, 3, 2
    print(machine_line(machine()))
    lengths = anyres_lengths(a.samples, a.seed, a.min_side, a.max_side, a.multi_share, a.text_share)
    print(f"\nAnyRes token counts (aov_0.5b layout): {len(lengths)} samples, median {int(np.median(lengths))}, "
          f"min {min(lengths)}, max {max(lengths)}\n")
    print(markdown_table(["micro-batch", "max_length", "padding padded", "padding packed rows (SDPA)",
                          "padding packed one row (FA2)"],
                         [[m, L, fmt(p, 4), fmt(q, 4), fmt(r, 4)] for m, L, p, q, r in
                          padding_table(lengths, a.micro, a.max_length)]))
    print()
    rows = [row for share in a.image_share for row in step_time(a.step_micro, a.step_batches, a.repeats,
                                                                a.step_max_length, a.seed, share)]
    print(markdown_table(["layout", "image share", "micro-batch", "micro-batches", "real tokens",
                          "padding fraction", "CPU s per 1,000 real tokens"],
                         [[n, i, m, b, r, fmt(p, 4) if p != "" else "", fmt(s, 4)] for n, i, m, b, r, p, s in rows]))


if __name__ == "__main__":
    main()
