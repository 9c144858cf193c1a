"""The errors a user can act on, and the checks that raise them at the boundaries (CLI, config, sources, saves).

``UserError`` is a ``ValueError``: callers that catch ``ValueError`` keep working. The CLI prints its message (one
to three lines that say what to change) without a traceback and exits with its ``exit_code``: 2 for bad input (a
flag, a config value, a damaged or unsuitable checkpoint), 1 for a run that failed (:class:`RunFailed`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import yaml


class UserError(ValueError):
    """Bad input the user can fix: a flag, a config key or value, a checkpoint, an output directory."""

    exit_code = 2


class RunFailed(UserError):
    """The input was fine but the run could not finish: the output is in use, the training diverged."""

    exit_code = 1


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """Names of the first ``limit`` floating-point tensors that hold NaN or Inf (meta tensors are skipped)."""
    bad = []
    for name, tensor in tensors:
        if tensor.is_floating_point() and not tensor.is_meta and not all_finite(tensor):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no Inf. The minimum and maximum propagate NaN and show ±Inf: two reductions that copy nothing,
    ~60x faster on a CPU than ``isfinite(tensor).all()``, which first writes a boolean tensor as large as the input
    (seconds per converted model, where streaming conversion checks every tensor it writes)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str, hint: str) -> None:
    """Refuse weights with NaN or Inf, naming the first offending tensors; ``hint`` says what to do about it."""
    bad = first_non_finite(tensors)
    if bad:
        more = ", ..." if len(bad) == 3 else ""
        raise UserError(f"{what} contains NaN or Inf in {', '.join(bad)}{more}; {hint}")


def positive_finite(value: float | None, flag: str) -> float | None:
    """``value`` if it is None or a finite number > 0, else a UserError naming ``flag``."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag} must be a finite number > 0, got {value}")
    return value


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule: PyYAML follows YAML 1.1, where ``3e-3`` (no dot) is a
    string, and strict recipe types would then refuse the way everybody writes a learning rate."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """YAML text as recipes read it (safe, and ``1e-3`` is a float)."""
    return yaml.load(text, Loader=RecipeLoader)  # safe: RecipeLoader is a SafeLoader (no Python objects)


def read_yaml(path, what: str = "recipe"):
    """A YAML file's content; a syntax error names the file, line and column instead of a parser traceback."""
    try:
        return parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{what} {path} is not valid YAML:{where}: {problem}; fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text file; give a YAML recipe") from None


def yaml_mapping(path, what: str = "recipe") -> dict:
    """A YAML file that must hold a mapping at its top level (empty: {})."""
    data = read_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys (key: value lines), got a {type(data).__name__}")
    return data
