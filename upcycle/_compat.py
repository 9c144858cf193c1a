"""Environment fixes applied before any torchvision / Hugging Face import.

1. Offline by default: Hugging Face libraries read ``HF_HUB_OFFLINE`` when they are imported, so it is set
   here (``setdefault``: a user who exports ``HF_HUB_OFFLINE=0`` keeps hub access). upcycle never fetches from a
   model hub at run time.
2. The torchvision wheel on PyPI is a CUDA build. Next to a CPU-only torch its compiled ``_C`` library fails to
   load, and ``import torchvision`` (hence ``import timm`` and transformers' model classes) then dies with
   ``operator torchvision::nms does not exist`` while registering fake kernels. We define the missing operator
   schemas so the import succeeds; only torchvision's detection ops stay unusable. The fix is applied only when
   the import would fail: if the real library loads (a GPU machine with a matching torchvision) nothing changes.
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


def apply_environment_fixes() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if _torchvision_ops_missing():
        library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            library.define(schema)
        _library_keepalive.append(library)
