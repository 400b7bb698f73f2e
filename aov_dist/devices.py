"""Where tensors live: the one rule for a worker's device, for moving a batch onto it, and for the
device a collective's tensor must be on.

* A worker's device is decided by the cluster section: ``cluster.use_gpu`` -> the current CUDA
  device (Ray Train sets it per worker; a standalone launcher sets it from LOCAL_RANK), else CPU.
  DeepSpeed's accelerator follows the same section (``cluster.config.deepspeed_accelerator``).
* A batch reaches the model through ``move_to_device`` only. Keys named in ``keep_on_host`` stay
  on the CPU: small layout metadata the model reads as Python ints (a device copy would cost a
  host sync per image).
* A collective's tensor is on the process group's device: NCCL groups reduce CUDA tensors, gloo
  groups CPU tensors (``collective_device``), whatever device the model runs on.
"""
from __future__ import annotations

import os
from typing import Any, Collection, Mapping, Optional

import torch

def worker_device(use_gpu: bool) -> torch.device:
    """This process's training device: the current CUDA device on GPU clusters, else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("cluster.use_gpu=true but this worker sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                           "check the node's GPUs and the preset's accelerator_type")
    return torch.device("cuda", torch.cuda.current_device())


def place(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The only tensor move of the batch and collective paths (non-blocking from pinned memory)."""
    return tensor.to(device, non_blocking=True)


def move_to_device(obj: Any, device: torch.device, keep_on_host: Collection[str] = ()) -> Any:
    """Every tensor of a (nested) batch on ``device``, except the top-level keys ``keep_on_host``."""
    if isinstance(obj, torch.Tensor):
        return place(obj, device)
    if isinstance(obj, Mapping):
        return {k: (v if k in keep_on_host else move_to_device(v, device)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


# torch.distributed backend -> the device type its collectives take
_BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu", "mpi": "cpu", "ucc": "cpu"}


def collective_device(worker: torch.device, backend: Optional[str] = None) -> torch.device:
    """The device of a tensor handed to a collective of the default group.

    ``backend`` is ``dist.get_backend()`` (a name like "nccl", or a per-device map such as
    "cpu:gloo,cuda:nccl"); the worker's device when the group serves its type, else the CPU."""
    import torch.distributed as dist

    if backend is None:
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
    if ":" in backend:
        served = {part.split(":", 1)[0] for part in backend.split(",")}
    else:
        served = {_BACKEND_DEVICE.get(backend, "cpu")}
    return worker if worker.type in served else torch.device("cpu")
