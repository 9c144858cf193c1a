"""The side-by-side rows of ``upcycle bench convert``: SmolLM2-135M -> 4 experts (top-2) -> Mixtral, the job
mergekit-moe did in 21.8 s and 2.1 GB, and BTX / BAM merges of the seed and 3 branches (4 experts), each streamed by
upcycle and done in memory the way it replaces.

Goal: the streamed job within 20 s and 1.5 GB of peak RSS on 2 CPU cores, tokenizer files copied and every layer
checked; the streamed merges within twice that. Each row runs as one command in a fresh interpreter: ``seconds`` is
its wall time from start to exit (interpreter start and imports included, as a user waits for them), ``peak_rss_gb``
its own peak resident set (``VmHWM``). A second child then loads each output the way its users would and runs it.
The branches are the seed plus small Gaussian noise (1% of each tensor's std): merging cost does not depend on what
the branches learned.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..export.shards import ShardWriter
from ..stream import Checkpoint

GB = 1e9
GOAL_SECONDS, GOAL_PEAK_RSS_GB = 20.0, 1.5
MERGE_FACTOR = 2.0  # merges of 3 branches: within twice the job's goal
EXPERTS = ["--experts", "4", "--top-k", "2"]
BTX = {"method": "btx", "top_k": 2, "renormalize": True}  # renormalised top-2: a Mixtral, as mergekit-moe writes
BAM = {"method": "bam"}  # the paper's top-1 with expert K/V: upcycle's own BAM model class
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")

_CHILD = """
import json, sys, time
kind, args = sys.argv[1], json.loads(sys.argv[2])
if kind == "cli":
    from upcycle.cli import main
    code = main(args)
elif kind == "merge":
    from upcycle.methods.bam.streaming import merge_streaming
    merge_streaming(args["sources"], args["out"], format=args["format"], progress=False, **args["options"])
    code = 0
else:  # merge in memory: load every input through transformers, merge, write
    import upcycle
    from upcycle.sources import load_source
    merged = upcycle.merge([load_source(source) for source in args["sources"]], **args["options"])
    if args["format"] == "mixtral":
        upcycle.export(merged, args["out"], format="mixtral")
    else:
        upcycle.save(merged, args["out"])
    code = 0
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "peak_kib": peak}))
"""

_LOAD = """
import json, sys, torch
import upcycle, transformers
out, kind, dense = sys.argv[1], sys.argv[2], sys.argv[3]
ids = torch.tensor([[1, 50, 34, 28, 46, 31, 30, 2]])  # inside any vocabulary of 51 tokens or more
def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits
moe = transformers.AutoModelForCausalLM.from_pretrained(out) if kind == "mixtral" else upcycle.load(out)
got = logits(moe)
report = {"finite": bool(torch.isfinite(got).all()), "class": type(moe).__name__}
if dense:
    del moe
    report["max_abs_diff"] = (got - logits(transformers.AutoModelForCausalLM.from_pretrained(dense))).abs().max().item()
print(json.dumps(report))
"""


def write_branches(seed: Path, work: Path, count: int = 3) -> list[Path]:
    """``count`` copies of the checkpoint ``seed``, each tensor moved by noise of 1% of its std, with the seed's
    config and tokenizer files; written tensor by tensor."""
    checkpoint = Checkpoint(seed)
    generator = torch.Generator().manual_seed(0)
    branches = []
    for b in range(count):
        branch = work / f"branch{b}"
        branch.mkdir(parents=True, exist_ok=True)
        with ShardWriter(branch, 256 * 1024**2) as writer:
            for name in checkpoint.tensors:
                tensor = checkpoint.read([name])[name]
                if tensor.is_floating_point():
                    tensor = tensor + 0.01 * tensor.float().std() * torch.randn(tensor.shape, generator=generator)
                writer.add(name, tensor)
        for path in seed.iterdir():
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(path, branch / path.name)
        branches.append(branch)
    return branches


def timed_child(kind: str, args: list | dict) -> dict:
    """Run one job in a fresh interpreter: its wall seconds and peak RSS (bytes)."""
    command = [sys.executable, "-c", _CHILD, kind, json.dumps(args)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} job {args} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["code"] != 0:
        raise RuntimeError(f"the {kind} job {args} exited with {report['code']}:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss": 1024 * report["peak_kib"]}


def load_check(out: Path, kind: str, dense: Path | None) -> dict:
    """Load ``out`` (``kind``: mixtral through transformers, else upcycle.load) in a child and run it on 8 tokens;
    with ``dense``, the max |logits - dense logits|."""
    command = [sys.executable, "-c", _LOAD, str(out), kind, str(dense or "")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"loading {out} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def directory_gb(directory: Path) -> float:
    return round(sum(p.stat().st_size for p in directory.glob("*.safetensors")) / GB, 3)


def job_row(case: str, what: str, sources: list[Path], out: Path, kind: str, args, goal: tuple[float, float] | None,
            output_format: str, dense: Path | None) -> dict:  # fmt: skip
    """Run one job, check its output, and describe it as a row; the output is removed afterwards."""
    measured = timed_child(kind, args)
    loaded = load_check(out, output_format, dense)
    files = {p.name for p in out.iterdir()}
    row = {
        "case": case,
        "what": what,
        "source_gb": round(sum(directory_gb(s) for s in sources), 3),
        "output_gb": directory_gb(out),
        "seconds": round(measured["seconds"], 2),
        "peak_rss_gb": round(measured["peak_rss"] / GB, 3),
        "tokenizer_copied": "tokenizer.json" in files or "tokenizer_config.json" in files,
        "output_class": loaded["class"],
        "output_checked": loaded["finite"] and loaded.get("max_abs_diff", 0.0) <= 1e-3,
        "max_abs_diff_vs_dense": loaded.get("max_abs_diff"),
    }
    if goal is not None:
        row["goal"] = f"<= {goal[0]:g} s, <= {goal[1]:g} GB"
        row["goal_met"] = row["seconds"] <= goal[0] and row["peak_rss_gb"] <= goal[1]
    shutil.rmtree(out, ignore_errors=True)
    return row


def job_rows(source: Path, work: Path, in_memory: bool = True) -> list[dict]:
    """The streamed job and merges (with their goals) and, with ``in_memory``, the paths they replace."""
    job_goal = (GOAL_SECONDS, GOAL_PEAK_RSS_GB)
    merge_goal = (MERGE_FACTOR * GOAL_SECONDS, MERGE_FACTOR * GOAL_PEAK_RSS_GB)
    branches = write_branches(source, work)
    inputs = [str(p) for p in (source, *branches)]
    out = work / "out"
    stream_cli = ["convert", str(source), "--stream", "--export", "mixtral", *EXPERTS, "--out", str(out)]
    rows = [job_row("job_stream", "convert --stream --export mixtral (4 experts, top-2; layers checked)", [source],
                    out, "cli", stream_cli, job_goal, "mixtral", source)]  # fmt: skip
    merges = {"btx": (BTX, "mixtral"), "bam": (BAM, "upcycle")}
    for name, (options, output_format) in merges.items():
        args = {"sources": inputs, "out": str(out), "options": options, "format": output_format}
        what = f"{name} of seed + 3 branches -> {output_format}, streamed (experts checked)"
        rows.append(job_row(f"{name}_stream", what, [Path(p) for p in inputs], out, "merge", args, merge_goal,
                            output_format, None))  # fmt: skip
    if in_memory:
        memory_cli = ["convert", str(source), "--export", "mixtral", *EXPERTS, "--out", str(out)]
        rows.append(job_row("job_in_memory", "convert --export mixtral in memory (verified end to end)", [source],
                            out, "cli", memory_cli, None, "mixtral", source))  # fmt: skip
        for name, (options, output_format) in merges.items():
            args = {"sources": inputs, "out": str(out), "options": options, "format": output_format}
            what = f"{name} of seed + 3 branches -> {output_format}, loaded and merged in memory"
            rows.append(job_row(f"{name}_in_memory", what, [Path(p) for p in inputs], out, "merge_in_memory", args,
                                None, output_format, None))  # fmt: skip
    for branch in branches:
        shutil.rmtree(branch, ignore_errors=True)
    return rows
