"""Export a BAM model (``upcycle.merge(..., method="bam")``, arXiv 2408.08274) as a Hugging Face checkpoint of
upcycle's own model class: ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` builds an
``UpcycleBAMForCausalLM`` with the same logits, and ``generate`` works, wherever upcycle is installed (``import
upcycle`` registers ``model_type="upcycle_bam"`` with transformers' Auto classes).

No standard transformers class has attention experts, hence a class of our own; a BTX mixture has FFN experts only
and exports to the standard ``mixtral`` / ``qwen2_moe`` formats instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..atomic import atomic_directory
from ..record import record_of
from .formats import EXPORT_FORMATS
from .hf_moe_common import EXPORT_NOTE
from .saving import check_exportable
from .tokenizer_files import copy_tokenizer_files


@EXPORT_FORMATS.register(
    "bam", "upcycle's BAM model class (attention and FFN experts), loaded through transformers' Auto classes"
)
def export_bam(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    check_exportable(model, "bam")  # upcycle's BAM model (upcycle.merge(models, method="bam"))
    check_router_settings(model)
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as staging:
        model.save_pretrained(staging)  # config.json (model_type upcycle_bam), safetensors, generation_config.json
        record = record_of(model)
        note = {"format": "bam", "class": type(model).__name__, "merge": record.merge if record is not None else None}
        (staging / EXPORT_NOTE).write_text(json.dumps(note, indent=2) + "\n")
        copy_tokenizer_files(model, staging)
    return directory


def check_router_settings(model: nn.Module) -> None:
    """The config holds one top-k for all blocks; refuse an export whose routers were changed to disagree with it
    (e.g. by ``set_top_k``) rather than write a checkpoint that loads with other routing."""
    config = model.config
    for i, layer in enumerate(model.model.layers):
        router = layer.mlp.router
        if (router.top_k, router.renormalize) != (config.num_experts_per_tok, config.norm_topk_prob):
            raise ValueError(
                f"block {i}'s FFN router runs top_k={router.top_k}, renormalize={router.renormalize} but the config "
                f"says num_experts_per_tok={config.num_experts_per_tok}, norm_topk_prob={config.norm_topk_prob}; "
                "set the config to the routing you want exported"
            )
