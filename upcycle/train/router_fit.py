"""The router stage of D2DMoE (arXiv 2310.04361, §3.3) and MoEfication (arXiv 2110.01786, §3.2): routers that
are trained apart from the backbone regress on what their experts actually do.

Forward hooks on every MoE layer whose router can be fitted (it has ``fit_loss``) measure, during the training
forward, every expert on every token of that layer (:meth:`~upcycle.layers.Experts.per_expert_statistics`, without
grad: these are targets) and keep them with the router's predictions (``Routing.router_logits``). The statistics
are taken inside the layer's forward, while its parameters are present even under FSDP, which frees a block's
gathered weights once the block has run. ``take`` returns each router's own fit loss averaged over layers: MSE on
output norms (dynamic-k), BCE on normalised activation sums (MoEfication). With ``freeze: all_but_routers`` the
backbone runs in eval mode and only the routers train (every expert runs): the authors' teacher-forced router
training.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import MoE, moe_layers


class RouterFit:
    def __init__(self, model: nn.Module):
        self.layers = [layer for _, layer in moe_layers(model) if hasattr(layer.router, "fit_loss")]
        if not self.layers:
            raise ValueError(
                "aux.router_fit > 0 fits routers to their experts' outputs, but this model has no such router; "
                "convert with method d2dmoe or moefication, or set router_fit to 0"
            )
        self.kept: list[tuple[MoE, torch.Tensor, tuple]] = []
        self.handles = [layer.register_forward_hook(self._keep, with_kwargs=True) for layer in self.layers]

    def _keep(self, layer: MoE, args: tuple, kwargs: dict, output) -> None:
        if not layer.router.training:  # validation forwards fit nothing (the frozen backbone is in eval mode)
            return
        x = args[0] if args else kwargs["x"]
        with torch.no_grad():
            statistics = layer.experts.per_expert_statistics(x.reshape(-1, layer.d_model))  # [t, e] each
        self.kept.append((layer, layer.last_routing.router_logits, statistics))

    def take(self) -> torch.Tensor:
        """Fit loss of the forward pass just run, averaged over layers; clears what was kept."""
        kept, self.kept = self.kept, []
        if not kept:
            return torch.zeros(())
        return torch.stack([layer.router.fit_loss(predictions, stats) for layer, predictions, stats in kept]).mean()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
