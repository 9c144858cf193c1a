"""timm LeViT (Graham et al., arXiv 2104.01136): ``stages[s].downsample.mlp`` (the MLP after each shrinking
attention) and ``stages[s].blocks[j].mlp``, each a ``LevitMlp``: ``ln1`` -> Hardswish -> ``ln2``, where ``ln`` is a
bias-free Linear followed by BatchNorm1d over its outputs (``LinearNorm``, tokens channels-last ``[b, n, d]``) or a
1×1 conv followed by BatchNorm2d (``ConvNorm``, the ``levit_conv_*`` models, channels-first ``[b, d, H, W]``).
Each BatchNorm folds exactly into its layer at inference, as LeViT's own ``fuse()`` does
(:func:`.timm_common.fold_batchnorm`); the experts then have a bias and no BatchNorm.
"""

from __future__ import annotations

from torch import nn

from ..layers import MoE
from .activations import from_module
from .base import Adapter, FFNSite, MoEFFN, register_adapter, set_submodule
from .dense_ffn import DenseFFN
from .timm_common import TimmAdapterMixin, check_mapped, fold_batchnorm, linear_weight, module_tensors


@register_adapter
class TimmLeViTAdapter(TimmAdapterMixin, Adapter):
    name = "timm_levit"
    family = "timm LeViT (stages[s].downsample.mlp, stages[s].blocks[j].mlp: Linear/1×1-conv + BatchNorm, folded)"
    task = "image_classification"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__ == "timm.models.levit" and hasattr(model, "stages")

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        names = []
        for s, stage in enumerate(model.stages):
            if hasattr(stage.downsample, "mlp"):  # stage 0 has no downsample (Identity)
                names.append(f"stages.{s}.downsample.mlp")
            names += [f"stages.{s}.blocks.{j}.mlp" for j in range(len(stage.blocks))]
        return [FFNSite(index, name) for index, name in enumerate(names)]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        mlp = model.get_submodule(site.name)
        check_mapped(mlp, site.name, module_tensors(mlp, "ln1", "ln2"),
                     dropped=("ln1.bn.num_batches_tracked", "ln2.bn.num_batches_tracked"))  # fmt: skip
        w_up, b_up = fold_batchnorm(linear_weight(mlp.ln1.linear), None, mlp.ln1.bn, f"{site.name}.ln1.bn")
        w_down, b_down = fold_batchnorm(linear_weight(mlp.ln2.linear), None, mlp.ln2.bn, f"{site.name}.ln2.bn")
        return DenseFFN(w_up, w_down, from_module(mlp.act), b_up, b_down=b_down)

    def folded_tensors(self, model: nn.Module, site: FFNSite) -> list[str]:
        """All of the site's tensors: both layers and their BatchNorms become new folded weights; the BatchNorms'
        step counters are dropped on purpose."""
        return [f"{site.name}.{name}" for name in model.get_submodule(site.name).state_dict()]

    def install(self, model: nn.Module, site: FFNSite, moe: MoE) -> None:
        channels_first = isinstance(model.get_submodule(site.name).ln1.linear, nn.Conv2d)
        set_submodule(model, site.name, MoEFFN(moe, channels_first=channels_first))

    def image_size(self, model: nn.Module) -> tuple[int, int]:
        """LeViT keeps no image size: its first attention's grid times the stem's stride."""
        grid = model.stages[0].blocks[0].attn.resolution
        return tuple(n * model.feature_info[0]["reduction"] for n in grid)
