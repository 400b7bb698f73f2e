"""`make gpu-wheels`: the wheels `make gpu-check` needs on a GPU machine that has only PyTorch.

Such a machine (see docs/benchmarks.md) has Python 3.12, torch (CUDA), an older transformers,
tokenizers, huggingface-hub, numpy, pillow, psutil, msgpack, einops, ninja, py-cpuinfo and nvcc,
and no network. What it lacks travels with the checkout in ``.whl/`` (git-ignored):

* DeepSpeed, built here as a pure-Python wheel (``DS_BUILD_OPS=0``): its CUDA ops (fused Adam)
  compile just in time on the GPU machine, where nvcc is;
* our pinned transformers and tokenizers (the model code is written against them), Hydra and
  OmegaConf (the config), and DeepSpeed's own needs that the machine lacks (hjson, pydantic);
  binary wheels for CPython 3.12 on manylinux x86_64.

The pins are those of pyproject.toml / constraints.txt; the total must stay under ``--max-mib``
(what one device call may carry beside the tree). Needs PyPI (this machine), not the GPU machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Downloaded as binary wheels for the GPU machine's Python (cp312, manylinux x86_64).
DOWNLOAD = ["transformers==5.24.0", "tokenizers==0.23.3", "hydra-core==1.3.8", "omegaconf==2.3.1", "hjson==3.1.0",
            "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
            "typing-extensions==4.16.0"]
# Built here: no wheel on PyPI (DeepSpeed is source-only; antlr4's runtime is an sdist).
BUILD = ["deepspeed==0.19.8", "antlr4-python3-runtime==4.9.3"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / ".whl"))
    p.add_argument("--max-mib", type=float, default=60.0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    platforms = [x for plat in PLATFORMS for x in ("--platform", plat)]
    run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
         *platforms, "-d", str(out), *DOWNLOAD])
    # deepspeed's setup.py imports torch: build against this environment's torch, no isolation
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), *BUILD], env=env)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{total:7.2f} MiB  in {len(wheels)} wheels ({out})")
    if total > args.max_mib:
        print(f"gpu-wheels: {total:.1f} MiB is over the {args.max_mib} MiB a device call carries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
