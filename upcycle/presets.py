"""Each method's decisions, point by point: what its paper says, what its authors' released code does, what we do.

A method's home lists its :class:`Choice` records in ``choices.py`` and registers them under the name a recipe
uses for it (``METHOD_CHOICES.add("moe_jetpack", CHOICES)``; the convert method, or the ``d2dmoe`` / ``bam``
section). From that one list come

- the two presets, ``paper`` and ``released`` (``--preset`` on ``upcycle run / convert / d2dmoe / bam``): every choice
  that is a recipe switch set to that source's value, on top of the recipe and under the user's ``--set`` flags;
- the table on the method's page under ``docs/methods/`` (a test regenerates and compares it).

A choice's ``field`` is a dotted path into a whole ``upcycle run`` recipe (``d2dmoe.sparsify.aux.sparsity_kind``,
``convert.router.options.key_norm``). A choice without a field is documentation only: a fixed bug or a difference
we do not offer (``why`` says which). :data:`NOT_STATED` marks a value the source does not give; a preset leaves such
a field as the recipe has it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from .errors import UserError
from .registry import Registry

PRESETS = ("paper", "released")
Preset = Literal["paper", "released"]
NOT_STATED = "not stated"


@dataclass(frozen=True)
class Choice:
    point: str  # the decision, in words
    paper: Any  # what the paper says (NOT_STATED when it is silent)
    released: Any  # what the authors' released code does (NOT_STATED when there is none or it is silent)
    ours: Any  # our default
    field: str = ""  # the dotted recipe field a preset sets; "" for a documented difference that is not a switch
    why: str = ""  # why ours is ours (or what was fixed)

    def value(self, preset: Preset) -> Any:
        return self.paper if preset == "paper" else self.released


METHOD_CHOICES: Registry[tuple[Choice, ...]] = Registry("method choices")


def method_choices(method: str) -> tuple[Choice, ...]:
    """The choices registered for a convert method (``moe_jetpack``) or a pipeline section (``d2dmoe``, ``bam``)."""
    if method not in METHOD_CHOICES.names():
        known = ", ".join(METHOD_CHOICES.names())
        raise UserError(f"no paper / released presets for {method!r}; they exist for {known}")
    return METHOD_CHOICES.get(method)


def preset_values(choices: tuple[Choice, ...], preset: Preset) -> dict[str, Any]:
    """dotted field -> value of every switch the preset sets."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {
        choice.field: copy.deepcopy(choice.value(preset))
        for choice in choices
        if choice.field and choice.value(preset) != NOT_STATED
    }


def apply_preset(recipe: dict, method: str, preset: Preset, section: str | None = None) -> dict:
    """The recipe with the preset's values set (a copy). ``recipe`` is a whole run recipe, or with ``section`` given
    (``d2dmoe``, ``bam``, ``convert``) that section alone; fields of other sections are then left out."""
    result = copy.deepcopy(recipe)
    for field, value in preset_values(method_choices(method), preset).items():
        head, _, path = field.partition(".")
        if section is None:
            set_dotted(result, field, value)
        elif head == section:
            set_dotted(result, path, value)
    return result


def set_dotted(mapping: dict, field: str, value: Any) -> None:
    """``mapping[a][b][c] = value`` for ``field = "a.b.c"``, creating the mappings on the way."""
    *parents, last = field.split(".")
    for key in parents:
        child = mapping.setdefault(key, {})
        if child is None:
            child = mapping[key] = {}
        if not isinstance(child, dict):
            raise UserError(f"cannot set {field}: {key} is {child!r}, not a mapping")
        mapping = child
    mapping[last] = value


def choices_table(choices: tuple[Choice, ...]) -> str:
    """The docs table: point | paper | released code | ours | recipe field | why."""
    rows = ["| point | paper | released code | ours | recipe field | why |", "|---|---|---|---|---|---|"]
    for c in choices:
        values = [_cell(value, code=bool(c.field)) for value in (c.paper, c.released, c.ours)]
        cells = [c.point, *values, f"`{c.field}`" if c.field else "", c.why]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def _cell(value: Any, code: bool) -> str:
    """A recipe value as code (YAML-like JSON); prose and NOT_STATED as they are."""
    if value == NOT_STATED or (isinstance(value, str) and not code):
        return value
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"
