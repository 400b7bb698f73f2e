"""The skipped-samples policy: a warning above data.max_skip_fraction, a failure naming the key to
change above data.fail_skip_fraction, judged over windows of data.skip_window samples read."""
from __future__ import annotations

import logging

import pytest

from aov_dist.data.skip_policy import SkipPolicy, TooManySkippedSamples


def test_a_window_closes_after_enough_samples_read_and_counts_only_its_own_skips():
    policy = SkipPolicy(window=100, warn_fraction=0.5, fail_fraction=0.9)
    assert policy.update(1, 60, {"too_long": 2}) is None  # 62 read: still open
    first = policy.update(2, 100, {"too_long": 5})  # 105 read
    assert (first.read, first.skipped, first.step) == (105, {"too_long": 5}, 2)
    assert first.fraction == pytest.approx(5 / 105)
    assert policy.update(3, 150, {"too_long": 6}) is None  # 51 more read
    second = policy.update(4, 200, {"too_long": 9, "bad_image": 1})
    assert second.read == 105 and second.skipped == {"too_long": 4, "bad_image": 1}


def test_more_than_the_warning_fraction_warns_and_goes_on(caplog):
    policy = SkipPolicy(window=10, warn_fraction=0.01, fail_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="aov_dist.data.skip_policy"):
        verdict = policy.update(1, 8, {"too_long": 2})
    assert verdict.fraction == pytest.approx(0.2)
    assert "20.0 % of the 10 samples read before step 1 were skipped (too_long 2)" in caplog.text
    assert "data.max_skip_fraction=0.01" in caplog.text and "data.max_length" in caplog.text


def test_more_than_the_hard_limit_fails_naming_the_key_to_change():
    policy = SkipPolicy(window=10, warn_fraction=0.01, fail_fraction=0.1)
    with pytest.raises(TooManySkippedSamples, match=r"30.0 % of the 10 samples.*too_long 3.*"
                                                    r"data.fail_skip_fraction=0.1.*Change data.max_length"):
        policy.update(5, 7, {"too_long": 3, "bad_image": 0})


def test_bad_data_rather_than_length_points_at_the_data():
    policy = SkipPolicy(window=10, warn_fraction=0.0, fail_fraction=0.1)
    with pytest.raises(TooManySkippedSamples, match=r"bad_image 4.*data.on_error=fail"):
        policy.update(1, 6, {"bad_image": 4, "too_long": 1})


def test_the_window_continues_across_a_resume():
    a = SkipPolicy(window=100, warn_fraction=0.5, fail_fraction=0.9)
    a.update(1, 120, {"too_long": 3})  # a window closed at 123 read
    a.update(2, 150, {"too_long": 4})
    b = SkipPolicy(window=100, warn_fraction=0.5, fail_fraction=0.9)
    b.load_state_dict(a.state_dict())
    assert b.update(3, 220, {"too_long": 6}) == a.update(3, 220, {"too_long": 6})
