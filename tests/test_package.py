"""The installed package and the project metadata agree."""
import tomllib
from pathlib import Path

import aov_dist

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert aov_dist.__version__ == meta["project"]["version"]


def test_torch_is_the_pinned_cpu_build():
    # A CUDA torch sneaking in through an unpinned dependency is the classic install failure here.
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0"
