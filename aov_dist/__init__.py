"""aov-dist: distributed training and evaluation of Anomaly-OneVision."""

__version__ = "0.1.0"

import os as _os

# The Hydra configs: the repository's conf/, reached through the package (aov_dist/conf links to it
# in a checkout; a wheel carries the files there), so an installed package finds them too.
CONF_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "conf")
