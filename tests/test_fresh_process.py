"""In a new interpreter, as a user runs it: ``import upcycle`` changes nothing in the process (no environment variable,
no import hook), timm imports after it on a CPU-only torch, nothing reaches for the network unless a hub id is named,
and the README's Python examples run as printed.

The processes here run without ``HF_HUB_OFFLINE`` (a user's shell has none) and with every DNS lookup and socket
connection refused and reported: a hub lookup on a machine without a network would otherwise cost ~45 s of retries,
and one with a network would download, so either way it must not happen unasked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NETWORK_USED = "NETWORK ACCESS ATTEMPTED"
NO_NETWORK = f"""
import socket as _socket, sys as _sys
def _refuse(*args, **kwargs):
    _sys.stderr.write("{NETWORK_USED}: " + repr(args[:2]) + "\\n")
    raise OSError("network access refused by the test")
_socket.getaddrinfo = _socket.create_connection = _refuse
_socket.socket.connect = _socket.socket.connect_ex = _refuse
"""


def run_fresh(code: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter without HF_HUB_OFFLINE (or the advisory-warning switch) and without a network."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", NO_NETWORK + code], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    assert NETWORK_USED not in result.stderr, result.stderr[-3000:]
    return result


def test_the_done_when_command():
    """The literal check: importing upcycle does not set HF_HUB_OFFLINE."""
    result = run_fresh("import os, upcycle; assert 'HF_HUB_OFFLINE' not in os.environ")
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_changes_nothing_in_the_process():
    code = """
import builtins, logging, os, sys, warnings
import torch
environ, meta_path, path_hooks = dict(os.environ), list(sys.meta_path), list(sys.path_hooks)
importer, filters, handlers = builtins.__import__, list(warnings.filters), list(logging.getLogger().handlers)
def torch_state():
    return torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled(), torch.initial_seed()
before = torch_state()
import upcycle
assert list(warnings.filters) == filters and logging.getLogger().handlers == handlers
assert torch_state() == before
assert dict(os.environ) == environ, {k: v for k, v in os.environ.items() if environ.get(k) != v}
assert len(sys.meta_path) == len(meta_path) and all(a is b for a, b in zip(sys.meta_path, meta_path)), sys.meta_path
assert len(sys.path_hooks) == len(path_hooks) and all(a is b for a, b in zip(sys.path_hooks, path_hooks))
assert builtins.__import__ is importer
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"timm", "transformers", "torchvision", "sklearn",
                                                               "pymetis", "gguf", "tensorboard", "matplotlib"})
assert not heavy, f"import upcycle imported {heavy}"
print("ok")
"""
    result = run_fresh(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok"]


def test_timm_imports_after_upcycle_without_a_hub():
    """On a CPU-only torch the PyPI torchvision needs upcycle's operator fix; after it the fix reports nothing left
    to do, and timm builds a model by name (no weights: no hub)."""
    code = (
        "import upcycle, timm, torchvision; "
        "timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=3); "
        "from upcycle._compat import _torchvision_ops_missing; print(_torchvision_ops_missing())"
    )
    result = run_fresh(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False"]


# ---- the README's ```python blocks, each in its own new interpreter ---------------------------------------------
def readme_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def needs_earlier_runs(block: str, cwd: Path) -> list[str]:
    """The ``runs/...`` folders a block reads that the commands shown beside it make (minutes to hours of
    training each): those blocks are skipped rather than rerun here."""
    return [path for path in re.findall(r"[\"'](runs/[^\"'{}]+)[\"']", block) if not (cwd / path).exists()]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_python_block_runs_as_printed(index, tmp_path):
    block = readme_blocks()[index]
    missing = needs_earlier_runs(block, tmp_path)
    if missing:
        pytest.skip(f"reads {', '.join(missing)}, the output of the README's commands beside it")
    result = run_fresh(block, cwd=tmp_path)
    if result.returncode != 0 and "Obtain it with:" in result.stderr:
        pytest.skip("needs an offline dataset that is not installed here (make data): " + result.stderr[-300:])
    assert result.returncode == 0, f"README python block {index}:\n{block}\n{result.stderr[-3000:]}"


def test_the_readme_has_python_blocks():
    assert readme_blocks(), "no ```python block found in README.md"


def test_local_folders_load_convert_and_export_without_a_hub(tmp_path):
    """A Hugging Face folder with its tokenizer, converted, saved, exported as Mixtral and as upcycle's own LM, and
    each read back through transformers' Auto classes: every path is local, so nothing may reach for a hub."""
    from upcycle.assets import minilm_dir

    from .export.helpers import tiny_llama
    from .models.helpers import tiny_lm

    try:
        tokenizer_dir = minilm_dir()
    except FileNotFoundError as error:
        pytest.skip(f"the MiniLM asset package is not installed (make install): {error}")
    tiny_llama().save_pretrained(tmp_path / "llama")
    tiny_lm().save_pretrained(tmp_path / "lm")
    code = f"""
import sys
import upcycle
from upcycle.data.tokenizers import HFTokenizer
from upcycle.sources import load_source
tokenizer = HFTokenizer.from_path({str(tokenizer_dir)!r})
dense = load_source({str(tmp_path / "llama")!r})
moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, progress=False)
upcycle.save(moe, "saved")
upcycle.export(upcycle.load("saved"), "mixtral", format="mixtral")
lm = load_source({str(tmp_path / "lm")!r})  # upcycle's own model type, read by transformers' Auto classes
import transformers
print(type(transformers.AutoModelForCausalLM.from_pretrained("mixtral")).__name__, type(lm).__name__,
      tokenizer.vocab_size > 0)
"""
    result = run_fresh(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["MixtralForCausalLM", "UpcycleLMForCausalLM", "True"]
