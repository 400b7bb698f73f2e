"""aov-plan: a pre-launch plan of a composed training job. Every number is an ESTIMATE.

    aov-plan <hydra overrides> [--json PATH] [--samples N] [--shards K]
    aov-train <hydra overrides> +plan=true          (the same plan instead of training)
    aov-train <hydra overrides> +plan.json=PATH +plan.samples=N +plan.shards=K
    make plan ARGS="experiment=aov_7b_stage2 cluster.nodes=8"

The config is the training job's (conf/config.yaml, Hydra overrides). Mandatory values still
missing get a placeholder and are listed as "must be set before launching" (plan_cli.py: how they
are found); the job is then validated like aov-train's (``config.validate``) without the
path-existence checks. This module gathers and prints; plan_cli.py is the config side. Nothing
is started: no Ray, MLflow, GPU or model download. Read are: the manifests and a sample of shard
records (image headers and conversations, ``--samples`` records, about 512, from up to ``--shards``
evenly spaced shards per dataset), and a given ``model.pretrained_path``'s config.json (its
processor too when the directory is local).

Printed: parameters per group (built on the meta device), tokens per sample after image expansion
(stage 2) or image views per sample (stage 1), per-GPU memory by term (aov_dist/train/memory.py
has every formula), the changes that would lower it, and one final line starting ``verdict:``.
Exit code: 0 fits or tight, 1 does not fit, 2 config error (``config error: <key>: ...``).

``--json PATH`` / ``plan.json`` writes the same plan as JSON, keys: ``estimate`` (always true),
``verdict`` (fits | tight | does not fit), ``exit_code``, ``job``, ``missing`` ({key: hint}),
``problems``, ``parameters``, ``data``, ``memory`` (``terms_gib``, ``host_gib``, ``total_gib``,
``budget_gib``, ``fraction``, ``tokens_per_micro_batch``, ``views_per_micro_batch``,
``bytes_per_token_layer``), ``alternatives`` ([{override, total_gib, verdict}]), ``data_verdict``.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import psutil

from aov_dist.config import ConfigError, TrainJobConfig, training_precision
from aov_dist.train import memory as mem

# token bins in units of 1k = 1024 tokens (max_length presets are powers of two)
TOKEN_BINS = [(1024, "<1k"), (2048, "1-2k"), (4096, "2-4k"), (8192, "4-8k"), (16384, "8-16k"), (32768, "16-32k")]
VIEW_BINS = [(2, "1-2"), (5, "3-5"), (10, "6-10"), (17, "11-17"), (26, "18-26")]


# ------------------------------------------------------------------ model
def _model_config(c: TrainJobConfig, missing: dict[str, str]):
    """(AnomalyOVConfig, source, problem or ""): the pretrained directory's config.json when readable,
    else the preset's dimensions."""
    from aov_dist import storage
    from aov_dist.model.hf_config import AnomalyOVConfig
    from aov_dist.model.presets import LOAD_OVERRIDES, build_config, preset_dims, tiny_processor

    path = c.model.pretrained_path if "model.pretrained_path" not in missing else None
    note = ""
    if path:
        extra = sorted(set(c.model.overrides) - LOAD_OVERRIDES)
        if extra:
            raise ConfigError("model.overrides", f"{extra}: with model.pretrained_path the architecture comes from "
                              f"the directory; only {sorted(LOAD_OVERRIDES)} may be overridden")
        url = storage.join_url(path, "config.json")
        try:
            d = json.loads(storage.read_bytes(url, c.data.s3_endpoint_url))
            return AnomalyOVConfig.from_dict(d, **c.model.overrides), url, ""
        except Exception as e:  # unreadable: plan with the preset's dimensions and say so
            note = f"{url} not readable ({type(e).__name__}: {str(e)[:120]}): planned with the preset's dimensions"
    try:
        dims = preset_dims(c.model.preset, c.model.overrides)
    except ValueError as e:
        raise ConfigError("model.overrides" if c.model.preset in _preset_names() else "model.preset", str(e)) from e
    vocab = dims["vocab_size"] or len(tiny_processor(dims).tokenizer)
    if c.model.preset == "tiny":
        source = f"preset tiny (vocabulary {vocab} from the local tokenizer)"
    elif c.model.random_init:
        source = f"preset {c.model.preset} (model.random_init)"
    elif "model.pretrained_path" in missing:
        source = f"preset {c.model.preset}'s dimensions (model.pretrained_path not given)"
    else:
        source = f"preset {c.model.preset}'s dimensions (model.pretrained_path not readable)"
    return build_config(c.model.preset, {**c.model.overrides, "vocab_size": vocab}), source, note


def _preset_names() -> list[str]:
    from aov_dist.model.presets import PRESETS

    return sorted(PRESETS)


def count_parameters(c: TrainJobConfig, missing: dict[str, str]):
    """Parameters per group on the meta device: (report dict, memory.ModelDims, model config)."""
    import torch

    from aov_dist.model.anomaly_ov import AnomalyOVForConditionalGeneration

    config, source, problem = _model_config(c, missing)
    with torch.device("meta"):
        model = AnomalyOVForConditionalGeneration(config)
    trainable = model.stage_parameter_groups(c.stage.name, train_vision_tower="vision_tower" in c.stage.lr)
    inner = model.model
    components = {"vision_tower": list(inner.vision_tower.parameters()), "expert": list(model.expert.parameters()),
                  "projector": [*inner.multi_modal_projector.parameters(), inner.image_newline],
                  "llm": [*inner.language_model.parameters(), *model.lm_head.parameters()]}
    seen: set[int] = set()
    groups = {}
    for name, params in components.items():  # unique parameters: tied embeddings count once
        params = [p for p in params if id(p) not in seen and not seen.add(id(p))]
        groups[name] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                        "frozen": sum(p.numel() for p in params if not p.requires_grad)}
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        groups["other"] = {"trainable": sum(p.numel() for p in rest if p.requires_grad),
                           "frozen": sum(p.numel() for p in rest if not p.requires_grad)}
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # ZeRO-3 gathers the modules that run: stage 1 runs the vision tower and the expert only
    scope = model if c.stage.name == "stage2" else {"model.vision_tower": inner.vision_tower, "expert": model.expert}
    named = model.named_modules() if scope is model else (
        (f"{root}.{n}".rstrip("."), m) for root, mod in scope.items() for n, m in mod.named_modules())
    largest_name, largest = max(((n, sum(p.numel() for p in m.parameters(recurse=False))) for n, m in named),
                                key=lambda t: t[1])
    t, v = config.text_config, config.vision_config
    dims = mem.ModelDims(total, train, largest, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                         t.num_attention_heads, t.num_key_value_heads, t.vocab_size, v.hidden_size,
                         v.num_hidden_layers, (v.image_size // v.patch_size) ** 2, config.expert_embed_dim,
                         len(config.expert_level_layers))
    report = {"source": source, "problem": problem, "groups": groups, "trainable_groups": sorted(trainable), "total": total,
              "trainable": train, "frozen": total - train, "largest_module": {"name": largest_name, "params": largest}}
    return report, dims, config


def plan_processor(c: TrainJobConfig, missing: dict[str, str], config, source: str):
    """(processor, note on the tokenizer that counts text). The pretrained directory's own when it
    is local and loads; a preset's: the processor build_model makes for it (tiny tokenizer); else
    the config's layout with the tiny tokenizer. The tiny tokenizer is exact for the tiny preset
    only: for the official ones it approximates Qwen2's text tokens (image tokens stay exact)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from aov_dist.model.presets import preset_dims, tiny_processor
    from aov_dist.model.processor import AnomalyOVProcessor, layout_from_hf_config
    from aov_dist.model.tokenizer import build_tiny_tokenizer

    path = c.model.pretrained_path if "model.pretrained_path" not in missing else None
    if path and "://" not in path:
        try:
            return AnomalyOVProcessor.from_pretrained(path), f"the pretrained directory's tokenizer ({path}): exact"
        except Exception:  # unreadable directory: fall back to the layout of the config in use
            pass
    if source.startswith("preset"):
        processor = tiny_processor(preset_dims(c.model.preset, c.model.overrides))
    else:
        layout = layout_from_hf_config(config)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": layout.image_size, "width": layout.image_size},
            image_grid_pinpoints=[list(p) for p in layout.grid_pinpoints])
        processor = AnomalyOVProcessor(build_tiny_tokenizer(), image_processor, layout)
    if c.model.preset == "tiny" and not path:
        return processor, "the tiny local tokenizer (the one this job trains with): exact"
    return processor, ("the tiny local tokenizer: text tokens are an APPROXIMATION (the model's Qwen2 "
                       "tokenizer was not loaded); image tokens are exact")


# --------------------------------------------------------------- gathering
def _histogram(values: list[int], bins: list[tuple[int, str]], last: str) -> dict[str, int]:
    out = {label: 0 for _, label in bins} | {last: 0}
    for v in values:
        out[next((label for edge, label in bins if v <= edge), last)] += 1
    return out


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and the maximum."""
    s = sorted(values)
    rank = lambda p: s[max(0, -(-p * len(s) // 100) - 1)]  # noqa: E731
    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1]}


def gather_data(c: TrainJobConfig, processor, missing: dict[str, str], options) -> dict[str, Any]:
    from aov_dist.data.sample import sample_records
    from aov_dist.model.layout import num_views

    given = [(d.name, d.manifest, d.weight) for i, d in enumerate(c.data.datasets)
             if f"data.datasets[{i}].manifest" not in missing]
    if not given:
        return {"status": "no manifest given"}
    sample = sample_records(given, options.samples, options.shards, c.data.min_image_side, c.data.s3_endpoint_url)
    readable = any(d.error is None for d in sample.datasets)
    out: dict[str, Any] = {"status": "sampled" if readable else "no readable manifest",
                           "datasets": [vars(d) for d in sample.datasets],
                           "records": len(sample.records), "skipped": dict(sample.skipped)}

    def views(sizes) -> int:
        return sum(num_views(grid) for grid in processor.image_grids(sizes))

    if not readable:
        return out
    if c.stage.name == "stage1":
        filtered = {"unlabelled": 0, "multi_view": 0, "no_image": 0}
        counts = []
        for r in sample.records:  # the loader's stage-1 filters, in decode.py's order
            reason = "unlabelled" if r.label is None else "multi_view" if len(r.image_sizes) > 1 \
                else "no_image" if not r.image_sizes else None
            if reason:
                filtered[reason] += 1
            else:
                counts.append(views(r.image_sizes))
        out.update(filtered=filtered, eligible=len(counts))
        if counts:
            out["views"] = {"histogram": _histogram(counts, VIEW_BINS, "27-37"), **percentiles(counts)}
        return out
    lengths, labelled, view_counts = [], [], []
    for r in sample.records:
        try:
            tokens, labels = processor.count_tokens_and_labels(list(r.image_sizes), r.conversations)
        except ValueError:  # placeholder/role problems: the loader skips those too
            out["skipped"]["bad_json"] = out["skipped"].get("bad_json", 0) + 1
            continue
        lengths.append(tokens)
        labelled.append(labels)
        view_counts.append(views(r.image_sizes))
    if lengths:
        over = sum(t > c.data.max_length for t in lengths)
        out["tokens"] = {"histogram": _histogram(lengths, TOKEN_BINS, ">32k"), **percentiles(lengths),
                         "over_max_length": over, "fraction_over_max_length": over / len(lengths)}
        out["views"] = {"max": max(1, *view_counts)}  # text-only batches run the vision side on one dummy view
        out["labelled_tokens"] = {"max": max(labelled)}  # where the LM head runs (model/loss.py)
    return out


def plan_job(c: TrainJobConfig, missing: dict[str, str], options) -> dict[str, Any]:
    params, dims, config = count_parameters(c, missing)
    processor, tokenizer_note = plan_processor(c, missing, config, params["source"])
    data = gather_data(c, processor, missing, options)
    data["tokenizer"] = tokenizer_note
    problems = [f"data.datasets[{i}].manifest: {d['manifest']!r} cannot be read ({d['error']})"
                for i, d in enumerate(data.get("datasets", [])) if d.get("error")]
    if params["problem"]:
        problems.insert(0, f"model.pretrained_path: {params['problem']}")
    precision = training_precision(c)
    b = 2 if precision == "bf16" else 4
    layout_views = 1 + max(p[0] * p[1] for p in processor.layout.grid_pinpoints) // processor.layout.image_size ** 2
    tokens = data.get("tokens")
    per_sample = min(tokens["max"], c.data.max_length) if tokens else c.data.max_length
    views = (data.get("views") or {}).get("max", layout_views)
    labelled = (data.get("labelled_tokens") or {}).get("max")  # None without a data sample: sized at per_sample
    job = mem.JobShape(c.stage.name, c.cluster.nodes, c.cluster.workers_per_node, c.deepspeed.zero_stage, b,
                       c.deepspeed.offload_optimizer, c.deepspeed.offload_params, c.model.activation_checkpointing,
                       c.data.micro_batch_size, per_sample, views,
                       None if labelled is None else min(labelled, per_sample))
    if c.cluster.use_gpu:
        if c.cluster.gpu_memory_gib <= 0:
            raise ConfigError("cluster.gpu_memory_gib", "set the memory of one GPU in GiB (the budget per worker)")
        budget, budget_note = c.cluster.gpu_memory_gib * mem.GIB, f"GPU memory (cluster.gpu_memory_gib={c.cluster.gpu_memory_gib:g})"
    else:
        budget = psutil.virtual_memory().total / c.cluster.workers_per_node
        budget_note = f"host memory per worker (CPU cluster: this machine's RAM / {c.cluster.workers_per_node} workers)"
    e = mem.estimate(dims, job)
    total = mem.footprint(e, not c.cluster.use_gpu)
    verdict = mem.verdict(total, budget)
    if c.stage.name == "stage2" and tokens:
        frac = tokens["fraction_over_max_length"]
        data_verdict = (f"raise data.max_length (p99 is {tokens['p99']} tokens)" if frac > c.data.max_skip_fraction
                        else f"ok ({frac:.1%} of sampled samples exceed data.max_length={c.data.max_length})")
    elif c.stage.name == "stage1" and data["status"] == "sampled":
        data_verdict = f"stage 1 reads images only: {data['eligible']} of {data['records']} sampled records pass its filters"
    else:
        data_verdict = f"not checked ({data['status']})"
    gib = lambda x: round(x / mem.GIB, 3)  # noqa: E731
    return {
        "estimate": True, "verdict": verdict, "exit_code": 1 if verdict == "does not fit" else 0,
        "job": {"run_name": c.train.run_name, "preset": c.model.preset, "stage": c.stage.name,
                "cluster": c.cluster.name, "nodes": c.cluster.nodes, "workers_per_node": c.cluster.workers_per_node,
                "world": job.world, "zero_stage": job.zero_stage, "precision": precision,
                "offload_optimizer": job.offload_optimizer, "offload_params": job.offload_params,
                "activation_checkpointing": job.activation_checkpointing, "micro_batch_size": job.micro_batch_size,
                "max_length": c.data.max_length},
        "missing": missing, "problems": problems, "parameters": params, "data": data,
        "memory": {"terms_gib": {k: gib(v) for k, v in e.terms.items()}, "host_gib": {k: gib(v) for k, v in e.host.items()},
                   "total_gib": gib(total), "budget_gib": gib(budget), "budget": budget_note, "fraction": total / budget,
                   "tokens_per_sample": per_sample if c.stage.name == "stage2" else 0, "views_per_sample": views,
                   "tokens_per_micro_batch": e.tokens, "views_per_micro_batch": e.views,
                   "bytes_per_token_layer": e.bytes_per_token_layer, "bytes_per_param": b},
        "alternatives": [{"override": o, "total_gib": gib(t), "verdict": v}
                         for o, t, v in mem.alternatives(dims, job, budget, not c.cluster.use_gpu)],
        "data_verdict": data_verdict,
    }


# --------------------------------------------------------------- printing
def _n(x: int) -> str:
    return f"{x / 1e9:.2f} B" if x >= 1e9 else f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x:,}"


def render(plan: dict[str, Any], console=None) -> None:
    """The plan as rich tables on stdout (120 columns when not a terminal, so pipes stay readable)."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console(width=None if sys.stdout.isatty() else 120, highlight=False)
    j, p, d, m = plan["job"], plan["parameters"], plan["data"], plan["memory"]
    con.print(f"[bold]aov-plan[/] {j['run_name']}: {j['preset']} {j['stage']} on {j['nodes']} x {j['workers_per_node']}"
              f" = {j['world']} workers ({j['cluster']}), ZeRO-{j['zero_stage']}, {j['precision']}, micro batch "
              f"{j['micro_batch_size']}, max_length {j['max_length']}")
    con.print("[italic]All figures are ESTIMATES from the config and a data sample; nothing was measured.[/]")
    for key, hint in plan["missing"].items():
        con.print(f"[yellow]must be set before launching:[/] {key}" + (f" ({hint})" if hint else ""))
    for problem in plan["problems"]:
        con.print(f"[red]problem:[/] {problem}")
    con.print(f"[bold]Parameters[/] from {p['source']}, built on the meta device:")
    t = Table()
    for col in ("group", "trainable", "frozen", "total"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for name, g in p["groups"].items():
        t.add_row(name, _n(g["trainable"]), _n(g["frozen"]), _n(g["trainable"] + g["frozen"]))
    t.add_row("[bold]all (unique)", _n(p["trainable"]), _n(p["frozen"]), _n(p["total"]))
    con.print(t)
    lm = p["largest_module"]
    con.print(f"largest module: {lm['name']} ({_n(lm['params'])}); trains: {', '.join(p['trainable_groups'])}")
    con.print(f"[bold]Data[/] ({j['stage']}): ", end="")
    if d["status"] != "sampled":
        con.print(d["status"] + (f"; activations sized for data.max_length={j['max_length']} tokens"
                                 if j["stage"] == "stage2" else "; activations sized for the largest AnyRes grid"))
    else:
        con.print(f"{d['records']} records sampled from " + ", ".join(
            f"{x['name']} ({x['shards_read']} of {x['shards_total']} shards, {x['total']} samples)" for x in d["datasets"])
            + (f"; would be skipped: {d['skipped']}" if d["skipped"] else ""))
        key, what = ("views", "image views per sample") if j["stage"] == "stage1" else ("tokens", "tokens per sample")
        stats = d.get(key)
        if j["stage"] == "stage1":
            con.print(f"stage-1 filters apply (labelled single-image samples only): {d['eligible']} eligible, "
                      f"filtered {d['filtered']}")
        if stats and "histogram" in stats:
            con.print(f"{what} (after image expansion):" if key == "tokens" else f"{what}:")
            h = Table()
            h.add_column("bin")
            h.add_column("samples", justify="right")
            h.add_column("share", justify="right")
            n = sum(stats["histogram"].values())
            for label, count in stats["histogram"].items():
                h.add_row(label, str(count), f"{count / n:.1%}")
            con.print(h)
            con.print("  ".join(f"{k} {stats[k]}" for k in ("p50", "p90", "p99", "max")))
        if key == "tokens" and stats:
            con.print(f"over data.max_length={j['max_length']}: {stats['over_max_length']} "
                      f"({stats['fraction_over_max_length']:.1%}) of sampled samples")
        if j["stage"] == "stage2":
            con.print(f"counted with {d['tokenizer']}")
    con.print(f"[bold]Memory per worker, ESTIMATE[/] (budget: {m['budget']}):")
    t = Table()
    t.add_column("term")
    t.add_column("GiB", justify="right")
    for name, value in m["terms_gib"].items():
        t.add_row(name, f"{value:.2f}")
    t.add_row("[bold]total", f"[bold]{m['total_gib']:.2f}")
    t.add_row("budget", f"{m['budget_gib']:.2f}")
    for name, value in m["host_gib"].items():
        t.add_row(f"host memory (offloaded): {name}", f"{value:.2f}")
    con.print(t)
    if j["stage"] == "stage2":
        con.print(f"activations from {m['tokens_per_micro_batch']} tokens and {m['views_per_micro_batch']} views per "
                  f"micro-batch; LLM layer: {m['bytes_per_token_layer']} bytes per token (b*(7h + 2*kv_dim + 4*I), "
                  f"b={m['bytes_per_param']}" + ("; with activation checkpointing each layer keeps b*h per token)"
                                                  if j["activation_checkpointing"] else ")"))
    else:
        con.print(f"activations from {m['views_per_micro_batch']} image views per micro-batch (stage 1 runs no LLM)")
    if plan["verdict"] != "fits" and plan["alternatives"]:
        con.print("[bold]Changes that lower the estimate[/] (one at a time):")
        t = Table()
        for col in ("override", "GiB", "verdict"):
            t.add_column(col)
        for a in plan["alternatives"]:
            t.add_row(a["override"], f"{a['total_gib']:.2f}", a["verdict"])
        con.print(t)
    con.print(f"data: {plan['data_verdict']}")


def final_line(plan: dict[str, Any]) -> str:
    m = plan["memory"]
    line = (f"verdict: {plan['verdict']} (estimate: {m['total_gib']:.1f} of {m['budget_gib']:.1f} GiB per worker, "
            f"{m['fraction']:.0%})")
    if plan["verdict"] != "fits" and plan["alternatives"]:
        line += "; try " + " or ".join(a["override"] for a in plan["alternatives"][:3])
    line += f"; data: {plan['data_verdict']}"
    if plan["missing"]:
        line += f"; must set before launching: {', '.join(plan['missing'])}"
    return line
