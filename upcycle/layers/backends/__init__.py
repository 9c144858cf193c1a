"""Expert compute backends for sparse routing, registered by name.

Every backend has the signature ``fn(experts, x [t, d], indices [t, k], weights [t, k], mask [t, k] | None) -> [t, d]``
and returns the weighted sum of the selected experts' outputs (the shared bias is the caller's). ``eager`` is the
reference; every other backend is tested against it on outputs and gradients. A GPU kernel registers here too.
"""

from . import auto, eager, grouped, grouped_mm, sorted_pairs  # noqa: F401  (registration side effect)
from .registry import get_backend, list_backends, register_backend

__all__ = ["get_backend", "list_backends", "register_backend"]
