"""Recipes that ship with upcycle, found by name: each method's in its home (``upcycle/methods/<method>/recipes``),
the dense pre-training ones here. Wherever a recipe or config file is asked for, a built-in name works too:

    upcycle run jetpack_mnist5k                     # = upcycle/methods/jetpack/recipes/jetpack_mnist5k.yaml
    upcycle pretrain vit_xs --config pretrain_vit_xs_fashion_mnist
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

_PACKAGE = Path(__file__).resolve().parents[1]


def list_recipes() -> dict[str, Path]:
    """Every built-in recipe: name -> file."""
    files = [*Path(__file__).parent.glob("*.yaml"), *_PACKAGE.glob("methods/*/recipes/*.yaml")]
    return {path.stem: path for path in sorted(files, key=lambda p: p.stem)}


def recipe_file(source: str | Path, what: str = "recipe") -> Path:
    """A recipe or config given as a path, or as the name of a built-in recipe (``jetpack_mnist5k``)."""
    path = Path(source)
    if path.is_file():
        return path
    builtin = list_recipes().get(path.name.removesuffix(".yaml")) if path.parent == Path(".") else None
    if builtin is not None:
        return builtin
    if path.exists():
        raise UserError(f"{what} {path} is not a file; give a YAML file or a built-in recipe name")
    raise FileNotFoundError(
        f"{what} {path} does not exist, and it is not a built-in recipe; built-in: {', '.join(list_recipes())}"
    )
