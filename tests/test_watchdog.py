"""The progress watchdog on its own (train/watchdog.py): when it fires, what it reports, its limit."""
from __future__ import annotations

import threading
import time

import pytest

from aov_dist.train.watchdog import STALL_EXIT_CODE, Watchdog


class Exits:
    def __init__(self):
        self.codes: list[int] = []
        self.done = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.done.set()


def test_the_startup_limit_holds_until_the_first_step_is_done():
    exits = Exits()
    with Watchdog(rank=0, step_timeout_s=0.1, min_step_timeout_s=0, startup_timeout_s=99, poll_s=0.05,
                  exit_process=exits) as dog:
        dog.phase("building the model")
        time.sleep(0.5)  # 5 x the step limit: building is not a step
        assert exits.codes == []
        dog.step_done(1)
        assert exits.done.wait(10)


def test_a_phase_older_than_the_limit_reports_rank_step_phase_and_stacks_then_exits():
    exits, reports = Exits(), []
    dog = Watchdog(rank=1, step_timeout_s=0.3, min_step_timeout_s=0, startup_timeout_s=99, poll_s=0.05,
                   on_stall=lambda text, name: reports.append((name, text)), exit_process=exits)
    with dog:
        dog.step_done(4)
        dog.phase("step 5: reading the next batch")
        assert exits.done.wait(10)
    assert exits.codes == [STALL_EXIT_CODE]
    (name, text), = reports
    assert name == "stalls/rank_1_step_4.txt"
    assert text.startswith("WorkerStalled: rank 1 made no progress for") and "(limit 0 s) after step 4" in text
    assert "while: step 5: reading the next batch" in text
    # every thread's stack, the waiting main thread's included
    assert "--- thread MainThread" in text and "test_a_phase_older_than_the_limit" in text


def test_progress_keeps_the_watchdog_quiet():
    exits = Exits()
    with Watchdog(rank=0, step_timeout_s=0.4, min_step_timeout_s=0, startup_timeout_s=99, poll_s=0.05,
                  exit_process=exits) as dog:
        for step in range(1, 11):
            dog.phase(f"step {step}")
            time.sleep(0.1)
            dog.step_done(step)
    assert exits.codes == []


def test_the_automatic_limit_follows_the_measured_steps_after_the_startup_limit():
    dog = Watchdog(rank=0, step_timeout_s=None, min_step_timeout_s=2.0, startup_timeout_s=600, poll_s=60)
    assert dog.limit_s() == 600  # nothing measured: model build, first steps
    dog.step_done(0)
    for step, pause in enumerate([0.01, 0.3, 0.01, 0.01], start=1):
        time.sleep(pause)
        dog.step_done(step)
    assert dog.limit_s() == 2.0  # 10 x median (~0.1 s) is below the floor
    dog._step_times[:] = [1.0, 1.2, 5.0]
    assert dog.limit_s() == pytest.approx(12.0)  # 10 x the median, not the mean
    configured = Watchdog(0, 45.0, 300, 600)
    assert configured.limit_s() == 600  # until the first step is done
    configured.step_done(1)
    assert configured.limit_s() == 45.0  # then a configured limit wins


def test_a_failing_report_upload_never_keeps_the_worker_alive():
    exits = Exits()

    def broken(text, name):
        raise ConnectionError("tracking server down")

    with Watchdog(rank=0, step_timeout_s=0.2, min_step_timeout_s=0, startup_timeout_s=99, poll_s=0.05,
                  on_stall=broken, exit_process=exits) as dog:
        dog.step_done(1)
        assert exits.done.wait(10)
    assert exits.codes == [STALL_EXIT_CODE]


def test_a_rank_waiting_in_a_collective_gives_the_stalled_rank_time_to_report_first():
    exits = Exits()
    with Watchdog(rank=0, step_timeout_s=0.4, min_step_timeout_s=0, startup_timeout_s=99, poll_s=0.02,
                  exit_process=exits) as dog:
        dog.step_done(1)
        dog.phase("step 2: the step's all-reduce", collective=True)
        t0 = time.monotonic()
        assert exits.done.wait(10)
        waited = time.monotonic() - t0
    assert waited >= 0.4 * 1.25  # COLLECTIVE_GRACE x the limit, not the limit


def test_the_collectives_time_out_only_after_the_watchdog_would_have_fired():
    from aov_dist.train.config import TrainConfig
    from aov_dist.train.watchdog import collective_timeout_s

    assert collective_timeout_s(TrainConfig()) == 1800 + 60  # the startup limit is the larger one
    assert collective_timeout_s(TrainConfig(step_timeout_s=3600)) == 3600 + 60
    assert collective_timeout_s(TrainConfig(startup_timeout_s=30, min_step_timeout_s=300)) == 300 + 60
