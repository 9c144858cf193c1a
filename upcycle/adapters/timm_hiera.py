"""timm Hiera (Ryali et al., arXiv 2306.00989): ``blocks[i].mlp``, a timm ``Mlp`` on channels-last tokens
``[b, n, d]`` (in Hiera's unrolled token order); the width and token count change where a block pools (q_stride),
so the MLPs differ in size from stage to stage.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, FFNSite, register_adapter
from .dense_ffn import DenseFFN
from .timm_common import TimmAdapterMixin, mlp_kind, read_timm_mlp


@register_adapter
class TimmHieraAdapter(TimmAdapterMixin, Adapter):
    name = "timm_hiera"
    family = "timm Hiera (blocks[i].mlp: Mlp)"
    task = "image_classification"

    def matches(self, model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        return (
            type(model).__module__.startswith("timm.")
            and hasattr(model, "tokens_spatial_shape")  # Hiera's unroll / reroll geometry
            and isinstance(blocks, nn.ModuleList)
            and len(blocks) > 0
            and all(mlp_kind(getattr(block, "mlp", None)) is not None for block in blocks)
        )

    def ffn_sites(self, model: nn.Module) -> list[FFNSite]:
        return [FFNSite(i, f"blocks.{i}.mlp") for i in range(len(model.blocks))]

    def read_ffn(self, model: nn.Module, site: FFNSite) -> DenseFFN:
        return read_timm_mlp(model.get_submodule(site.name), site.name)

    def image_size(self, model: nn.Module) -> tuple[int, int]:
        """Hiera's patch embedding keeps no image size: the token grid times the patch stride."""
        return tuple(n * s for n, s in zip(model.tokens_spatial_shape, model.patch_stride, strict=True))
