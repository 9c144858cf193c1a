"""Evaluation utilities for training and benchmarks: MACs with MoE layers charged for what their routing ran,
parameter counts (total and active), accuracy / perplexity / embedding fidelity, routing reports, timing."""

from .flops import MacReport, count_macs, flops_fraction
from .metrics import accuracy, embedding_fidelity, perplexity
from .params import count_parameters
from .routing_report import collect_routing_stats, plot_expert_load
from .timing import time_inference

__all__ = [
    "MacReport",
    "accuracy",
    "collect_routing_stats",
    "count_macs",
    "count_parameters",
    "embedding_fidelity",
    "flops_fraction",
    "perplexity",
    "plot_expert_load",
    "time_inference",
]
