"""upcycle: turn dense pretrained checkpoints into Mixture-of-Experts models.

    moe = upcycle.convert(model, method="sparse_upcycling", num_experts=8, top_k=2)
    check = upcycle.verify(moe, model)           # max |moe(x) - dense(x)|, and per layer: check.passed()
    upcycle.record_of(moe)                       # what was converted from what, and how (saved as config.json)
    upcycle.save(moe, "out/"); moe = upcycle.load("out/")
    bam = upcycle.merge([seed, *branches], method="bam")   # BAM / BTX: dense LMs -> one MoE

Importing upcycle changes nothing in the process (no environment variable, no import hook). On a CPU-only torch it
defines torchvision's missing operator schemas, only where ``import torchvision`` would otherwise fail (see
``_compat``): import upcycle before timm there. To load exported models through timm's or transformers' own
loaders, ``register_with_timm()`` / ``register_with_transformers()`` (done at import for a library already imported).
"""

import sys as _sys

from ._compat import fix_torchvision_operators

fix_torchvision_operators()

from . import methods  # noqa: E402,F401  (registers every method's recycling functions and routers)
from .adapters import list_adapters  # noqa: E402
from .config import ConvertConfig, load_convert_config  # noqa: E402
from .convert import convert  # noqa: E402
from .export import export, load, save  # noqa: E402
from .export.timm_export import register_with_timm  # noqa: E402
from .layers import list_backends, list_routers  # noqa: E402
from .methods.bam.merge import merge  # noqa: E402
from .models import register as register_with_transformers  # noqa: E402
from .models import register_loaded  # noqa: E402
from .record import ConversionRecord, copy_model, record_of  # noqa: E402
from .recycling import list_methods  # noqa: E402
from .routers_from_data import init_routers_from_data  # noqa: E402
from .stream import convert_streaming  # noqa: E402
from .verify import verify  # noqa: E402

if "timm" in _sys.modules:  # imported before upcycle: register now (never imports timm or transformers itself)
    register_with_timm()
register_loaded()  # the Auto classes transformers has already imported learn model_type upcycle_lm / upcycle_bam

__version__ = "0.1.0"
__all__ = [
    "ConversionRecord",
    "ConvertConfig",
    "__version__",
    "convert",
    "convert_streaming",
    "copy_model",
    "export",
    "init_routers_from_data",
    "list_adapters",
    "list_backends",
    "list_methods",
    "list_routers",
    "load",
    "load_convert_config",
    "merge",
    "record_of",
    "register_with_timm",
    "register_with_transformers",
    "save",
    "verify",
]
