"""A progress watchdog per worker: a stalled step ends in a named error, not a job that burns the
cluster until somebody notices.

The loop tells the watchdog what it is doing (``watch.phase("step 12: forward/backward")``); any
change of phase is progress. A thread checks that the current phase is younger than the limit;
when it is not, the worker writes a report (rank, step, phase, how long, every thread's stack) to
its log, to stderr and, through ``on_stall``, to the MLflow run, then ends its process with
``STALL_EXIT_CODE``. Ending the process is the only way out that always works: the main thread may
be inside a collective (gloo/NCCL C++ code) that no Python exception reaches. Ray Train sees the
worker die and restarts the group from the last committed checkpoint (``cluster.max_failures``);
the other ranks, blocked in a collective with the dead one, fail in turn (their own watchdogs, or
the collective timeout set from the same limit).

Limit: ``train.startup_timeout_s`` until the first step is done (building the model, loading a
checkpoint, the first step with its one-off compilation); then ``train.step_timeout_s`` when set,
otherwise ``max(STEP_FACTOR x median step time, train.min_step_timeout_s)`` once a few steps are
measured (the startup limit until then).
"""
from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
import traceback
from typing import Callable, Optional

log = logging.getLogger(__name__)

STALL_EXIT_CODE = 75  # what a stalled worker exits with (EX_TEMPFAIL: retrying may help)
STEP_FACTOR = 10.0  # automatic limit: this many median steps (at least min_step_timeout_s)
MEASURED_STEPS = 3  # steps measured before the automatic limit replaces the startup limit
# A phase spent waiting for the other ranks (a collective) gets this much more time than one
# spent on the rank's own work, so that the rank that stalls reports first, with the stack that
# shows why, rather than every rank blocked behind it.
COLLECTIVE_GRACE = 1.25
REPORT_UPLOAD_S = 30.0  # at most this long for on_stall (MLflow may be the thing that is down)


COLLECTIVE_MARGIN_S = 60.0  # the collectives' timeout comes this long after the watchdog's limit


def collective_timeout_s(train) -> float:
    """The process group's timeout (``train`` = the train config section): a backstop that ends a
    collective only after the watchdog, which names the stall, would have fired."""
    return max(train.startup_timeout_s, train.step_timeout_s or 0.0, train.min_step_timeout_s) + COLLECTIVE_MARGIN_S


def start_watchdog(train, rank: int, on_stall: Optional[Callable[[str, str], None]]) -> "Watchdog":
    """The worker's watchdog from the train config section, running unless ``train.watchdog`` is off."""
    dog = Watchdog(rank, train.step_timeout_s, train.min_step_timeout_s, train.startup_timeout_s, on_stall,
                   enabled=train.watchdog)
    return dog.start()


class Watchdog:
    def __init__(self, rank: int, step_timeout_s: Optional[float], min_step_timeout_s: float,
                 startup_timeout_s: float, on_stall: Optional[Callable[[str, str], None]] = None,
                 poll_s: float = 1.0, exit_process: Callable[[int], None] = os._exit, enabled: bool = True):
        self.enabled = enabled
        self.rank, self.step_timeout_s = rank, step_timeout_s
        self.min_step_timeout_s, self.startup_timeout_s = min_step_timeout_s, startup_timeout_s
        self.on_stall, self.poll_s, self.exit_process = on_stall, poll_s, exit_process
        self.step, self.current, self.since, self.collective = 0, "starting", time.monotonic(), False
        self._step_times: list[float] = []
        self._step_started: Optional[float] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ the loop's side
    def start(self) -> "Watchdog":
        if not self.enabled:  # phases are still recorded; nothing watches them
            return self
        self._thread = threading.Thread(target=self._watch, name=f"aov-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def phase(self, what: str, collective: bool = False) -> None:
        """Progress: the worker now does ``what`` (named in a stall report); ``collective``: a phase
        that waits for the other ranks (COLLECTIVE_GRACE)."""
        with self._lock:
            self.current, self.since, self.collective = what, time.monotonic(), collective

    def step_done(self, step: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self._step_started is not None:
                self._step_times.append(now - self._step_started)
            self._step_started, self.step = now, step
            self.since = now

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- the limit
    def limit_s(self) -> float:
        with self._lock:
            measured, started = list(self._step_times), self._step_started is not None
        if not started:  # building the model, loading a checkpoint, the first step
            return float(self.startup_timeout_s)
        if self.step_timeout_s:
            return float(self.step_timeout_s)
        if len(measured) < MEASURED_STEPS:
            return float(self.startup_timeout_s)
        return max(STEP_FACTOR * statistics.median(measured), float(self.min_step_timeout_s))

    # ---------------------------------------------------------------- the thread
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                waited, what, step = time.monotonic() - self.since, self.current, self.step
                grace = COLLECTIVE_GRACE if self.collective else 1.0
            limit = self.limit_s() * grace
            if waited > limit:
                self._fire(step, what, waited, limit)
                return

    def _fire(self, step: int, what: str, waited: float, limit: float) -> None:
        headline = (f"WorkerStalled: rank {self.rank} made no progress for {waited:.0f} s (limit {limit:.0f} s) "
                    f"after step {step}, while: {what}")
        report = f"{headline}\n\n{thread_stacks()}"
        try:
            sys.stderr.write(report + "\n")
            sys.stderr.flush()
            log.error("%s", report)
        finally:
            if self.on_stall is not None:
                uploader = threading.Thread(target=self._call_on_stall, args=(report, step), daemon=True)
                uploader.start()
                uploader.join(REPORT_UPLOAD_S)
            self.exit_process(STALL_EXIT_CODE)

    def _call_on_stall(self, report: str, step: int) -> None:
        try:
            self.on_stall(report, f"stalls/rank_{self.rank}_step_{step}.txt")
        except Exception as e:  # the report is in the log already; never block the exit on it
            sys.stderr.write(f"watchdog: could not store the stall report: {e}\n")


def thread_stacks() -> str:
    """Every Python thread's stack, innermost call last (what faulthandler prints, but as text)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"--- thread {names.get(ident, '?')} ({ident}) ---\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)
