"""Per-GPU memory of a training job: an ESTIMATE by arithmetic on the config, never a measurement.

Pure functions of the model's sizes (``ModelDims``) and the job's shape (``JobShape``); nothing is
built or allocated. Each term is what one worker holds at its peak, in bytes (b = bytes per
parameter: 2 for bf16, 4 for fp32; W = workers; P = unique parameters, P_train the trainable ones):

* parameters: ZeRO-3 P*b/W, ZeRO-2 P*b (ZeRO-2 keeps a full copy on every rank); 0 on the GPU with
  ``deepspeed.offload_params`` (then P*b/W of host memory).
* gradients: P_train*b/W (both stages partition gradients).
* optimizer states: Adam's m and v in fp32, plus an fp32 master copy of the weights when training
  in bf16: 12 bytes per trainable parameter for bf16, 8 for fp32, /W; 0 on the GPU with
  ``deepspeed.offload_optimizer`` (reported as host memory instead).
* ZeRO-3 gathered working set: 2 x the largest single module's full parameters x b (the module
  being computed and the prefetched next one); 0 with ZeRO-2.
* LLM activations (stage 2 only), S = micro_batch_size x tokens per sample. Per token per Qwen2
  decoder layer (GQA, SwiGLU, memory-efficient attention so no S x S scores):
  b*(7h + 2*kv_dim + 4*I): the layer input, two RMSNorm in/outs, q, attention output and
  residual (7h), k and v (2 kv_dim), gate, up, silu(gate) and their product (4I). Without
  checkpointing all L layers keep that; with ``model.activation_checkpointing`` each layer keeps
  only its input (b*h per token) plus one layer's full activations while it is recomputed.
* LM head (stage 2 only): N x vocab x 12 bytes, where N = micro_batch_size x labelled tokens per
  sample (the head runs on labelled positions only, model/loss.py; without a data sample N is
  sized at S, an upper bound). The peak is in the loss's backward, where three fp32 tensors of N x
  vocab are live: the saved log-softmax, the gradient coming from the NLL loss and the gradient
  being formed (measured: benchmarks/bench_loss_memory.py, in bf16 and fp32 alike).
* vision: V = micro_batch_size x views per sample, T = 729 tokens per view, d = SigLIP width.
  The frozen tower runs without a graph, but ``output_hidden_states`` holds all L_v+1 hidden
  states [V, T, d] until the expert has run (it runs inside the same call). Stage 1: those plus the
  training expert's own activations (per token its level adaptor outputs and their L2-normalised
  copies 2*levels*E, the re-weighted features d and the attention keys E); afterwards only the
  five levels it reads (4 levels + last layer) stay for the backward, which is less. Stage 2: the
  larger of those hidden states and what the projector keeps for the backward while the LLM runs
  (its input d, GELU input and output 2h, per token). Bytes: V*T*b*((L_v+1)*d + 2*levels*E + d + E)
  in stage 1, V*T*b*max((L_v+1)*d, d + 2h) in stage 2.
* fixed overhead: CUDA context, NCCL buffers, allocator fragmentation (on CPU clusters the
  runtime and gloo buffers): ~2.5 GiB.

The terms are summed although their peaks are not all simultaneous (the vision pass ends before
the LLM's backward): a conservative estimate. Verdict: fits <= 85 % of the budget, tight <= 100 %,
does not fit above.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

GIB = 1024**3
OVERHEAD_GIB = 2.5
LOSS_BYTES_PER_LOGIT = 12  # three fp32 copies of the logits live in the loss's backward
FITS_FRACTION, TIGHT_FRACTION = 0.85, 1.0


@dataclass(frozen=True)
class ModelDims:
    total_params: int
    trainable_params: int
    largest_module_params: int  # the largest module's own parameters (ZeRO-3 gathers module by module)
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    vision_hidden: int
    vision_layers: int
    tokens_per_view: int  # (image_size / patch_size)^2 = 729
    expert_embed_dim: int = 512
    expert_levels: int = 4

    @property
    def kv_dim(self) -> int:
        return self.text_hidden // self.text_heads * self.text_kv_heads


@dataclass(frozen=True)
class JobShape:
    stage: str  # stage1 | stage2
    nodes: int
    workers_per_node: int
    zero_stage: int  # 2 | 3
    bytes_per_param: int  # 2 bf16, 4 fp32
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    micro_batch_size: int
    tokens_per_sample: int  # stage 2: the longest sample that reaches the model (<= max_length)
    views_per_sample: int  # vision views of the largest sample
    # stage 2: the most labelled tokens of a sample (where the LM head runs); None = tokens_per_sample
    label_positions_per_sample: Optional[int] = None

    @property
    def world(self) -> int:
        return self.nodes * self.workers_per_node


@dataclass
class MemoryEstimate:
    """Bytes per worker by term (device) and what is offloaded to host memory (per worker)."""

    terms: dict[str, float]
    host: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # S of one micro-batch (stage 2)
    views: int = 0  # vision views of one micro-batch
    bytes_per_token_layer: int = 0  # LLM activations of one token in one decoder layer (no checkpointing)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def activation_bytes_per_token_layer(m: ModelDims, b: int) -> int:
    """b*(7h + 2*kv_dim + 4*I): one Qwen2 decoder layer (GQA, SwiGLU, memory-efficient attention)."""
    return b * (7 * m.text_hidden + 2 * m.kv_dim + 4 * m.text_intermediate)


def estimate(m: ModelDims, job: JobShape, overhead_gib: float = OVERHEAD_GIB) -> MemoryEstimate:
    """The per-worker memory estimate of ``job`` (see the module docstring for every term)."""
    if job.zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {job.zero_stage}")
    b, w = job.bytes_per_param, job.world
    terms: dict[str, float] = {}
    host: dict[str, float] = {}
    params = m.total_params * b / (w if job.zero_stage == 3 else 1)
    if job.offload_params:
        terms["parameters"], host["parameters"] = 0.0, m.total_params * b / w
    else:
        terms["parameters"] = params
    terms["gradients"] = m.trainable_params * b / w
    optimizer = m.trainable_params * (12 if b == 2 else 8) / w
    if job.offload_optimizer:
        terms["optimizer states"], host["optimizer states"] = 0.0, optimizer
    else:
        terms["optimizer states"] = optimizer
    terms["ZeRO-3 gathered parameters"] = 2.0 * m.largest_module_params * b if job.zero_stage == 3 else 0.0
    tokens = job.micro_batch_size * job.tokens_per_sample if job.stage == "stage2" else 0
    per_layer = activation_bytes_per_token_layer(m, b)
    if job.activation_checkpointing:
        llm = tokens * (m.text_layers * b * m.text_hidden + per_layer)
    else:
        llm = tokens * m.text_layers * per_layer
    terms["LLM activations"] = float(llm)
    head = tokens if job.label_positions_per_sample is None else job.micro_batch_size * job.label_positions_per_sample
    terms["LM head logits + loss"] = float(head * m.vocab_size * LOSS_BYTES_PER_LOGIT) if tokens else 0.0
    views = job.micro_batch_size * job.views_per_sample
    hidden_states = (m.vision_layers + 1) * m.vision_hidden
    if job.stage == "stage1":
        per_token = hidden_states + 2 * m.expert_levels * m.expert_embed_dim + m.vision_hidden + m.expert_embed_dim
    else:
        per_token = max(hidden_states, m.vision_hidden + 2 * m.text_hidden)
    terms["vision activations"] = float(views * m.tokens_per_view * b * per_token)
    terms["fixed overhead (CUDA/NCCL, runtime)"] = overhead_gib * GIB
    return MemoryEstimate(terms, host, tokens, views, per_layer)


def verdict(total: float, budget: float) -> str:
    """fits (<= 85 % of the budget), tight (<= 100 %), does not fit."""
    if budget <= 0:
        raise ValueError("budget must be > 0")
    share = total / budget
    return "fits" if share <= FITS_FRACTION else "tight" if share <= TIGHT_FRACTION else "does not fit"


def footprint(e: MemoryEstimate, host_counts: bool) -> float:
    """What the budget must hold: the device terms, plus the offloaded ones where the device
    memory is the host memory (CPU clusters)."""
    return e.total + (e.host_total if host_counts else 0.0)


def alternatives(m: ModelDims, job: JobShape, budget: float, host_counts: bool = False,
                 overhead_gib: float = OVERHEAD_GIB) -> list[tuple[str, float, str]]:
    """Single config changes that lower the estimate: [(override, new footprint, verdict)], lowest first."""
    options: list[tuple[str, JobShape]] = []
    if job.stage == "stage2" and not job.activation_checkpointing:
        options.append(("model.activation_checkpointing=true", dataclasses.replace(job, activation_checkpointing=True)))
    if job.zero_stage == 2:
        options.append(("deepspeed=zero3", dataclasses.replace(job, zero_stage=3)))
    if not (job.offload_optimizer and job.offload_params):
        options.append(("deepspeed=zero3_offload", dataclasses.replace(job, zero_stage=3, offload_optimizer=True,
                                                                       offload_params=True)))
    if job.micro_batch_size > 1:
        half = job.micro_batch_size // 2
        options.append((f"data.micro_batch_size={half}", dataclasses.replace(job, micro_batch_size=half)))
    if job.zero_stage == 3:
        options.append((f"cluster.nodes={2 * job.nodes}", dataclasses.replace(job, nodes=2 * job.nodes)))
    base = footprint(estimate(m, job, overhead_gib), host_counts)
    out = []
    for override, changed in options:
        total = footprint(estimate(m, changed, overhead_gib), host_counts)
        if total < base:
            out.append((override, total, verdict(total, budget)))
    return sorted(out, key=lambda t: t[1])
