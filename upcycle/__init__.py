"""upcycle: turn dense pretrained checkpoints into Mixture-of-Experts models.

    moe = upcycle.convert(model, method="sparse_upcycling", num_experts=8, top_k=2)
    check = upcycle.verify(moe, model)           # max |moe(x) - dense(x)|, and per layer: check.passed()
    upcycle.save(moe, "out/"); moe = upcycle.load("out/")
    bam = upcycle.merge([seed, *branches], method="bam")   # BAM / BTX: dense LMs -> one MoE

The environment fixes below run before anything imports torchvision or a Hugging Face library (see ``_compat``).
"""

from ._compat import apply_environment_fixes

apply_environment_fixes()

from .adapters import list_adapters  # noqa: E402
from .config import ConvertConfig, load_convert_config  # noqa: E402
from .convert import convert  # noqa: E402
from .export import export, load, save  # noqa: E402
from .export.timm_export import register_with_timm  # noqa: E402
from .layers import list_backends, list_routers  # noqa: E402
from .models import register_on_transformers_import  # noqa: E402
from .recycling import list_methods  # noqa: E402
from .recycling.merge import merge  # noqa: E402
from .stream import convert_streaming  # noqa: E402
from .verify import verify  # noqa: E402

register_with_timm()
register_on_transformers_import()  # transformers' Auto classes learn model_type "upcycle_lm" when they load

__version__ = "0.1.0"
__all__ = [
    "ConvertConfig",
    "__version__",
    "convert",
    "convert_streaming",
    "export",
    "list_adapters",
    "list_backends",
    "list_methods",
    "list_routers",
    "load",
    "load_convert_config",
    "merge",
    "save",
    "verify",
]
