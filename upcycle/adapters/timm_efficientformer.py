"""timm EfficientFormer (Li et al., arXiv 2206.01191): ``stages[s].blocks[j].mlp`` in two layouts.

* 4-D blocks (``MetaBlock2d``, pooling token mixer): ``ConvMlpWithNorm``, 1×1 conv -> BatchNorm -> act -> 1×1 conv
  -> BatchNorm on channels-first ``[b, d, H, W]``. Each BatchNorm folds exactly into its conv at inference
  (:func:`.timm_common.fold_batchnorm`), so the experts are plain FFNs; in training they no longer normalise by
  batch statistics.
* 3-D blocks (``MetaBlock1d``, attention, after the last stage's ``Flat``): a timm ``Mlp`` on channels-last tokens
  ``[b, n, d]``.
"""

from __future__ import annotations

from torch import nn

from ..layers import MoE
from .activations import from_module
from .base import Adapter, FFNSite, MoEFFN, register_adapter, set_submodule, tensor_or_none
from .dense_ffn import DenseFFN
from .timm_common import (
    TimmAdapterMixin,
    check_mapped,
    fold_batchnorm,
    linear_weight,
    mlp_kind,
    module_tensors,
    read_timm_mlp,
)


@register_adapter
class TimmEfficientFormerAdapter(TimmAdapterMixin, Adapter):
    name = "timm_efficientformer"
    family = "timm EfficientFormer (stages[s].blocks[j].mlp: Mlp, or 1×1-conv MLP with BatchNorm folded)"
    task = "image_classification"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == "EfficientFormer" and type(model).__module__.startswith("timm.")

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        names = [
            f"stages.{s}.blocks.{j}.mlp"
            for s, stage in enumerate(model.stages)
            for j, block in enumerate(stage.blocks)
            if hasattr(block, "mlp")  # Flat (the 4-D -> 3-D switch) has none
        ]
        return [FFNSite(index, name) for index, name in enumerate(names)]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        mlp = model.get_submodule(site.name)
        if mlp_kind(mlp) is not None:
            return read_timm_mlp(mlp, site.name)
        return read_conv_mlp_with_norm(mlp, site.name)

    def folded_tensors(self, model: nn.Module, site: FFNSite) -> list[str]:
        """A 1×1-conv MLP's tensors all become new folded weights (the BatchNorms' step counters dropped on purpose);
        a plain ``Mlp`` is read as views."""
        mlp = model.get_submodule(site.name)
        return [] if mlp_kind(mlp) is not None else [f"{site.name}.{name}" for name in mlp.state_dict()]

    def install(self, model: nn.Module, site: FFNSite, moe: MoE) -> None:
        channels_first = isinstance(model.get_submodule(site.name).fc1, nn.Conv2d)
        set_submodule(model, site.name, MoEFFN(moe, channels_first=channels_first))


def read_conv_mlp_with_norm(mlp: nn.Module, name: str) -> DenseFFN:
    """fc1 [h, d, 1, 1] -> norm1 (BN over h) -> act -> fc2 [d, h, 1, 1] -> norm2 (BN over d), the norms folded."""
    check_mapped(mlp, name, module_tensors(mlp, "fc1", "norm1", "fc2", "norm2"),
                 dropped=("norm1.num_batches_tracked", "norm2.num_batches_tracked"))  # fmt: skip
    w_up, b_up = linear_weight(mlp.fc1), tensor_or_none(mlp.fc1, "bias")
    w_down, b_down = linear_weight(mlp.fc2), tensor_or_none(mlp.fc2, "bias")
    if not isinstance(mlp.norm1, nn.Identity):
        w_up, b_up = fold_batchnorm(w_up, b_up, mlp.norm1, f"{name}.norm1")
    if not isinstance(mlp.norm2, nn.Identity):
        w_down, b_down = fold_batchnorm(w_down, b_down, mlp.norm2, f"{name}.norm2")
    return DenseFFN(w_up, w_down, from_module(mlp.act), b_up, b_down=b_down)
