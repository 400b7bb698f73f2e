"""aov-dist: distributed training and evaluation of Anomaly-OneVision."""

__version__ = "0.1.0"
