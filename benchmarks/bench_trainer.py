"""Trainer benchmark: our training path vs the official recipe vs a plain PyTorch loop, in one run.

The same tiny Anomaly-OV, the same synthetic data, the same global batch, the same DeepSpeed
ZeRO-3 config dict (``DeepSpeedStrategy.ds_config()``), 2 processes:

* ``ours``: ``aov_dist.train.driver.main`` (Ray TorchTrainer -> our loop -> DeepSpeed engine,
  streaming shards, MLflow logging every step as configured by default);
* ``official``: torchrun-launched ranks running Hugging Face ``transformers.Trainer`` with
  ``args.deepspeed = <the same config dict>`` over a LLaVA-style map Dataset (JSON list + loose
  image files), with our processor and collator (as the official Anomaly-OV code does with its own);
* ``plain``: one process, no Ray, no DeepSpeed: torch AdamW, the same model, micro batch and
  accumulation (the per-process work of one rank of the others), fed by our stream of rank 0.

Per variant: median step time after warm-up (from the wall-clock end time of every optimizer step
on rank 0), samples/s, time to first step (process start -> first optimizer step done) and the
peak summed RSS of the whole process tree (Ray's own daemons included for ``ours``).

    .venv/bin/python benchmarks/bench_trainer.py                  # stage 2, 40 steps per variant
    .venv/bin/python benchmarks/bench_trainer.py --steps 6 --warmup 2 --global-batch 4 --micro 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DEFAULT_MANIFEST, DEFAULT_TRAIN_JSON, ROOT, child_env, compose, machine,  # noqa: E402
                    machine_line, markdown_table, run_monitored, step_stats)

VARIANTS = ("ours", "official", "plain")


def job_overrides(a: argparse.Namespace, work: Path, tracking: bool = False) -> list[str]:
    """The one job every variant runs (stage 2 needs no stage-1 result for a timing benchmark)."""
    lrs = {"stage1": ["stage.lr.expert=1e-4"], "stage2": ["stage.lr.projector=1e-4", "stage.lr.llm=1e-4",
                                                          "stage.require_init=false"]}[a.stage]
    return [f"stage={a.stage}", *lrs,
            f"stage.global_batch_size={a.global_batch}", f"data.micro_batch_size={a.micro}",
            f"stage.max_steps={a.steps}", f"data.max_length={a.max_length}",
            f"data.datasets=[{{name: synthetic, manifest: '{Path(a.manifest).resolve()}', weight: 1.0}}]",
            "cluster.workers_per_node=2", f"train.checkpoint_every_steps={a.steps}",
            f"train.storage_path='{work / 'ours_runs'}'", "train.run_name=bench",
            f"tracking.enabled={'true' if tracking else 'false'}", "tracking.system_metrics=false",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"tracking.artifact_location={work / 'mlartifacts'}",
            "tracking.experiment=bench-trainer"]


def _typed(a: argparse.Namespace, work: Path):
    from aov_dist.config import validate

    return validate(compose(job_overrides(a, work)))


def _write_times(path: Path, times: list[float], extra: Optional[dict] = None) -> None:
    path.write_text(json.dumps({"step_end_times": times, **(extra or {})}))


# ---------------------------------------------------------------- ours: the driver in a process
def role_ours(a: argparse.Namespace, work: Path) -> None:
    from aov_dist.train.driver import main

    main(compose(job_overrides(a, work, tracking=True)), show_progress=False)


def ours_times(work: Path) -> tuple[list[float], list[float]]:
    """Step-end wall times (rank 0 logs every step to MLflow with a ms timestamp) and the loop's
    own samples_per_s of every step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench-trainer")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    loss = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    sps = sorted(client.get_metric_history(run.info.run_id, "samples_per_s"), key=lambda m: m.step)
    return [m.timestamp / 1000.0 for m in loss], [m.value for m in sps]


# ---------------------------------------------------------------- official: torchrun + HF Trainer
class _SkipTooLong:
    """The official map dataset has no skip accounting: a sample whose image tokens exceed
    max_length is replaced by the next one (deterministic), as our stream drops it."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        from aov_dist.model.processor import ImageTokensExceedMaxLength

        for k in range(len(self.ds)):
            try:
                return self.ds[(i + k) % len(self.ds)]
            except ImageTokensExceedMaxLength:
                continue
        raise RuntimeError("every sample exceeds data.max_length")


def role_official(a: argparse.Namespace, work: Path) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from aov_dist.config import micro_steps_per_step
    from aov_dist.data.transforms import ConversationTransform, ExpertTransform
    from aov_dist.model import build_model
    from aov_dist.train.strategy import DeepSpeedStrategy
    from aov_dist.train.tasks import model_config_for
    from bench_loader import LlavaStyleDataset

    torch.set_num_threads(1)
    import deepspeed

    # on CPU, TrainingArguments does not start the process group before zero.Init needs it
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = _typed(a, work)
    ds_config = DeepSpeedStrategy(cfg).ds_config()
    rank = int(os.environ.get("RANK", "0"))
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.time())

    st = cfg.stage
    args = TrainingArguments(
        output_dir=str(work / "official_out"), per_device_train_batch_size=cfg.data.micro_batch_size,
        gradient_accumulation_steps=micro_steps_per_step(cfg), max_steps=st.max_steps,
        learning_rate=max(st.lr.values()), weight_decay=st.weight_decay, max_grad_norm=st.grad_clip,
        lr_scheduler_type="cosine", warmup_steps=math.ceil(st.max_steps * st.warmup_ratio), deepspeed=ds_config, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=cfg.train.seed,
        dataloader_num_workers=cfg.data.num_workers, remove_unused_columns=False)
    # TrainingArguments turned zero.Init on (HfDeepSpeedConfig): the model is built partitioned
    model, processor = build_model(model_config_for(cfg))
    model.stage_parameter_groups(st.name)
    transform = (ExpertTransform(processor) if st.name == "stage1"
                 else ConversationTransform(processor, cfg.data.max_length))
    train_json = Path(a.train_json).resolve()
    dataset = _SkipTooLong(LlavaStyleDataset(str(train_json), str(train_json.parent / "images"), transform))

    if st.name == "stage1":
        from aov_dist.train.tasks import balanced_bce

        class ExpertTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, **kw):
                out = model.expert_forward(inputs["pixel_values"], inputs["image_grids"])
                return balanced_bce(out.logits, inputs["image_labels"])
        trainer_cls = ExpertTrainer
    else:
        trainer_cls = Trainer
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=processor.collate,
                          callbacks=[StepTimes()])
    trainer.train()
    if rank == 0:
        _write_times(work / "times_official.json", times, {"path": "transformers.Trainer + DeepSpeed"})


# ---------------------------------------------------------------- plain: one process, torch only
def role_plain(a: argparse.Namespace, work: Path) -> None:
    import torch

    from aov_dist.config import micro_steps_per_step
    from aov_dist.train.strategy import lr_scheduler
    from aov_dist.train.tasks import balanced_bce, make_task

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _typed(a, work)
    task = make_task(cfg.stage.name)
    model, processor = task.build_model(cfg)
    groups = model.stage_parameter_groups(cfg.stage.name)
    st = cfg.stage
    opt = torch.optim.AdamW([{"params": p, "lr": st.lr[n]} for n, p in groups.items()], weight_decay=st.weight_decay)
    sched = lr_scheduler(opt, st, total_steps=st.max_steps, steps_per_epoch=st.max_steps)
    accum = micro_steps_per_step(cfg)
    # rank 0 of 2: exactly the sample stream (and per-step work) one rank of the others gets
    loader = task.build_loader(cfg, processor, 0, cfg.cluster.num_workers)
    params = [p for ps in groups.values() for p in ps]
    batches, times = iter(loader), []
    model.train()
    for _ in range(st.max_steps):
        for _ in range(accum):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            if st.name == "stage1":
                out = model.expert_forward(batch["pixel_values"], batch["image_grids"])
                loss = balanced_bce(out.logits, batch["image_labels"])
            else:
                loss = model(**batch).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, st.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(time.time())
    _write_times(work / "times_plain.json", times)


# ---------------------------------------------------------------- orchestration
def run_variant(name: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--work", str(work), "--stage", a.stage, "--global-batch", str(a.global_batch), "--micro", str(a.micro),
              "--steps", str(a.steps), "--max-length", str(a.max_length), "--manifest", str(a.manifest),
              "--train-json", str(a.train_json)]
    if name == "official":
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(Path(__file__).resolve()),
               "--role", "official", *common]
    else:
        cmd = me + ["--role", name, *common]
    mon = run_monitored(cmd, child_env(), a.timeout, work / f"{name}.log")
    per_step = a.global_batch if name != "plain" else a.global_batch // 2
    if name == "ours":
        times, loop_sps = ours_times(work)
    else:
        times, loop_sps = json.loads((work / f"times_{name}.json").read_text())["step_end_times"], []
    stats = step_stats(times, per_step, a.warmup)
    return {"variant": name, **stats, "first_step_s": times[0] - mon["start_time"], "peak_rss_mb": mon["peak_rss_mb"],
            "peak_procs": mon["peak_procs"], "wall_s": mon["wall_s"], "samples_per_step": per_step,
            "loop_samples_per_s_median": (sorted(loop_sps)[len(loop_sps) // 2] if loop_sps else None)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="bench", choices=["bench", *VARIANTS])
    ap.add_argument("--work", default=None, help="working folder (default: a temp folder, removed)")
    ap.add_argument("--stage", default="stage2", choices=["stage1", "stage2"])
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    ap.add_argument("--train-json", default=str(DEFAULT_TRAIN_JSON))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.role != "bench":
        work = Path(a.work)
        {"ours": role_ours, "official": role_official, "plain": role_plain}[a.role](a, work)
        return {}

    for p in (a.manifest, a.train_json):
        if not Path(p).exists():
            raise SystemExit(f"{p} does not exist: run `make shards` first")
    tmp = None if a.work else tempfile.mkdtemp(prefix="bench_trainer_")
    work = Path(a.work or tmp)
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = {}
    try:
        for name in a.variants.split(","):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_variant(name, a, work)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(machine_line(info))
    print(f"trainer benchmark: {a.stage}, tiny Anomaly-OV, global batch {a.global_batch}, micro batch {a.micro}, "
          f"2 processes (plain: 1 process, half the global batch per step), {a.steps} steps, median after "
          f"{a.warmup} warm-up steps; ZeRO-3 config of DeepSpeedStrategy; official = torchrun + "
          f"transformers.Trainer(args.deepspeed=<same dict>) over a map Dataset of the LLaVA JSON + loose images")
    header = ["variant", "step s (median)", "samples/s", "first step s", "peak RSS MB (tree)", "ours/variant step time"]
    rows = []
    for name, r in results.items():
        ratio = results["ours"]["step_s"] / r["step_s"] if "ours" in results else float("nan")
        rows.append([name, r["step_s"], r["samples_per_s"], r["first_step_s"], r["peak_rss_mb"], ratio])
    print(markdown_table(header, rows))
    out = {"machine": info, "args": vars(a), "results": results}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
