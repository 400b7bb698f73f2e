#!/usr/bin/env python
"""`make launch` / `make launch-eval`: submit a job to the Ray cluster at RAY_ADDRESS.

See aov_dist/cluster/submit.py (python launch/submit.py --help) and docs/cluster.md.
"""
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aov_dist.cluster.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
