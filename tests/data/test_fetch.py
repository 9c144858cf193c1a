import time

import pytest

from upcycle.data import fetch_all
from upcycle.data.fetch import main


def test_fetch_all_is_idempotent_and_quick_when_present(fetched):
    start = time.perf_counter()
    again = fetch_all()
    assert time.perf_counter() - start < 2.0
    for name, status in fetched.items():
        if status != "present" and not status.startswith("missing"):
            assert status == "fetched"
        if not status.startswith("missing"):
            assert again[name] == "present"


def test_fetch_names_expand_and_unknown_is_refused(fetched):
    assert list(fetch_all(["python_docs"])) == ["python_docs"]
    assert set(fetch_all(["text_mixture"])) == {"shakespeare", "python_code", "python_docs"}
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        fetch_all(["imagenet"])


def test_cli_prints_a_line_per_dataset(capsys, fetched):
    code = main(["digits", "python_code"])
    out = capsys.readouterr().out
    assert code == 0 and "digits" in out and "python_code" in out and "present" in out
