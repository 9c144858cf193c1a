"""time_inference: warm-up calls untimed, repeats timed, the median of the samples."""

import statistics
import time

import pytest

from upcycle.eval import time_inference


def test_warmup_and_repeats_and_median():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002 if len(calls) > 2 else 0.05)  # slow warm-up calls must not reach the samples

    result = time_inference(fn, warmup=2, repeats=5)
    assert len(calls) == 7
    assert len(result["samples_ms"]) == 5
    assert result["median_ms"] == statistics.median(result["samples_ms"])
    assert 2.0 <= result["median_ms"] < 50.0


def test_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        time_inference(lambda: None, repeats=0)
