"""``upcycle bench layers``: MoE layers against the dense FFN of equal active FLOPs and against transformers' own
experts implementations, side by side, on the shapes of the performance goals (decode, forward, train step).

First the machine's GEMM peak is measured (a large square matmul in fp32 and bf16, GFLOP/s); then for every shape
(decode: 1 token; forward: 512 and 4096 tokens; train step: 512 and 4096 tokens), dtype (fp32, bf16) and expert
count (top-2 of 8, top-8 of 64), these run interleaved round by round (see ``time_interleaved``):
  dense                  SwiGLU FFN d -> H -> d (d 576, H 1536: SmolLM2-135M's)
  upcycle/<backend>      top-k MoE, expert width H/k so the active expert FLOPs equal the dense FFN's, on each of
                         upcycle's fast backends, with the same weights
  transformers/<impl>    transformers' Mixtral sparse-MoE block holding the same router and expert weights (checked
                         equal to ours on outputs first), on each of its ``experts_implementation`` options
A train step is forward + backward of ``sum(y · g)`` for a fixed random g (no optimizer); decode and forward run
under ``inference_mode``. Each row reports ms, the ratio to dense, the ratio to transformers' fastest, achieved
GFLOP/s (the dense FFN's FLOPs: 2·3·d·H per token forward, three times that per train step; routing left out) and
its share of the peak. The summary holds the issue's goals as named targets (met / not met) for upcycle's default
backend. The D2DMoE dynamic-k and end-to-end decode figures come from their own benchmarks, not this one.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..eval.timing import median_ms, time_interleaved
from ..layers import FFN, Experts, MoE, TopKRouter
from ..provenance import write_results

DIMS = {"d": 576, "h": 1536}
QUICK_DIMS = {"d": 64, "h": 256}
SHAPES = {  # name -> (tokens, mode)
    "decode": (1, "decode"),
    "forward_512": (512, "forward"),
    "forward_4096": (4096, "forward"),
    "train_512": (512, "train"),
    "train_4096": (4096, "train"),
}
QUICK_TOKENS = {1: 1, 512: 16, 4096: 32}
EXPERTS = {8: 2, 64: 8}  # experts -> top-k
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UPCYCLE_BACKENDS = ("auto", "grouped_mm", "grouped", "sorted")
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
HF_BATCHED_MAX_PAIRS = 64  # batched_mm copies every pair's expert weights: at 4096·8 pairs that is many GB
CACHE_FLUSH_FLOATS = 2**24  # 64 MB of fp32
DEFAULT_BACKEND = inspect.signature(Experts).parameters["backend"].default
# the goals; "rows" is which rows each one is checked on (upcycle's default backend)
TARGETS = {
    "upcycle_over_transformers_best_max": ("<=", 0.8),
    "e8_over_dense_max_from_512": ("<=", 1.15),
    "e64_over_dense_max_from_512": ("<=", 1.4),
    "decode_over_dense_max": ("<=", 1.3),
    "e8_peak_share_min_from_512": (">=", 0.75),
    "e64_peak_share_min_from_512": (">=", 0.6),
}


def measure_peak(dtype: torch.dtype, n: int, rounds: int) -> float:
    """GFLOP/s of an ``n × n`` square matmul in ``dtype``: the machine's practical GEMM peak (median of rounds)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, packing buffers
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def build_moe(d: int, h: int, experts: int, top_k: int) -> MoE:
    """Top-k SwiGLU MoE whose active expert FLOPs equal a dense FFN of width h (each expert h / top_k wide)."""
    router = TopKRouter(d, experts, top_k=top_k, init_std=d**-0.5)  # unit-variance logits: a balanced routing
    return MoE(router, Experts(experts, d, h // top_k, activation="silu", gated=True, bias=False))


def build_transformers_block(moe: MoE) -> nn.Module:
    """transformers' Mixtral sparse-MoE block holding ``moe``'s router and expert weights (a Mixtral router is a
    softmax, top-k, renormalised: upcycle's top-k router)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    experts = moe.experts
    config = MixtralConfig(
        hidden_size=experts.d_model, intermediate_size=experts.d_hidden, num_local_experts=experts.num_experts,
        num_experts_per_tok=moe.router.top_k, hidden_act="silu",
    )  # fmt: skip
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([experts.w_gate, experts.w_up], dim=1))  # [e, 2h, d]
        block.experts.down_proj.copy_(experts.w_down)
    return block.to(experts.w_up.dtype)


def set_implementation(block: nn.Module, name: str) -> None:
    block.experts.config._experts_implementation = name


def check_same_outputs(moe: MoE, block: nn.Module, x: torch.Tensor, implementations: list[str]) -> None:
    """Ours and transformers' block compute the same layer (else the comparison would be meaningless)."""
    tolerance = 1e-4 if x.dtype == torch.float32 else 3e-2
    with torch.inference_mode():
        ours = moe(x).float()
        for name in implementations:
            set_implementation(block, name)
            theirs = block(x).float()
            scale = ours.abs().max().item()
            if (theirs - ours).abs().max().item() > tolerance * max(scale, 1.0):
                raise RuntimeError(f"transformers' {name} experts disagree with upcycle's layer: the bench is broken")


def _cases(dense: nn.Module, moe: MoE, block: nn.Module, pairs: int) -> dict[str, tuple[nn.Module, str | None]]:
    cases = {"dense": (dense, None)}
    cases.update({f"upcycle/{backend}": (moe, backend) for backend in UPCYCLE_BACKENDS})
    for name in HF_IMPLEMENTATIONS:
        if name != "batched_mm" or pairs <= HF_BATCHED_MAX_PAIRS:
            cases[f"transformers/{name}"] = (block, name)
    return cases


def bench_group(shape: str, dtype_name: str, experts: int, dims: dict, tokens: int, rounds: int) -> list[dict]:
    """Every case at one (shape, dtype, expert count), interleaved; rows without the ratios."""
    mode = SHAPES[shape][1]
    dtype, top_k, d, h = DTYPES[dtype_name], EXPERTS[experts], dims["d"], dims["h"]
    torch.manual_seed(0)
    dense = FFN(d, h, "silu", gated=True, bias=False).to(dtype)
    moe = build_moe(d, h, experts, top_k).to(dtype)
    block = build_transformers_block(moe)
    x = torch.randn(1, tokens, d, dtype=dtype)
    upstream = torch.randn(1, tokens, d, dtype=dtype)
    cases = _cases(dense, moe, block, tokens * top_k)
    # only the implementations that run here: batched_mm at 4096·2 pairs would copy ~29 GB of expert weights
    check_same_outputs(moe, block, x, [c.split("/")[1] for c in cases if c.startswith("transformers/")])
    train_input: dict[str, torch.Tensor] = {}
    # Decoding one token reads a few MB of weights, which the previous case may have left in cache (the cases share
    # the MoE's weights), so whichever case ran after another model paid for memory and the rest did not. Before
    # each decode sample every case starts from memory, as one layer of a many-layer model does when it decodes.
    flush = torch.empty(CACHE_FLUSH_FLOATS) if mode == "decode" else None

    def setup(case: str) -> None:
        if flush is not None:
            flush.fill_(1.0)  # a write pass over twice a 32 MB last-level cache evicts the weights
        layer, choice = cases[case]
        layer.zero_grad(set_to_none=True)
        if layer is moe:
            moe.experts.backend = choice
        elif layer is block:
            set_implementation(block, choice)
        train_input[case] = x.clone().requires_grad_(mode == "train")

    def step(case: str):
        layer = cases[case][0]

        def train() -> None:
            (layer(train_input[case]) * upstream).sum().backward()

        def infer() -> None:
            with torch.inference_mode():
                layer(train_input[case])

        return train if mode == "train" else infer

    samples = time_interleaved(
        {c: step(c) for c in cases}, rounds, setup=setup, desc=f"{shape} {dtype_name} e{experts}"
    )
    flops = 2 * 3 * d * h * tokens * (3 if mode == "train" else 1)  # the dense FFN's: equal active FLOPs
    rows = []
    for case in cases:
        layer_name, _, backend = case.partition("/")
        ms = median_ms(samples[case])
        rows.append({
            "shape": shape, "mode": mode, "tokens": tokens, "dtype": dtype_name, "experts": experts, "top_k": top_k,
            "d": d, "h": h, "layer": layer_name, "backend": backend or "-", "ms": round(ms, 4),
            "ms_samples": [round(1000 * s, 4) for s in samples[case]], "flops": flops,
            "gflops": significant(flops / ms / 1e6),
        })  # fmt: skip
    return rows


def significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits. Not decimals: a decode row runs at a few MFLOP/s, and a quick run's
    peak and shares of it are small enough that rounding to decimals would make them 0."""
    return float(f"{value:.{digits}g}")


def add_ratios(rows: list[dict], peaks: dict[str, float]) -> None:
    """Each row's ratio to dense and to transformers' fastest implementation of its group, and its share of peak."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["dtype"], row["experts"]), []).append(row)
    for group in groups.values():
        dense = next(r["ms"] for r in group if r["layer"] == "dense")
        best = min(r["ms"] for r in group if r["layer"] == "transformers")
        for row in group:
            row["over_dense"] = round(row["ms"] / dense, 3)
            row["over_transformers_best"] = round(row["ms"] / best, 3)
            row["peak_gflops"] = significant(peaks[row["dtype"]])
            row["peak_share"] = significant(row["gflops"] / peaks[row["dtype"]], 3)


def summarize(rows: list[dict], peaks: dict[str, float]) -> dict:
    ours = [r for r in rows if r["layer"] == "upcycle" and r["backend"] == DEFAULT_BACKEND]
    from_512 = [r for r in ours if r["mode"] != "decode"]

    def worst(values, op):
        return significant(max(values) if op == "<=" else min(values))

    summary = {f"peak_gflops_{name}": round(value, 1) for name, value in peaks.items()}
    summary["default_backend"] = DEFAULT_BACKEND
    values = {
        "upcycle_over_transformers_best_max": [r["over_transformers_best"] for r in ours],
        "e8_over_dense_max_from_512": [r["over_dense"] for r in from_512 if r["experts"] == 8],
        "e64_over_dense_max_from_512": [r["over_dense"] for r in from_512 if r["experts"] == 64],
        "decode_over_dense_max": [r["over_dense"] for r in ours if r["mode"] == "decode"],
        "e8_peak_share_min_from_512": [r["peak_share"] for r in from_512 if r["experts"] == 8],
        "e64_peak_share_min_from_512": [r["peak_share"] for r in from_512 if r["experts"] == 64],
    }
    for key, (op, target) in TARGETS.items():
        summary[key] = worst(values[key], op)
        summary[f"{key}_target"] = f"{op} {target}"
        summary[f"{key}_met"] = bool(summary[key] <= target if op == "<=" else summary[key] >= target)
    return summary


def plot(rows: list[dict], path: Path) -> None:
    """Per dtype: each shape's time relative to dense for upcycle's default backend and transformers' fastest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DTYPES), figsize=(7 * len(DTYPES), 4.2), sharey=True)
    series = [(e, who) for e in EXPERTS for who in ("upcycle", "transformers")]
    width = 0.8 / len(series)
    for ax, dtype in zip(axes, DTYPES, strict=True):
        for index, (experts, who) in enumerate(series):
            values = []
            for shape in SHAPES:
                group = [r for r in rows if r["shape"] == shape and r["dtype"] == dtype and r["experts"] == experts]
                if who == "upcycle":
                    values.append(next(r["over_dense"] for r in group if r["backend"] == DEFAULT_BACKEND))
                else:
                    values.append(min(r["over_dense"] for r in group if r["layer"] == "transformers"))
            positions = [p + (index - (len(series) - 1) / 2) * width for p in range(len(SHAPES))]
            label = f"{experts} experts, " + (f"upcycle {DEFAULT_BACKEND}" if who == "upcycle" else "transformers best")
            ax.bar(positions, values, width=width, label=label, hatch="" if who == "upcycle" else "//")
        for target, style in ((1.15, "--"), (1.4, ":")):
            ax.axhline(target, color="gray", linestyle=style, linewidth=0.8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(SHAPES)), list(SHAPES), fontsize=8)
        ax.set_title(f"{dtype} (dense = 1; goals 1.15 at 8 experts, 1.4 at 64)", fontsize=9)
        ax.set_ylabel("time relative to the dense FFN of equal active FLOPs")
        ax.legend(fontsize=7)
    fig.suptitle("MoE layers vs dense and vs transformers' experts (CPU)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def run(out: str | os.PathLike = "results", quick: bool = False, rounds: int | None = None) -> dict:
    rounds = rounds or (3 if quick else 7)
    dims = QUICK_DIMS if quick else DIMS
    peaks = {name: measure_peak(dtype, 256 if quick else 2048, rounds) for name, dtype in DTYPES.items()}
    rows = []
    for shape, (tokens, _) in SHAPES.items():
        tokens = QUICK_TOKENS[tokens] if quick else tokens
        for dtype_name in DTYPES:
            for experts in EXPERTS:
                rows.extend(bench_group(shape, dtype_name, experts, dims, tokens, rounds))
    add_ratios(rows, peaks)
    summary = summarize(rows, peaks)
    out = Path(out)
    path = write_results(
        out,
        "layers",
        summary,
        rows,
        quick=quick,
        rounds=rounds,
        reproduce="make install && .venv/bin/upcycle bench layers" + (" --quick" if quick else ""),
    )
    plot(rows, out / "layers.png")
    return {"summary": summary, "json": str(path), "png": str(out / "layers.png")}
