"""Optional parts are extras of the package (pyproject.toml), and each one missing is named with the extra that
installs it. "Missing" is simulated by a ``None`` entry in ``sys.modules``, which makes ``import`` fail as it does
for a package that is not installed."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

from upcycle._optional import EXTRAS, MissingExtra, available, install_hint, require
from upcycle.errors import UserError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads(PYPROJECT.read_text())["project"]


def distribution(requirement: str) -> str:
    return requirement.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()


def test_the_extras_match_pyproject():
    declared = project()["optional-dependencies"]
    assert {name: tuple(map(distribution, declared[name])) for name in EXTRAS} == EXTRAS
    assert declared["all"] == [f"upcycle[{','.join(EXTRAS)}]"]
    assert "upcycle[all]" in declared["dev"], "the tests need every optional part"
    core = [distribution(r) for r in project()["dependencies"]]
    assert not {d for group in EXTRAS.values() for d in group} & set(core), "an extra's package is also required"


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymetis", None)
    with pytest.raises(MissingExtra, match=r"METIS partitioning needs 'pymetis'.*pip install 'upcycle\[metis\]'"):
        require("pymetis", extra="metis", purpose="METIS partitioning")
    assert issubclass(MissingExtra, UserError) and issubclass(MissingExtra, ImportError)


def test_require_returns_the_module_and_knows_its_extras():
    import json

    assert require("json", extra="metis", purpose="x") is json
    assert install_hint("gguf") == "pip install 'upcycle[gguf]'"
    with pytest.raises(KeyError, match="no extra 'nope'"):
        install_hint("nope")


def test_require_keeps_an_installed_package_own_import_error(tmp_path, monkeypatch):
    """A package that is there but fails on one of its own imports says so, not "install the extra"."""
    (tmp_path / "broken_optional_pkg.py").write_text("import a_module_nobody_has_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_module_nobody_has_installed") as error:
        require("broken_optional_pkg", extra="metis", purpose="x")
    assert not isinstance(error.value, MissingExtra)


def test_available(monkeypatch):
    assert available("json") and not available("a_module_nobody_has_installed")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert not available("tensorboard")


def test_graph_partition_sampling_without_pymetis(monkeypatch):
    from upcycle.methods.jetpack.sampling import graph_partition_sampling

    monkeypatch.setitem(sys.modules, "pymetis", None)
    counts = torch.ones(8, 8)
    counts[:4, :4] = counts[4:, 4:] = 100.0
    with pytest.raises(MissingExtra, match=r"pip install 'upcycle\[metis\]'"):
        graph_partition_sampling(counts, 2, 4, torch.Generator().manual_seed(0), parts=2, weighted=True)


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_reading_gguf_without_the_gguf_extra(missing, tmp_path, monkeypatch):
    from upcycle.sources import load_source

    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, missing, None)
    checkpoint = tmp_path / "model.gguf"
    checkpoint.write_bytes(b"GGUF")
    with pytest.raises(UserError, match=rf"'{missing}'.*pip install 'upcycle\[gguf\]'"):
        load_source(checkpoint)


def test_digits_without_scikit_learn(monkeypatch):
    """A dataset that cannot be read raises FileNotFoundError with the command that obtains it (the data contract)."""
    from upcycle.data import digits, load_dataset

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    digits._read.cache_clear()
    digits._splits.cache_clear()  # splits an earlier test read would otherwise be served without reading again
    try:
        with pytest.raises(FileNotFoundError, match=r"pip install 'upcycle\[sklearn\]'"):
            load_dataset("digits", "train")
    finally:
        digits._read.cache_clear()
        digits._splits.cache_clear()


def test_training_without_tensorboard_warns_and_keeps_its_csv(tmp_path, monkeypatch):
    from upcycle.train.metrics_log import MetricsLog

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.warns(UserWarning, match=r"TensorBoard logs are skipped.*pip install 'upcycle\[tensorboard\]'"):
        log = MetricsLog(tmp_path, enabled=True)
    log.log(1, "train", {"loss": 0.5})
    log.close()
    assert log.rows()[0]["loss"] == "0.5" and not (tmp_path / "tb").exists()


def test_training_with_tensorboard_writes_its_logs(tmp_path):
    from upcycle.train.metrics_log import MetricsLog

    pytest.importorskip("tensorboard")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = MetricsLog(tmp_path, enabled=True)
    log.log(1, "train", {"loss": 0.5})
    log.close()
    assert any((tmp_path / "tb").iterdir())
