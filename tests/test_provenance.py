"""Results files say how they were produced, including the OpenMP settings that change small-op latency."""

import json

from upcycle.provenance import write_results


def test_results_record_the_threading_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    path = write_results(tmp_path, "probe", {"value": 1}, [], quick=True)
    machine = json.loads(path.read_text())["machine"]
    assert machine["threading_env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in machine["threading_env"]
    assert machine["torch_threads"] >= 1
