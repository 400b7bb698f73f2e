"""Loss memory benchmark: peak memory of the causal-LM loss of one packed row, full logits vs the
LM head on labelled positions only.

The computation measured is the loss's forward and its backward to the hidden states and the
LM-head weight, for one packed row of --tokens positions with the aov_0.5b sizes (hidden 896,
vocabulary 152000; an ``nn.Linear(hidden, vocab, bias=False)``: tied embeddings change nothing
here), hidden states and weight in bf16 (the GPU training dtype). --samples samples share the
row equally; each ends with a contiguous run of labelled (assistant) tokens, --label-positions
in all (labels -100 elsewhere). Two ways:

* full logits: transformers' way, ``logits = lm_head(hidden)`` at every position, then
  ``transformers.loss.loss_utils.ForCausalLMLoss`` (float32 upcast, shift, mean cross-entropy
  with ignore_index -100). The bf16 logits are dropped before the backward, as the training step
  does (it keeps only ``.loss`` of the model's output; so does the HF Trainer).
* label positions only: ``aov_dist.model.loss.label_positions_loss`` (the head on the positions
  whose next token has a label).

Memory is measured two ways:

1. tracked: the peak of live tensor bytes, the computation run under ``FakeTensorMode`` (shapes
   and dtypes only: nothing is allocated or computed). A dispatch mode adds the bytes of every
   tensor storage an operator creates and subtracts them when the storage dies (a weakref
   finalizer); the peak is taken after every operator, with its output allocated and its inputs
   still alive, as a GPU caching allocator sees it. It counts everything created from the start of
   the loss's forward to the end of its backward: logits, their float32 copy, log-softmax, the
   gradients of the backward, the index tensors, and the gradients of the hidden states and of
   the weight that the backward leaves behind; it excludes the inputs (hidden states, weight,
   labels), kernel workspaces and allocator fragmentation. A fake tensor has no data, so a
   boolean selection (data-dependent shape) is given the count of labelled positions, which the
   script built itself.
2. real: the same computation run for real in a fresh subprocess, at sizes that fit this machine
   (--real-tokens, both ways; and label positions only at --tokens): the increase of its peak
   resident memory over its resident memory with the inputs built (the peak is reset just
   before through /proc/self/clear_refs; where that fails, ru_maxrss). Rows whose tracked peak
   plus inputs exceed --max-real-gib are not run. At --real-tokens the labelled positions are
   scaled with the row (the same labelled share as --tokens). The losses of both ways come from
   these real runs, on the same inputs (seeded), so the table shows that they agree.

    .venv/bin/python benchmarks/bench_loss_memory.py            # 32768 tokens; real at 2048, 4096
    .venv/bin/python benchmarks/bench_loss_memory.py --quick    # small sizes, seconds (the test's path)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import child_env, machine, machine_line, markdown_table  # noqa: E402

FULL = "full logits"
LABELS = "label positions only"
MiB = 2**20
GiB = 2**30


def label_layout(tokens: int, labelled: int, samples: int) -> list[tuple[int, int]]:
    """[start, end) runs of labelled positions: ``samples`` equal samples in the row, each ending
    with its share of ``labelled`` positions (the assistant's answer)."""
    if not 0 < samples <= tokens:
        raise ValueError(f"--samples {samples} must be in [1, tokens={tokens}]")
    length = tokens // samples
    runs = []
    for s in range(samples):
        start = s * length
        end = tokens if s == samples - 1 else start + length
        n = labelled // samples + (1 if s < labelled % samples else 0)
        if n >= end - start:  # the first position of a sample is its prompt
            raise ValueError(f"{labelled} labelled positions do not fit {samples} samples of {length} tokens")
        runs.append((end - n, end))
    return runs


def make_inputs(tokens: int, labelled: int, samples: int, hidden_size: int, vocab: int, seed: int = 0):
    """hidden [1, tokens, hidden] (bf16, requires grad), labels [1, tokens], the head (bf16): real
    tensors, or fake ones under FakeTensorMode. Random draws come before the labels are set."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden_size, vocab, bias=False, dtype=torch.bfloat16, device="meta")  # no init here:
    weight = torch.empty(vocab, hidden_size, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)  # Qwen2's
    head.weight = nn.Parameter(weight)  # initializer_range
    hidden = torch.randn(1, tokens, hidden_size, generator=gen).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels = torch.full((1, tokens), -100, dtype=torch.long)
    for start, end in label_layout(tokens, labelled, samples):
        labels[0, start:end] = ids[0, start:end]
    return hidden, labels, head


def loss_forward_backward(method: str, hidden, labels, head, vocab: int):
    """The computation measured: the loss's forward and backward (grads on hidden and the weight)."""
    if method == FULL:
        from transformers.loss.loss_utils import ForCausalLMLoss

        logits = head(hidden)
        loss = ForCausalLMLoss(logits, labels, vocab)
        del logits  # the training step keeps only the output's .loss
    else:
        from aov_dist.model.loss import label_positions_loss

        loss = label_positions_loss(hidden, labels, head)
    loss.backward()
    return loss.detach()


def _bool_index_tracker():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    aten = torch.ops.aten
    indexing = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

    class StorageTracker(TorchDispatchMode):
        """Live bytes of the tensor storages created by operators while active (see the module
        docstring); ``selected``: the True count of every boolean mask used as an index."""

        def __init__(self, existing: list, selected: Optional[int]):
            super().__init__()
            self.selected = selected
            self.live = self.peak = 0
            self.peak_op = ""
            self._seen: dict[int, Any] = {}
            for t in existing:  # the inputs: their storages (and views of them) count nothing
                st = t.untyped_storage()
                self._seen[id(st)] = weakref.ref(st)

        def _free(self, key: int, nbytes: int) -> None:
            self.live -= nbytes
            self._seen.pop(key, None)

        def _long_indices(self, indices):
            out = []
            for i in indices:
                if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8):
                    if self.selected is None:
                        raise RuntimeError("boolean index under FakeTensorMode: pass its True count")
                    # what the kernel's nonzero would make: one long index per mask dimension
                    out += [torch.zeros(self.selected, dtype=torch.long, device=i.device) for _ in range(i.dim())]
                else:
                    out.append(i)
            return out

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in indexing:
                args = (args[0], self._long_indices(args[1]), *args[2:])
            out = func(*args, **kwargs)
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                key = id(st)
                ref = self._seen.get(key)
                if ref is not None and ref() is st:
                    continue
                nbytes = int(st.nbytes())
                self._seen[key] = weakref.ref(st)
                weakref.finalize(st, self._free, key, nbytes)
                self.live += nbytes
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, str(func.overloadpacket.__name__)
            return out

    return StorageTracker


def tracked_peak(method: str, tokens: int, labelled: int, samples: int, hidden_size: int, vocab: int) -> dict:
    """Peak live bytes beyond the inputs under FakeTensorMode (no memory used)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden, labels, head = make_inputs(tokens, labelled, samples, hidden_size, vocab)
        tracker = _bool_index_tracker()([hidden, labels, head.weight], selected=labelled)
        with tracker:
            loss_forward_backward(method, hidden, labels, head, vocab)
        gc.collect()
        if hidden.grad is None or head.weight.grad is None:
            raise RuntimeError(f"{method}: the backward left no gradient")
        return {"peak": tracker.peak, "peak_op": tracker.peak_op, "end": tracker.live}


def _status_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def _child(spec: dict) -> None:
    """One real run (a fresh process: its peak RSS is this computation's)."""
    import importlib

    import torch

    # imports, and the kernels' one-time set-up (a warm-up at toy size), stay out of the peak
    for module in ("transformers.loss.loss_utils", "aov_dist.model.loss"):
        importlib.import_module(module)
    for method in (FULL, LABELS):
        loss_forward_backward(method, *make_inputs(64, 8, 2, spec["hidden"], 1024), 1024)
    hidden, labels, head = make_inputs(spec["tokens"], spec["labelled"], spec["samples"], spec["hidden"], spec["vocab"])
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        how = "VmHWM"
    except OSError:
        how = "ru_maxrss"
    before = _status_kib()["VmRSS"]
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = loss_forward_backward(spec["method"], hidden, labels, head, spec["vocab"])
    seconds = time.perf_counter() - t0
    if how == "VmHWM":
        peak = _status_kib()["VmHWM"]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak <= maxrss_before:  # the computation set no new high-water mark: unmeasurable
            peak = float("nan")
    assert hidden.grad is not None and head.weight.grad is not None
    print(json.dumps({"peak_increase": (peak - before) * 1024, "how": how, "loss": float(loss), "s": seconds,
                      "threads": torch.get_num_threads()}))


def real_peak(spec: dict, timeout: float = 1200) -> dict:
    env = child_env(OMP_NUM_THREADS=str(os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"real run {spec} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768, help="positions of the packed row")
    ap.add_argument("--label-positions", type=int, default=1200,
                    help="labelled positions of the row (default: 4 samples x 300 assistant tokens)")
    ap.add_argument("--samples", type=int, default=4, help="samples packed in the row")
    ap.add_argument("--real-tokens", type=int, nargs="+", default=[2048, 4096],
                    help="row sizes run for real both ways (labelled positions scaled with the row)")
    ap.add_argument("--max-real-gib", type=float, default=10.0,
                    help="run a row for real only if its tracked peak plus inputs stay under this")
    ap.add_argument("--preset", default="aov_0.5b")
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        _child(json.loads(a.child))
        return {}
    if a.quick:
        a.tokens, a.label_positions, a.real_tokens = 512, 48, [256]
    from aov_dist.model.presets import preset_dims

    dims = preset_dims(a.preset)
    hidden_size, vocab = dims["text_hidden"], dims["vocab_size"]
    info = machine()
    t_start = time.time()

    sizes = [(t, max(a.samples, round(a.label_positions * t / a.tokens))) for t in sorted(set(a.real_tokens))
             if t != a.tokens]
    sizes.append((a.tokens, a.label_positions))
    results = []
    for tokens, labelled in sizes:
        for method in (FULL, LABELS):
            tr = tracked_peak(method, tokens, labelled, a.samples, hidden_size, vocab)
            inputs = tokens * hidden_size * 2 + tokens * 8 + hidden_size * vocab * 2
            r: dict[str, Any] = {"method": method, "tokens": tokens, "labelled": labelled, "tracked": tr,
                                 "inputs_bytes": inputs, "real": None}
            if tr["peak"] + inputs <= a.max_real_gib * GiB:
                r["real"] = real_peak({"method": method, "tokens": tokens, "labelled": labelled,
                                       "samples": a.samples, "hidden": hidden_size, "vocab": vocab})
            results.append(r)

    print(machine_line(info))
    print(f"loss memory benchmark: {a.preset} LM head (hidden {hidden_size}, vocabulary {vocab}), bf16 hidden "
          f"states and weight, one packed row of {a.samples} samples, forward + backward of the loss "
          f"(grads of hidden and weight). tracked = peak live tensor bytes beyond the inputs under "
          f"FakeTensorMode; real = peak RSS increase of a fresh process over its RSS with the inputs built")
    rows = []
    for r in results:
        tracked = r["tracked"]["peak"]
        real = r["real"]
        if real is None:
            real_cell = f"not run (needs ~{(tracked + r['inputs_bytes']) / GiB:.0f} GiB)"
            ratio, loss = "", ""
        else:
            real_cell = f"{real['peak_increase'] / MiB:.0f}"
            ratio = f"{real['peak_increase'] / tracked:.3f}"
            loss = f"{real['loss']:.9g}"
        rows.append([r["method"], r["tokens"], r["labelled"], f"{tracked / MiB:.0f}", r["tracked"]["peak_op"],
                     real_cell, ratio, loss])
    print(markdown_table(["method", "tokens", "label positions", "tracked peak MiB", "tracked peak at (op)",
                          "real peak MiB", "real / tracked", "loss (real)"], rows))
    by = {(r["method"], r["tokens"]): r for r in results}
    full, lab = by[(FULL, a.tokens)], by[(LABELS, a.tokens)]
    print(f"\nfull logits / label positions only at {a.tokens} tokens: tracked peak "
          f"{full['tracked']['peak'] / lab['tracked']['peak']:.1f}x "
          f"({full['tracked']['peak'] / MiB:.0f} / {lab['tracked']['peak'] / MiB:.0f} MiB); full logits' peak is "
          f"{full['tracked']['peak'] / (a.tokens * vocab):.2f} bytes per logit (positions x vocabulary)")
    for tokens, _ in sizes:
        f, l = by[(FULL, tokens)]["real"], by[(LABELS, tokens)]["real"]
        if f is not None and l is not None:
            print(f"loss at {tokens} tokens: full logits {f['loss']:.9g}, label positions only {l['loss']:.9g}, "
                  f"relative difference {abs(f['loss'] - l['loss']) / abs(f['loss']):.2e}")
    hows = sorted({r["real"]["how"] for r in results if r["real"] is not None})
    print(f"real peaks from {', '.join(hows)}; total {time.time() - t_start:.0f} s")
    result = {"machine": info, "args": vars(a), "hidden": hidden_size, "vocab": vocab, "results": results}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
