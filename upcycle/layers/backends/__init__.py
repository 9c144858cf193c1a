"""Expert compute backends for sparse routing, registered by name.

Every backend has the signature ``fn(experts, x [t, d], indices [t, k], weights [t, k], mask [t, k] | None) -> [t, d]``
and returns the weighted sum of the selected experts' outputs (the shared bias is the caller's). ``eager`` is the
reference; every other backend is tested against it on outputs and gradients. A GPU kernel registers here too.
"""

from __future__ import annotations

from collections.abc import Callable

_BACKENDS: dict[str, Callable] = {}


def register_backend(name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        if name in _BACKENDS:
            raise ValueError(f"backend {name!r} is registered twice")
        _BACKENDS[name] = fn
        return fn

    return decorator


def get_backend(name: str) -> Callable:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown expert backend {name!r}; registered: {list_backends()}") from None


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


from . import eager, grouped, sorted_pairs  # noqa: E402,F401  (registration side effect)
