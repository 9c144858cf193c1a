"""Where a streaming write gets its tensors: a :class:`Producer` gives each tensor outside the converted FFNs as
it is written, and each converted FFN's MoE layer with the probe that checks it (:mod:`.check`). The writers
(:mod:`.native`, :mod:`.mixtral`) decide names and files; a producer decides values. :class:`Upcycling` converts one
dense checkpoint with a registered recycling method; ``upcycle.methods.bam.streaming`` mixes several (BTX).
"""

from __future__ import annotations

import torch

from ..adapters.base import FFNSite
from ..config import RUNTIME_FIELDS
from ..layers import MoE, describe_moe
from .check import EquivalenceCheck, Probe
from .plan import Plan, convert_ffn, ffn_bytes, read_dense_ffn


class Producer:
    """The tensors of one streamed model. ``layer`` is called once per site of ``plan.sites``, in that order."""

    plan: Plan  # the checkpoint whose layout and tensor order the write follows (a merge's seed)
    recipe: dict  # the record's recipe entry: {"convert": {...}} or {"merge": {...}}

    def backbone(self, name: str) -> torch.Tensor:
        """The tensor ``name`` of ``plan.checkpoint``'s, as the output holds it."""
        raise NotImplementedError

    def layer(self, site: FFNSite, check: EquivalenceCheck | None) -> tuple[MoE, Probe | None]:
        """The MoE layer that replaces ``site``, and its probe when ``check`` is given."""
        raise NotImplementedError

    def layer_spec(self) -> dict:
        """``describe_moe`` of the layers ``layer`` makes (all alike), found without using up ``layer``'s draws."""
        raise NotImplementedError

    def layer_bytes(self, site: FFNSite) -> int:
        """About how many bytes ``site``'s MoE layer holds (the writer closes a shard it would overflow first)."""
        raise NotImplementedError


class Upcycling(Producer):
    """One dense checkpoint, each chosen FFN converted by the recipe's method, as ``upcycle.convert`` does: layers
    in increasing index order with one ``torch.Generator`` seeded with ``config.seed``."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.recipe = {"convert": plan.cfg.model_dump(exclude=RUNTIME_FIELDS)}
        self.generator = torch.Generator().manual_seed(plan.cfg.seed)

    def backbone(self, name: str) -> torch.Tensor:
        return self.plan.checkpoint.read([name])[name]

    def layer(self, site: FFNSite, check: EquivalenceCheck | None) -> tuple[MoE, Probe | None]:
        plan = self.plan
        dense = read_dense_ffn(plan.checkpoint, site, plan.activation, plan.layout)
        moe = convert_ffn(dense, site, plan.cfg, self.generator)
        if check is None:
            return moe, None
        experts = moe.experts
        copies = experts.d_hidden == dense.d_hidden and moe.shared_expert is None and experts.shared_bias is None
        return moe, check.probe(dense, experts.num_experts, copies)

    def layer_spec(self) -> dict:
        plan, site = self.plan, self.plan.sites[0]
        dense = read_dense_ffn(plan.checkpoint, site, plan.activation, plan.layout)
        return describe_moe(convert_ffn(dense, site, plan.cfg, torch.Generator().manual_seed(plan.cfg.seed)))

    def layer_bytes(self, site: FFNSite) -> int:
        return self.plan.cfg.num_experts * ffn_bytes(self.plan.checkpoint, site)
