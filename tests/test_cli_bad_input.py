"""Bad input through the CLI: a clear message, the right exit code, no traceback, nothing written, nothing lost.

Each case of the table runs ``upcycle.cli.main`` in-process and checks: the exit code (2: change the input, 1: the
run failed), no traceback, the expected message, nothing at ``--out`` (nor a temporary or lock sibling), and every
input file byte for byte as before. Ctrl-C and a second concurrent writer need a real second process.
"""

import errno
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import upcycle
from upcycle.cli import main
from upcycle.sources import load_timm

from .conversion.tiny_models import build

TINY_VIT = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 24, "depth": 2, "num_heads": 2,
            "num_classes": 10}  # fmt: skip
SMALL = ["--experts", "2", "--top-k", "1"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny Llama folder, its MoE (upcycle save), a GPT-2 folder and a dense ViT, built once for the module."""
    root = tmp_path_factory.mktemp("assets")
    build("llama").save_pretrained(root / "llama")
    build("gpt2").save_pretrained(root / "gpt2")
    assert main(["convert", str(root / "llama"), *SMALL, "--out", str(root / "moe")]) == 0
    torch.manual_seed(0)
    upcycle.save(load_timm("vit_tiny_patch16_224", None, False, TINY_VIT), root / "vit")
    return root


class Workspace:
    """A test's folder: copies of the assets it asks for, and the output path ``out``."""

    def __init__(self, tmp: Path, assets: Path, monkeypatch):
        self.tmp, self.assets, self.monkeypatch = tmp, assets, monkeypatch
        self.out = tmp / "out"

    def copy(self, name: str) -> str:
        target = self.tmp / name
        if not target.exists():
            shutil.copytree(self.assets / name, target)
        return str(target)

    def nested(self, name: str) -> str:
        """A copy of asset ``name`` inside the folder ``outer``."""
        shutil.copytree(self.assets / name, self.tmp / "outer" / name)
        return str(self.tmp / "outer" / name)

    def write(self, name: str, text: str) -> str:
        (self.tmp / name).write_text(text)
        return str(self.tmp / name)

    def poison(self, name: str, tensor: str, value: float = float("nan"), file: str = "model.safetensors") -> str:
        """A copy of asset ``name`` whose ``tensor`` holds one NaN / Inf."""
        path = Path(self.copy(name)) / file
        state = load_file(path)
        state[tensor].view(-1)[3] = value
        save_file(state, path, metadata={"format": "pt"})
        return str(path.parent)

    def edit_config(self, name: str, drop: str) -> str:
        path = Path(self.copy(name)) / "config.json"
        config = json.loads(path.read_text())
        del config[drop]
        path.write_text(json.dumps(config))
        return str(path.parent)


def _fail_mkdtemp(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))  # a read-only output folder


def _disk_full(tensors, filename, metadata=None):
    raise OSError(errno.ENOSPC, "No space left on device", filename)


def _nan_on_step(step: int):
    """A loss that turns NaN on optimizer step ``step`` (1-based)."""
    from upcycle.eval.tasks import ImageClassification

    original, calls = ImageClassification.loss, {"n": 0}

    def loss(self, model, batch, generator):
        calls["n"] += 1
        value, metrics = original(self, model, batch, generator)
        return (value * float("nan") if calls["n"] == step else value), metrics

    return loss


def _train_args(source, out, steps: int = 2) -> list[str]:
    return ["train", str(source), "--data", "digits", "--steps", str(steps), "--batch-size", "8", "--out", str(out),
            "--set", "eval_batches=1"]  # fmt: skip


def _train(w: Workspace, *extra: str) -> list[str]:
    return [*_train_args(w.copy("vit"), w.out), *extra]


@dataclass
class Case:
    name: str
    argv: object  # Workspace -> the command line
    code: int
    message: str
    absent: str = ""  # what must not exist under --out afterwards ("": --out itself)


# fmt: off
CASES = [
    # recipes and config files
    Case("yaml syntax error", lambda w: ["convert", w.copy("llama"), "--config",
         w.write("r.yaml", "convert: {num_experts: 2\n"), "--out", str(w.out)], 2, "is not valid YAML: line"),
    Case("yaml top level is a list", lambda w: ["convert", w.copy("llama"), "--config",
         w.write("r.yaml", "- 1\n- 2\n"), "--out", str(w.out)], 2, "must hold a mapping of keys"),
    Case("yaml section is a number", lambda w: ["convert", w.copy("llama"), "--config",
         w.write("r.yaml", "convert: 3\n"), "--out", str(w.out)], 2, "the convert section of"),
    Case("yaml boolean for an integer", lambda w: ["convert", w.copy("llama"), "--config",
         w.write("r.yaml", "convert: {num_experts: true}\n"), "--out", str(w.out)], 2,
         "num_experts: Input should be a valid integer, got True"),
    Case("yaml string for a float", lambda w: ["convert", w.copy("llama"), "--config",
         w.write("r.yaml", "convert: {router: {init_std: '0.1'}}\n"), "--out", str(w.out)], 2,
         "router.init_std: Input should be a valid number"),
    Case("train yaml boolean for steps", lambda w: ["train", w.copy("vit"), "--config",
         w.write("t.yaml", "train: {data: digits, steps: yes}\n"), "--out", str(w.out)], 2,
         "steps: Input should be a valid integer, got True"),
    Case("run recipe syntax error", lambda w: ["run", w.write("run.yaml", "run: [source\n"), "--out", str(w.out)],
         2, "is not valid YAML"),
    Case("run recipe is a string", lambda w: ["run", w.write("run.yaml", "just text\n"), "--out", str(w.out)],
         2, "must hold a mapping of keys (key: value lines), got a str"),
    Case("run recipe boolean for an integer", lambda w: ["run", w.write("run.yaml", "run: {source: 'timm:vit_tiny_"
         "patch16_224'}\nconvert: {num_experts: true}\n"), "--out", str(w.out)], 2, "num_experts: Input should be a "
         "valid integer, got True"),
    Case("d2dmoe recipe boolean for an integer", lambda w: ["d2dmoe", w.copy("vit"), "--recipe",
         w.write("d.yaml", "d2dmoe: {data: digits, num_experts: true}\n"), "--out", str(w.out)], 2,
         "num_experts: Input should be a valid integer"),
    # flags
    Case("router init std inf", lambda w: ["convert", w.copy("llama"), "--router-init-std", "inf",
         "--out", str(w.out)], 2, "--router-init-std must be a finite number > 0, got inf"),
    Case("router init std nan", lambda w: ["convert", w.copy("llama"), "--router-init-std", "nan",
         "--out", str(w.out)], 2, "--router-init-std must be a finite number > 0"),
    Case("router init std zero", lambda w: ["convert", w.copy("llama"), "--router-init-std", "0",
         "--out", str(w.out)], 2, "--router-init-std must be a finite number > 0"),
    Case("--set value that is not YAML", lambda w: ["convert", w.copy("llama"), "--set", "granularity=[1,",
         "--out", str(w.out)], 2, "is not a YAML value"),
    Case("--layers with a word", lambda w: ["convert", w.copy("llama"), "--layers", "1,x", "--out", str(w.out)],
         2, "--layers takes all, every_other, last_half or comma-separated FFN indices"),
    Case("export qwen2_moe with the fused layout", lambda w: ["export", w.copy("moe"), "--format", "qwen2_moe",
         "--layout", "fused", "--out", str(w.out)], 2, "--layout chooses the mixtral tensor layout"),
    # weights
    Case("NaN weights", lambda w: ["convert", w.poison("llama", "model.layers.1.mlp.up_proj.weight"), *SMALL,
         "--out", str(w.out)], 2, "contains NaN or Inf in model.layers.1.mlp.up_proj.weight"),
    Case("NaN embedding, --stream", lambda w: ["convert", w.poison("llama", "model.embed_tokens.weight"), *SMALL,
         "--stream", "--out", str(w.out)], 2, "contains NaN or Inf in model.embed_tokens.weight"),
    Case("Inf FFN weight, --stream", lambda w: ["convert", w.poison("llama", "model.layers.2.mlp.down_proj.weight",
         float("inf")), *SMALL, "--stream", "--out", str(w.out)], 2, "model.layers.2.mlp"),
    Case("export of a saved model with NaN weights", lambda w: ["export", w.poison("moe", "lm_head.weight"),
         "--format", "mixtral", "--out", str(w.out)], 2, "contains NaN or Inf in lm_head.weight"),
    Case("NaN loss on the last step", lambda w: (w.monkeypatch.setattr(
         "upcycle.eval.tasks.ImageClassification.loss", _nan_on_step(2)), _train(w))[1], 1,
         "the loss became nan at step 2", absent="model"),
    Case("weights Inf after the last update", lambda w: [*_train_args(w.copy("vit"), w.out, steps=1), "--lr", "1e39",
         "--set", "grad_clip=null", "--set", "warmup=0"], 1, "the weights became NaN or Inf at step 1", absent="model"),
    # sources that do not fit the command
    Case("config.json without layers (upcycle folder)", lambda w: ["export", w.edit_config("moe", "layers"),
         "--format", "mixtral", "--out", str(w.out)], 2, "lacks layers of an upcycle record"),
    Case("config.json without num_hidden_layers", lambda w: ["convert", w.edit_config("llama", "num_hidden_layers"),
         "--out", str(w.out)], 2, "do not match its config.json"),
    Case("vision model given a text dataset", lambda w: ["train", w.copy("vit"), "--data", "shakespeare",
         "--steps", "1", "--out", str(w.out)], 2, "is not one; choose one of digits"),
    Case("hub id in no cache, offline", lambda w: ["convert", "no-such-org/no-such-model@v2", "--out", str(w.out)], 2,
         "is neither a local path nor in the Hugging Face cache"),
    Case("timm architecture without weights", lambda w: ["convert", "timm:vit_tiny_patch16_224", "--out",
         str(w.out)], 2, "names no weights: use timm:ARCH.TAG or --pretrained"),
    Case("timm tag and --random-init", lambda w: ["convert", "timm:vit_tiny_patch16_224.augreg_in21k",
         "--random-init", "--out", str(w.out)], 2, "takes one source of weights"),
    Case("verify of one family against another", lambda w: ["verify", w.copy("moe"), "--against", w.copy("gpt2")],
         2, "model.layers.0.mlp"),
    # the output folder
    Case("--out is the source, with --overwrite", lambda w: ["convert", w.copy("llama"), *SMALL, "--overwrite",
         "--out", w.copy("llama")], 2, "is inside the source", absent="model.safetensors.index.json"),
    Case("--out inside the source", lambda w: ["convert", w.copy("llama"), *SMALL, "--out",
         str(Path(w.copy("llama")) / "moe")], 2, "is inside the source"),
    Case("export --out holds the source, with --overwrite", lambda w: ["export", w.nested("moe"), "--format",
         "mixtral", "--overwrite", "--out", str(w.tmp / "outer")], 2, "holds the source", absent="x"),
    Case("existing --out without --overwrite", lambda w: ["convert", w.copy("llama"), *SMALL, "--out",
         w.copy("moe")], 2, "already exists", absent="x"),
    Case("read-only output folder", lambda w: (w.monkeypatch.setattr("upcycle.atomic.tempfile.mkdtemp",
         _fail_mkdtemp), ["convert", w.copy("llama"), *SMALL, "--out", str(w.out)])[1], 1,
         "Permission denied"),
    Case("full disk", lambda w: (w.monkeypatch.setattr(importlib.import_module("upcycle.export.shards"), "save_file",
         _disk_full),
         ["convert", w.copy("llama"), *SMALL, "--out", str(w.out)])[1], 1,
         "No space left on device"),
]
# fmt: on


def tree_digest(root: Path, skip: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` except those under ``skip`` (the output)."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and skip not in path.parents and not path.name.startswith(f".{skip.name}."):
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, assets, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    w = Workspace(work, assets, monkeypatch)
    argv = case.argv(w)
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else w.out
    before = tree_digest(work, out if case.absent == "" else work / "nothing")
    code = main(argv)
    stdout, stderr = capsys.readouterr()
    assert code == case.code, stderr
    assert "Traceback" not in stdout + stderr
    assert case.message in stderr, stderr
    assert 1 <= len(stderr[stderr.index("upcycle: error:") :].strip().splitlines()) <= 3, stderr
    assert not (out / case.absent).exists() if case.absent else not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # temp dirs, locks
    after = tree_digest(work, out if case.absent == "" else work / "nothing")
    if case.absent and case.absent != "model":  # --out is an input here: it must be untouched
        assert after == before
    else:
        assert {k: v for k, v in after.items() if k in before} == before


def test_debug_shows_the_traceback(assets, tmp_path):
    with pytest.raises(ValueError, match="finite number > 0"):
        main(["--debug", "convert", str(assets / "llama"), "--router-init-std", "inf", "--out", str(tmp_path / "o")])


def test_no_leftovers_after_overwrite_and_dead_writers_cleaned(assets, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["convert", str(assets / "llama"), *SMALL, "--out", str(out)]
    assert main(args) == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: what it left is stale
    (tmp_path / f".out.{pid}.abc123.partial").mkdir()  # a run killed while writing
    (tmp_path / f".out.{pid}.old").mkdir()  # a run killed between its two renames, beside a complete output
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # killed between the renames with no output in place: the previous output comes back, then is replaced
    os.replace(out, tmp_path / f".out.{pid}.old")
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").is_file()
    capsys.readouterr()


SLOW_WRITER = """
import importlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even when started from a background job
shards = importlib.import_module("upcycle.export.shards")
add = shards.ShardWriter.add
def slow_add(self, name, tensor):  # the write takes long enough to be interrupted or contended
    time.sleep(0.2)
    add(self, name, tensor)
shards.ShardWriter.add = slow_add
from upcycle.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_slow(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _wait_for_partial(tmp_path: Path, name: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(tmp_path.glob(f".{name}.*.partial")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)


def test_concurrent_writer_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    writer = _start_slow(tmp_path, "convert", assets / "llama", *SMALL, "--out", out)
    try:
        _wait_for_partial(tmp_path, "out", writer)
        code = main(["convert", str(assets / "llama"), *SMALL, "--overwrite", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 1 and "another upcycle process is writing" in err and "Traceback" not in err, err
    finally:
        _, stderr = writer.communicate(timeout=300)
    assert writer.returncode == 0, stderr
    assert upcycle.load(out) is not None  # the first writer's output is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["convert", "export", "train"])
def test_ctrl_c_leaves_no_partial_output(command, assets, tmp_path):
    out = tmp_path / "out"
    args = {
        "convert": ["convert", assets / "llama", *SMALL, "--out", out],
        "export": ["export", assets / "moe", "--format", "mixtral", "--out", out],
        "train": _train_args(assets / "vit", out),
    }[command]
    process = _start_slow(tmp_path, *args)
    _wait_for_partial(tmp_path if command != "train" else out, "model" if command == "train" else "out", process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr and "interrupted" in stderr, stderr
    final = out / "model" if command == "train" else out
    assert not final.exists()
    assert not [p for p in final.parent.glob(f".{final.name}.*")]
