"""The one module that talks to DeepSpeed: the accelerator check, config generation, model
construction under zero.Init, the optimizer, engine creation with per-group learning rates and our
schedules, the loop's collectives and device placement, save/load, consolidated weights."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from aov_dist.config import TrainJobConfig, micro_steps_per_step, training_precision
from aov_dist import devices
from aov_dist.train.ds_safety import install_safe_checkpoint_engine, safe_checkpoint_engine_class, verify_ds_checkpoint

log = logging.getLogger(__name__)


def lr_scheduler(optimizer: torch.optim.Optimizer, stage: Any, total_steps: int, steps_per_epoch: int):
    """The stage's learning-rate schedule, from transformers' schedulers where they have it.

    warmup_cosine: linear warm-up over ``warmup_ratio`` of the run, then cosine to 0
    (``cosine``) or to ``min_lr_ratio`` (``cosine_with_min_lr``). cosine_restarts: cosine from 1
    to 0, restarting every ``restart_every_epochs`` epochs (stage 1: every half epoch), transformers'
    ``cosine_with_restarts`` with that many cycles; with ``min_lr_ratio`` > 0 (a floor transformers'
    restarts lack) our own LambdaLR. constant: 1.
    """
    from transformers import get_scheduler

    warmup = math.ceil(total_steps * stage.warmup_ratio)
    if stage.schedule == "constant":
        return get_scheduler("constant", optimizer)
    if stage.schedule == "warmup_cosine":
        if stage.min_lr_ratio > 0:
            return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                                 scheduler_specific_kwargs={"min_lr_rate": stage.min_lr_ratio})
        return get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    if stage.schedule == "cosine_restarts":
        period = max(1, round(steps_per_epoch * stage.restart_every_epochs))
        if stage.min_lr_ratio == 0:
            # transformers counts cycles over the steps after the warm-up: one every `period` steps
            return get_scheduler("cosine_with_restarts", optimizer, num_warmup_steps=warmup,
                                 num_training_steps=total_steps,
                                 scheduler_specific_kwargs={"num_cycles": max(1e-9, (total_steps - warmup) / period)})
        floor = stage.min_lr_ratio

        def restarts_with_floor(step: int) -> float:
            if step < warmup:
                return step / warmup
            phase = ((step - warmup) % period) / period
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * phase))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, restarts_with_floor)
    raise ValueError(f"stage.schedule: unknown schedule {stage.schedule!r}")


def engine_call(engine, method: str, *args, **kwargs):
    """``engine.module.<method>(*args, **kwargs)`` run through ``engine.forward``.

    DeepSpeed's forward does per-micro-step bookkeeping (ZeRO-3 clears its backward-seen flag and
    hooks the outputs for the backward prologue; bf16 autocast). Calling a model method directly
    skips it, and under ZeRO-3 with gradient accumulation the gradients of all but part of the
    micro-batches are then lost (measured: wrong global grad norm as soon as accumulation > 1;
    tests/test_train_golden.py). So the method temporarily stands in for the module's forward.
    """
    module = engine.module
    previous = module.__dict__.get("forward")
    module.forward = getattr(module, method)  # instance attribute shadows the class's forward
    try:
        return engine(*args, **kwargs)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class DeepSpeedStrategy:
    """DeepSpeed behind one object: the worker's device, the batch's way onto it, the collectives
    of the loop, the optimizer, the engine, save/load and consolidated weights."""

    TAG = "state"  # the folder inside ds/ that DeepSpeed writes a checkpoint's files to
    UNIVERSAL_TAG = "state_universal"  # its resharded form, made on the machine that resumes

    def __init__(self, cfg: TrainJobConfig, device: Optional[torch.device] = None):
        self.cfg = cfg
        self.use_bf16 = training_precision(cfg) == "bf16"
        # the worker's device; Ray Train (or a standalone launcher) made it the current CUDA device
        self.device = device if device is not None else devices.worker_device(cfg.cluster.use_gpu)
        self._collective_device: Optional[torch.device] = None
        self.optimizer_name = ""
        self.engine = None  # the DeepSpeed engine (initialize); nothing outside this class touches it
        self._hf_ds_config = None  # must stay referenced while the model is built under zero.Init
        self.load_universal = False  # initialize(): the engine restores a resharded checkpoint

    @property
    def zero3(self) -> bool:
        return self.cfg.deepspeed.zero_stage == 3

    # ------------------------------------------------------------ process group and device
    def init_distributed(self) -> None:
        """Join (or reuse) the process group and check that DeepSpeed runs the cluster section's
        accelerator: a CPU accelerator on GPU nodes would put the engine off the GPUs."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        want = self.cfg.cluster.accelerator
        have = get_accelerator().device_name()
        if have != want:
            raise RuntimeError(f"DeepSpeed chose its {have!r} accelerator but cluster.use_gpu="
                               f"{str(self.cfg.cluster.use_gpu).lower()} needs {want!r}: set DS_ACCELERATOR={want} "
                               f"(or leave it unset) in the workers' environment before DeepSpeed is imported")
        from datetime import timedelta

        from aov_dist.train.watchdog import collective_timeout_s

        deepspeed.init_distributed(dist_backend=self.cfg.cluster.backend, verbose=False,
                                   timeout=timedelta(seconds=collective_timeout_s(self.cfg.train)))

    @property
    def collective_device(self) -> torch.device:
        """Where the tensors of this worker's collectives live (the process group's device)."""
        if self._collective_device is None:
            self._collective_device = devices.collective_device(self.device)
        return self._collective_device

    def to_device(self, batch: Any) -> Any:
        """The batch on the engine's device; the model's host-side layout keys stay on the CPU."""
        from aov_dist.model.anomaly_ov import HOST_INPUTS

        return devices.move_to_device(batch, self.device, keep_on_host=HOST_INPUTS)

    def reduce_step_totals(self, loss_sum: torch.Tensor, counts: Sequence[float]) -> list[float]:
        """Sum ``[loss_sum, *counts]`` over ranks in one all-reduce and return them as floats: the
        step's only host sync (what logging needs). float64 keeps token counts exact."""
        totals = devices.place(torch.tensor([0.0, *counts], dtype=torch.float64), self.collective_device)
        totals[0] = loss_sum.detach()  # in place: a device-side copy, no sync
        return self._all_reduce(totals)

    def sum_over_ranks(self, counts: Sequence[float]) -> list[float]:
        """``counts`` summed over ranks (one all-reduce on the group's device)."""
        return self._all_reduce(devices.place(torch.tensor(list(counts), dtype=torch.float64),
                                              self.collective_device))

    @staticmethod
    def _all_reduce(totals: torch.Tensor) -> list[float]:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        return totals.tolist()

    @staticmethod
    def world_size() -> Optional[int]:
        """The job's workers once torch.distributed is up (an elastic job may run on fewer than
        the cluster section's), else None."""
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_initialized() else None

    def barrier(self) -> None:
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        if self.collective_device.type == "cuda":  # NCCL must not guess the device (it may hang)
            dist.barrier(device_ids=[self.collective_device.index or 0])
        else:
            dist.barrier()

    # ------------------------------------------------------------------------ the engine
    def ds_config(self) -> dict[str, Any]:
        c = self.cfg
        zero: dict[str, Any] = {"stage": c.deepspeed.zero_stage}
        if self.zero3:
            zero["stage3_param_persistence_threshold"] = c.deepspeed.param_persistence_threshold
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        if c.deepspeed.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": c.cluster.use_gpu}
        if c.deepspeed.offload_params and self.zero3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": c.cluster.use_gpu}
        return {
            "train_batch_size": c.stage.global_batch_size,
            "train_micro_batch_size_per_gpu": c.data.micro_batch_size,
            "gradient_accumulation_steps": micro_steps_per_step(c, self.world_size()),
            "gradient_clipping": c.stage.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.use_bf16},
            # on CPU without offload the optimizer is torch's AdamW (see make_optimizer)
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**12,
            "wall_clock_breakdown": False,
            "checkpoint": {"load_universal": self.load_universal},
        }

    def build_model(self, build: Callable[[], tuple[nn.Module, Any]]) -> tuple[nn.Module, Any]:
        """Run ``build`` so that under ZeRO-3 every parameter is partitioned as it is created
        (transformers' HfDeepSpeedConfig turns on zero.Init): no rank holds the whole model."""
        if self.zero3 and self.cfg.deepspeed.zero_init:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config())
        return build()

    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """AdamW in the form that is fastest where the states live: DeepSpeed's CPU Adam for
        optimizer offload (DeepSpeed refuses another there), DeepSpeed's fused CUDA Adam on GPUs
        (torch's fused AdamW when that op cannot be built), torch's AdamW on CPU workers."""
        st = self.cfg.stage
        common = dict(lr=max(st.lr.values()), weight_decay=st.weight_decay)
        if self.cfg.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer_name = "DeepSpeedCPUAdam"
            return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **common)
        if self.cfg.cluster.use_gpu:
            try:
                from deepspeed.ops.adam import FusedAdam

                optimizer = FusedAdam(param_groups, adam_w_mode=True, **common)
                self.optimizer_name = "FusedAdam"
                return optimizer
            except Exception as e:  # the op is JIT-built with nvcc: no compiler, no fused op
                log.warning("DeepSpeed FusedAdam unavailable (%s: %s); using torch's fused AdamW",
                            type(e).__name__, e)
                self.optimizer_name = "torch.AdamW(fused)"
                return torch.optim.AdamW(param_groups, fused=True, **common)
        self.optimizer_name = "torch.AdamW"
        return torch.optim.AdamW(param_groups, **common)

    def initialize(self, model: nn.Module, groups: dict[str, list[nn.Parameter]], total_steps: int,
                   steps_per_epoch: int, load_universal: bool = False):
        """DeepSpeed engine over AdamW with one param group per stage group and its own lr.
        ``load_universal``: the job resumes from a checkpoint of another world size (``load``
        then reads its universal form, ``to_universal``); DeepSpeed fixes this when the engine is built."""
        import deepspeed

        self.load_universal = load_universal
        st = self.cfg.stage
        param_groups = [{"params": params, "lr": st.lr[name], "name": name, "weight_decay": st.weight_decay}
                        for name, params in groups.items()]
        optimizer = self.make_optimizer(param_groups)
        schedule = functools.partial(lr_scheduler, stage=st, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                    config=self.ds_config())
        install_safe_checkpoint_engine(self.engine)
        return self.engine

    # ------------------------------------------------------------------- a training step
    def train_mode(self) -> None:
        self.engine.train()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward through the engine (ZeRO-3's per-micro-step bookkeeping, bf16)."""
        return self.engine(*args, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Another model method (e.g. ``expert_forward``) through the engine: see ``engine_call``."""
        return engine_call(self.engine, method, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """DeepSpeed's step after every micro-batch: it applies the optimizer at accumulation boundaries."""
        self.engine.step()

    def grad_norm(self) -> Optional[float]:
        """The last optimizer step's global gradient norm (cached by DeepSpeed: no collective)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def group_lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.engine.optimizer.param_groups)}

    def numel(self) -> int:
        """Parameters of the model (under ZeRO-3 a partitioned parameter keeps its size in ds_numel)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.engine.module.parameters())

    # -------------------------------------------------------------------- save and load
    def save(self, directory: str) -> None:
        """Every rank writes its own partitions (collective)."""
        # frozen parameters are rebuilt from the model's source on resume: not written again
        self.engine.save_checkpoint(directory, tag=self.TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: str) -> None:
        """Restore every rank's state from ``directory``/``TAG`` (the same world size) or, with
        ``load_universal``, from ``directory``/``UNIVERSAL_TAG`` (any world size: each rank takes
        its new partition of every parameter and Adam moment). DeepSpeed's files go through the
        safe checkpoint engine."""
        if not isinstance(self.engine.checkpoint_engine, safe_checkpoint_engine_class()):
            raise RuntimeError("refusing to load a DeepSpeed checkpoint without the safe checkpoint engine "
                               "(build the engine with DeepSpeedStrategy.initialize)")
        # not strict: the frozen parameters are not in the files (save), the model was built with them
        tag = self.UNIVERSAL_TAG if self.load_universal else self.TAG
        path, _ = self.engine.load_checkpoint(directory, tag=tag, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint state under {directory!r}")
        self._lr_from_schedule()

    def _lr_from_schedule(self) -> None:
        """Set every group's lr from this job's schedule at the restored step. The optimizer state
        holds the lr the saving job's schedule gave for its next step; a job that resumes with
        another length (a longer run, or one that ended at that checkpoint, where the schedule
        has reached 0) must continue on its own schedule instead."""
        sched = self.engine.lr_scheduler
        if sched is None or not hasattr(sched, "lr_lambdas"):
            return
        for group, base, fn in zip(self.engine.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.engine.optimizer.param_groups]

    def consolidated_state_dict(self, trainable_only: bool = False) -> Optional[dict[str, torch.Tensor]]:
        """Full weights (or only the trained ones) on rank 0, in host memory (collective under
        ZeRO-3; None on other ranks)."""
        if self.zero3:
            return self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
        if self.engine.global_rank == 0:
            keep = {n for n, p in self.engine.module.named_parameters() if p.requires_grad or not trainable_only}
            return {k: v.detach().to("cpu", copy=True) for k, v in self.engine.module.state_dict().items()
                    if k in keep or not trainable_only}
        return None

    def save_hf(self, directory: str, processor: Any) -> None:
        """The consolidated model + processor as an HF folder, written by rank 0 (collective)."""
        state = self.consolidated_state_dict()
        if self.engine.global_rank == 0:
            self.write_hf(directory, state, processor)

    def write_hf(self, directory: str, state: dict[str, torch.Tensor], processor: Any,
                 base: Optional[dict] = None) -> None:
        """Rank 0 writes consolidated weights (``consolidated_state_dict``) as an HF folder, or with
        ``base`` (the ModelConfig fields of the model's source) a partial one holding only them
        (model/partial.py); no collective, so a background thread may do it while training goes on."""
        if base is not None:
            from aov_dist.model.partial import save_partial

            save_partial(directory, state, processor, self.engine.module.config, base)
            return
        self.engine.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        processor.save_pretrained(directory)

    @staticmethod
    def files_of_rank(names: Sequence[str], rank: int) -> list[str]:
        """The files of a saved ``ds/state`` folder that ``rank`` loads when resuming on the same
        world size: its own ZeRO partitions (``*zero_pp_rank_<rank>_*``) and the files every rank
        reads (ZeRO-2's ``mp_rank_00_model_states.pt``)."""
        own = re.compile(r"zero_pp_rank_(\d+)_")
        out = []
        for name in names:
            m = own.search(name)
            if (m is None and name.endswith(".pt")) or (m is not None and int(m.group(1)) == rank):
                out.append(name)
        return out

    @staticmethod
    def to_universal(ds_dir: str, out_ds_dir: str) -> None:
        """The resharded form of a local ``ds/`` folder (any world size), written to
        ``out_ds_dir``/``UNIVERSAL_TAG`` for ``load`` with ``load_universal`` (see ds_universal.py)."""
        from aov_dist.train.ds_universal import convert_to_universal

        convert_to_universal(f"{ds_dir}/{DeepSpeedStrategy.TAG}", f"{out_ds_dir}/{DeepSpeedStrategy.UNIVERSAL_TAG}")

    @staticmethod
    def state_dict_from_shards(ds_dir: str) -> dict[str, torch.Tensor]:
        """Full fp32 weights from every rank's ZeRO files of a local ``ds/`` folder. DeepSpeed's
        reader unpickles with weights_only=False: every file is safe-loaded first, so a tampered
        checkpoint is refused before that reader touches it."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        verify_ds_checkpoint(ds_dir)
        return get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=DeepSpeedStrategy.TAG)

    # ------------------------------------------------------------------ full parameters
    @contextlib.contextmanager
    def gathered(self, target: Union[nn.Module, Iterable[nn.Parameter]], modify: bool = False):
        """Full parameters of ``target`` (a module or parameters) on every rank while inside:
        read-only, or (``modify``) to write them (rank 0's values are then partitioned again). A
        no-op without ZeRO-3."""
        params = list(target.parameters()) if isinstance(target, nn.Module) else list(target)
        if not any(hasattr(p, "ds_id") for p in params):
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    def gathered_for_update(self, params: Iterable[nn.Parameter]):
        """``gathered(params, modify=True)``: what build_model loads weights into under zero.Init."""
        return self.gathered(params, modify=True)


# ---- safe loading of DeepSpeed's own checkpoint files (ds/) ----
#
