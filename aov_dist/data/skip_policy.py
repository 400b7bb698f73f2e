"""How many skipped samples a job tolerates: loud above ``data.max_skip_fraction``, fatal above
``data.fail_skip_fraction``, judged over windows of ``data.skip_window`` samples read.

The counts it is fed are summed over all ranks (one all-reduce per step in the loop), so every
rank reaches the same verdict at the same step: a job that fails here fails on every rank at once
instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional

log = logging.getLogger(__name__)

# What to change when one reason dominates a bad window.
_REMEDY = {
    "too_long": "data.max_length (samples longer than it after image expansion are skipped)",
}
_DEFAULT_REMEDY = "the data (data.on_error=fail stops at the first bad sample and names its shard and key)"


class TooManySkippedSamples(RuntimeError):
    """More than data.fail_skip_fraction of a window's samples were skipped."""


@dataclass
class WindowVerdict:
    step: int
    read: int
    skipped: dict[str, int]

    @property
    def fraction(self) -> float:
        return sum(self.skipped.values()) / self.read if self.read else 0.0

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items(), key=lambda kv: -kv[1]) if v)
        return (f"{100 * self.fraction:.1f} % of the {self.read} samples read before step {self.step} were skipped"
                + (f" ({parts})" if parts else ""))

    def remedy(self) -> str:
        worst = max(self.skipped.items(), key=lambda kv: kv[1])[0] if self.skipped else ""
        return _REMEDY.get(worst, _DEFAULT_REMEDY)


class SkipPolicy:
    def __init__(self, window: int, warn_fraction: float, fail_fraction: float):
        self.window, self.warn_fraction, self.fail_fraction = window, warn_fraction, fail_fraction
        self._start_read = 0
        self._start_skipped: dict[str, int] = {}

    def update(self, step: int, samples_used: int, skipped: Mapping[str, int]) -> Optional[WindowVerdict]:
        """Cumulative counts after ``step`` (job-wide). Returns the verdict of a window that just
        closed (None while it is open); warns above the warning level, raises above the hard one."""
        read = samples_used + sum(skipped.values())
        if read - self._start_read < self.window:
            return None
        verdict = WindowVerdict(step, read - self._start_read,
                                {k: v - self._start_skipped.get(k, 0) for k, v in skipped.items()})
        self._start_read, self._start_skipped = read, dict(skipped)
        if verdict.fraction > self.fail_fraction:
            raise TooManySkippedSamples(
                f"{verdict.describe()}: over the hard limit data.fail_skip_fraction={self.fail_fraction}. "
                f"Change {verdict.remedy()}, or raise data.fail_skip_fraction to accept it")
        if verdict.fraction > self.warn_fraction:
            log.warning("%s: over data.max_skip_fraction=%s; check %s", verdict.describe(), self.warn_fraction,
                        verdict.remedy())
        return verdict

    def state_dict(self) -> dict:
        return {"start_read": self._start_read, "start_skipped": dict(self._start_skipped)}

    def load_state_dict(self, state: Mapping) -> None:
        self._start_read = int(state.get("start_read", 0))
        self._start_skipped = {k: int(v) for k, v in (state.get("start_skipped") or {}).items()}
