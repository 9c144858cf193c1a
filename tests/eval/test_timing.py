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


def test_no_warmup_and_a_single_repeat_are_allowed():
    calls = []
    result = time_inference(lambda: calls.append(1), warmup=0, repeats=1)
    assert len(calls) == 1 and len(result["samples_ms"]) == 1
    assert result["median_ms"] == result["samples_ms"][0]
    with pytest.raises(ValueError, match="warmup"):
        time_inference(lambda: None, warmup=-1)


def test_defaults_warm_up_twice_and_time_five_calls():
    calls = []
    result = time_inference(lambda: calls.append(1))
    assert len(calls) == 7 and len(result["samples_ms"]) == 5


@pytest.mark.parametrize(("cuda", "synchronize", "syncs"), [(True, None, 3), (False, None, 0), (False, True, 3),
                                                            (True, False, 0)])  # fmt: skip
def test_device_is_synchronised_after_each_call_when_asked_or_cuda_is_there(monkeypatch, cuda, synchronize, syncs):
    import torch

    count = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: count.append(1))
    time_inference(lambda: None, warmup=1, repeats=2, synchronize=synchronize)
    assert len(count) == syncs


def test_cases_run_round_after_round_with_setup_outside_the_timed_region():
    from upcycle.eval.timing import median_ms, time_interleaved

    log = []

    def case(name, first_slow):
        def run():
            log.append(name)
            time.sleep(0.05 if first_slow and log.count(name) == 1 else 0.001)

        return run

    def setup(name):
        log.append(f"setup {name}")
        time.sleep(0.05)  # not timed

    seconds = time_interleaved({"a": case("a", True), "b": case("b", False)}, rounds=3, warmup=1, setup=setup)
    # one warm-up round, then three timed ones; the order rotates each round, so a does not always precede b
    assert log == ["setup a", "a", "setup b", "b", "setup b", "b", "setup a", "a"] * 2
    assert len(seconds["a"]) == len(seconds["b"]) == 3
    assert all(0.001 <= s < 0.04 for s in seconds["a"] + seconds["b"])  # neither the setup nor the warm-up call
    calls = []
    assert len(time_interleaved({"a": lambda: calls.append(1)}, rounds=2)["a"]) == 2
    assert len(calls) == 3  # warm-up defaults to one round
    assert median_ms([0.003, 0.001, 0.002]) == pytest.approx(2.0)


def test_progress_bars_name_what_is_timed_and_count_rounds(monkeypatch):
    from upcycle.eval import timing

    bars = []

    def recording_tqdm(iterable, **kwargs):
        bars.append(kwargs)
        return iterable

    monkeypatch.setattr(timing, "tqdm", recording_tqdm)
    time_inference(lambda: None, warmup=0, repeats=1)
    timing.time_interleaved({"a": lambda: None}, rounds=1)
    timing.time_interleaved({"a": lambda: None}, rounds=1, desc="dense vs moe")
    assert [bar["desc"] for bar in bars] == ["time_inference", "timing", "dense vs moe"]
    assert all(bar["unit"] == "round" and bar["leave"] is False for bar in bars)
