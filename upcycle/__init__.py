"""upcycle: turn dense pretrained checkpoints into Mixture-of-Experts models.

The environment fixes below run before anything imports torchvision or a Hugging Face library (see ``_compat``).
"""

from ._compat import apply_environment_fixes

apply_environment_fixes()

from .layers import list_backends, list_routers  # noqa: E402

__version__ = "0.1.0"
__all__ = ["__version__", "list_backends", "list_routers"]
