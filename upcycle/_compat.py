"""The one fix ``import upcycle`` applies, and only where an import would otherwise fail.

The torchvision wheel on PyPI is a CUDA build. Next to a CPU-only torch its compiled ``_C`` library fails to load,
and ``import torchvision`` (hence ``import timm`` and transformers' model classes) then dies with ``operator
torchvision::nms does not exist`` while registering fake kernels. We define the missing operator schemas so the
import succeeds; only torchvision's detection ops stay unusable. If the real library loads (a GPU machine with a
matching torchvision), or torchvision is not installed, nothing is touched.

Nothing else in the process changes: no environment variable (``HF_HUB_OFFLINE`` is the caller's choice: the
Makefile and the tests set it, a user's hub ids need the network), no import hook.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library_keepalive: list[torch.library.Library] = []  # a Library's definitions live as long as the object


def _torchvision_ops_missing() -> bool:
    """True when torchvision is installed but its compiled operators cannot be registered."""
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False  # already registered (torchvision imported fine, or the fix ran)
    except RuntimeError:
        pass
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False  # torchvision not installed: nothing to fix
    package_dir = next(iter(spec.submodule_search_locations))
    for library in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(library)  # torchvision's own import loads it again: dlopen is idempotent
            return False
        except OSError:
            continue
    return True


def fix_torchvision_operators() -> None:
    """Define torchvision's missing operator schemas when (and only when) its compiled library cannot load."""
    if _torchvision_ops_missing():
        library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            library.define(schema)
        _library_keepalive.append(library)
