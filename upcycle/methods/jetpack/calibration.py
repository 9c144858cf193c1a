"""Activation statistics of a dense model's FFNs on calibration inputs, for MoE Jetpack checkpoint recycling
(Zhu et al., arXiv 2406.04801, §3.1; released code: ``feature_analysis`` in ``moejet/tools/gen_ViT_MoE_weight.py``).

Per FFN site (the adapter's ``ffn_sites``), over every token of every calibration input:
  - ``hidden_importance [h]``: L2 norm of each hidden unit's post-activation value (gated FFNs: act(gate)·up),
    taken before any hidden LayerNorm: the activation magnitude the paper samples units by;
  - ``input_importance [d]`` and ``output_importance [d]``: the L2 norm per channel of the FFN's input (the
    block's normalised features; what the released code measures, at ``norm2``) and of its output. The paper ranks
    channels by "the magnitude of the input/output features" without a formula; :func:`channel_scores` picks one
    (``channel_statistic``: ``input`` as released, or ``input_output``, the mean of the two norms);
  - ``coactivation [h, h]``: tokens on which both units are active (diagonal: tokens on which each unit is);
  - ``tokens``: how many tokens were seen (every position of every input; no padding mask).

A unit is *active* when its activation exceeds ``threshold`` (default 0, as in the released code). For GELU that
is the natural cut: GELU(x) > 0 exactly when x > 0, the unit's near-linear "on" side, while its negative outputs
are small and bounded (≥ -0.17) and vanish as x falls. In a gated FFN the sign of act(gate)·up says nothing about
being on (the linear branch takes either sign), so activity is read off the gate: act(gate) > threshold.

Mechanics: a forward hook records each FFN module's input and recomputes the FFN from it through the adapter's
:class:`DenseFFN` (equal to the module by the adapters' equivalence tests) rather than reading the module's output,
because a site module need not return the FFN output (BERT's site ``intermediate`` returns the hidden units).
Counts accumulate per batch as a float32 matmul AᵀA of the 0/1 activity matrix [t, h], exact while a batch has
< 2²⁴ tokens, into float64 totals that stay exact over millions of calibration tokens.
Dimension letters: t tokens of a batch (all positions of all inputs), d model channels, h hidden units.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters.dense_ffn import DenseFFN
from ...eval.calibration import run_hooked
from ...layers.activations import get_activation


@dataclass
class FFNStatistics:
    hidden_importance: torch.Tensor  # [h] float32, L2 norm over tokens of each unit's post-activation value
    input_importance: torch.Tensor  # [d] float32, L2 norm over tokens of each FFN input channel
    output_importance: torch.Tensor  # [d] float32, L2 norm over tokens of each FFN output channel
    coactivation: torch.Tensor | None  # [h, h] float64 token counts (None when not collected)
    tokens: int  # tokens seen

    @property
    def channel_importance(self) -> torch.Tensor:
        """[d] the mean of the input and output norms (``channel_statistic=input_output``)."""
        return channel_scores(self, "input_output")


CHANNEL_STATISTICS = ("input", "input_output")


def channel_scores(statistics: FFNStatistics, kind: str) -> torch.Tensor:
    """Per-channel importance [d]: the FFN input's L2 norm (``input``: the released ``norm2`` statistic) or the mean
    of the input's and the output's (``input_output``: both ends of the paper's "input/output features")."""
    if kind == "input":
        return statistics.input_importance
    if kind == "input_output":
        return (statistics.input_importance + statistics.output_importance) / 2
    raise ValueError(f"channel_statistic must be one of {CHANNEL_STATISTICS}, got {kind!r}")


class _Accumulator:
    """Running sums of one FFN site, fed by a forward hook on its module."""

    def __init__(self, dense: DenseFFN, channels_first: bool, threshold: float, coactivation: bool):
        self.dense, self.channels_first, self.threshold = dense, channels_first, threshold
        self.act = get_activation(dense.activation)
        device, d, h = dense.w_up.device, dense.d_model, dense.d_hidden
        self.hidden_sq = torch.zeros(h, dtype=torch.float64, device=device)
        self.input_sq = torch.zeros(d, dtype=torch.float64, device=device)
        self.output_sq = torch.zeros(d, dtype=torch.float64, device=device)
        self.coactivation = torch.zeros(h, h, dtype=torch.float64, device=device) if coactivation else None
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        x = args[0].movedim(1, -1) if self.channels_first else args[0]  # [b, d, H, W] -> [b, H, W, d]
        x = x.reshape(-1, self.dense.d_model)  # [t, d]
        dense = self.dense
        up = F.linear(x, dense.w_up, dense.b_up)  # [t, h]
        if dense.gated:
            switch = self.act(F.linear(x, dense.w_gate, dense.b_gate))  # the gate decides whether a unit is on
            hidden = switch * up
        else:
            hidden = switch = self.act(up)
        normed = hidden
        if dense.hidden_norm is not None:
            weight, bias, eps = dense.hidden_norm
            normed = F.layer_norm(hidden, hidden.shape[-1:], weight, bias, eps)
        y = F.linear(normed, dense.w_down, dense.b_down)  # [t, d]
        self.hidden_sq += hidden.float().square().sum(0)
        self.input_sq += x.float().square().sum(0)
        self.output_sq += y.float().square().sum(0)
        if self.coactivation is not None:
            active = (switch > self.threshold).float()  # [t, h]
            self.coactivation += active.T @ active
        self.tokens += x.shape[0]

    def result(self) -> FFNStatistics:
        return FFNStatistics(
            hidden_importance=self.hidden_sq.sqrt().float().cpu(),
            input_importance=self.input_sq.sqrt().float().cpu(),
            output_importance=self.output_sq.sqrt().float().cpu(),
            coactivation=None if self.coactivation is None else self.coactivation.cpu(),
            tokens=self.tokens,
        )


@torch.no_grad()
def collect_ffn_statistics(model: nn.Module, inputs: torch.Tensor, batch_size: int = 32, threshold: float = 0.0,
                           sites: Iterable[str] | None = None, coactivation: bool = True, adapter=None,
                           progress: bool = False) -> dict[str, FFNStatistics]:  # fmt: skip
    """Run ``model`` on ``inputs`` (images ``[n, c, H, W]``, or token ids for a language model) in batches and
    return the statistics of each FFN site, by site name (see the module docstring).

    ``sites``: names of the sites to measure (default: all; Jetpack needs only its MoE layers). ``coactivation``:
    False skips the [h, h] counts (importance sampling does not need them). ``adapter``: default ``find_adapter``.
    The model runs in eval mode (no dropout) and gets its training flag back afterwards.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError("calibration inputs must be a non-empty tensor with the examples along dim 0")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if adapter is None:
        from ...adapters import find_adapter  # adapters import recycling: resolved at call time

        adapter = find_adapter(model)
    available = {site.name: site for site in adapter.ffn_sites(model)}
    names = list(available) if sites is None else list(sites)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"unknown FFN sites {unknown}; the model has {list(available)}")

    accumulators, hooks = {}, []
    for name in names:
        module = model.get_submodule(name)
        channels_first = any(isinstance(m, nn.Conv2d) for m in module.modules())  # 1×1-conv MLPs (ConvNeXt)
        accumulators[name] = _Accumulator(adapter.read_ffn(model, available[name]), channels_first, threshold,
                                          coactivation)  # fmt: skip
        hooks.append(module.register_forward_hook(accumulators[name]))
    run_hooked(model, hooks, inputs, batch_size, progress)
    return {name: accumulator.result() for name, accumulator in accumulators.items()}
