"""A CUDA device as far as our code can tell, on a machine without one: for tests of the GPU path.

The engine (or predictor) reports ``FAKE_CUDA`` as its device and the process group reports it as
its collective device (as an NCCL group would). ``aov_dist.devices.place`` (the one tensor move of
the batch and collective paths) is replaced by a stand-in that leaves the data on the CPU, so the
step really computes, but tags the tensor with the device it was placed on. Then:

* ``ModelInputs`` (a forward pre-hook, first in line) records the device of every tensor that
  reaches the model: untagged CPU tensors are what a GPU run would hand the model off-device.
* ``CollectiveSpy`` wraps torch.distributed's collectives and records the device of every tensor
  that *our* code (a caller in ``aov_dist``) hands to one; DeepSpeed's own collectives pass through.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable

import torch

FAKE_CUDA = torch.device("cuda", 0)
_TAG = "_aov_fake_device"


def device_of(t: torch.Tensor) -> torch.device:
    return getattr(t, _TAG, t.device)


def tagging_place(real_place: Callable) -> Callable:
    def place(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return real_place(tensor, device)
        out = tensor.detach().view_as(tensor)  # same data, its own tensor object to tag
        setattr(out, _TAG, device)
        return out

    return place


def install_place(monkeypatch=None) -> None:
    """Swap aov_dist.devices.place for the tagging one (a pytest monkeypatch, or for good in a
    spawned rank)."""
    from aov_dist import devices

    fake = tagging_place(devices.place)
    if monkeypatch is not None:
        monkeypatch.setattr(devices, "place", fake)
    else:
        devices.place = fake


def _tensors(obj: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _tensors(v, f"{prefix}[{i}]")]
    return []


class ModelInputs:
    """Records (call, argument name, device) of every tensor a module's forward receives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def record(self, what: str, fn: Callable, args: tuple, kwargs: dict) -> None:
        try:
            sig = inspect.signature(fn)
            named = {}
            for name, value in sig.bind(*args, **kwargs).arguments.items():
                if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(value)  # generate(**batch): the batch's own keys
                else:
                    named[name] = value
        except TypeError:
            named = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
        for name, value in named.items():
            for key, t in _tensors(value, name):
                self.seen.append((what, key, str(device_of(t))))

    def hook_forward(self, module: torch.nn.Module) -> None:
        def pre_hook(mod, args, kwargs):
            self.record("forward", mod.forward, args, kwargs)

        # first in line: DeepSpeed's own pre-hooks may wrap the inputs in new tensors
        module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)

    def wrap_method(self, obj: Any, name: str) -> None:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.record(name, fn, args, kwargs)
            return fn(*args, **kwargs)

        setattr(obj, name, wrapped)


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
                "broadcast", "reduce", "gather", "scatter", "all_to_all_single", "all_to_all", "barrier",
                "all_gather_object", "broadcast_object_list")


class CollectiveSpy:
    """Records (collective, caller module, device) for the collectives our code issues."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def install(self) -> None:
        import torch.distributed as dist

        for name in _COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, real: Callable) -> Callable:
        @functools.wraps(real)
        def spy(*args, **kwargs):
            caller = _caller_module()
            if caller.startswith("aov_dist"):
                if name == "barrier":
                    ids = kwargs.pop("device_ids", None)  # the real group here is gloo: it takes none
                    device = f"cuda:{ids[0]}" if ids else "unspecified (the group guesses)"
                else:
                    tensors = _tensors(list(args) + list(kwargs.values()), "")
                    device = ",".join(sorted({str(device_of(t)) for _, t in tensors})) or "no tensor"
                self.calls.append((name, caller, device))
            return real(*args, **kwargs)

        return spy


def _caller_module() -> str:
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("torch.distributed"):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""
