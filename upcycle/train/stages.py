"""Stage options (which parameters train) and the weight EMA."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import moe_layers
from .optim import is_router_parameter


def apply_freeze(model: nn.Module, mode: str) -> None:
    """``all_but_routers``: only routers train (D2DMoE / MoEfication router stage); ``experts``: experts fixed."""
    if mode == "none":
        return
    found_router = False
    for name, param in model.named_parameters():
        router = is_router_parameter(name)
        found_router |= router
        if mode == "all_but_routers":
            param.requires_grad_(router)
        elif mode == "experts" and ".experts." in f".{name}":
            param.requires_grad_(False)
    if mode == "all_but_routers" and not found_router:
        raise ValueError("freeze=all_but_routers, but the model has no router: convert it to an MoE first")


def set_training_modes(model: nn.Module, freeze: str) -> None:
    """Training mode for a training step. With ``all_but_routers`` the frozen backbone runs in eval mode (no
    dropout, fixed normalisation statistics) and only the routers are in training mode, as the D2DMoE authors fit
    their routers (``train_routers.py``, arXiv 2310.04361): the routers then learn what the backbone computes at
    inference, not a dropped-out version of it. Routers of this stage run every expert while training."""
    if freeze != "all_but_routers":
        model.train()
        return
    model.eval()
    for _, layer in moe_layers(model):
        layer.router.train()


class EMA:
    """Exponential moving average of the weights: ``ema = decay·ema + (1 - decay)·param`` after every step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in model.state_dict().items() if p.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value, 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)
