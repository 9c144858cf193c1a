"""The house rules the import contracts cannot see: family knowledge lives in ``upcycle/adapters`` only.

A model family is named in code (an identifier, or a string literal used as a name or key) only by its adapter; the
rest of upcycle asks the adapter (export formats, streaming layout, merging, activation, attention projections).
Prose (docstrings, comments, messages) may mention families; what a benchmark or preset chooses to run is data,
not knowledge, and the writers of a named export format name their format's family.
"""

import io
import re
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "upcycle"
FAMILY = re.compile(
    r"(?i)(?<![a-z])(llama|mistral|qwen2?|gpt2|gpt_2|bert|vit|deit|cait|convnext|dinov2|eva(?:02)?|swin|gemma|phi3?|"
    r"olmo)(?![a-z])"
)
# export formats (named after the model that loads them)
FORMAT_NAMES = re.compile(r"(?i)qwen[23]_moe|mixtral|flex_?olmo")
NAME_LIKE = re.compile(r"^[\w.:/-]*$")  # a literal used as a name, key or path (no spaces)
ALLOWED = {  # path under upcycle/ (a folder ends in /) -> why it may name families
    "adapters/": "the home of family knowledge",
    "export/mixtral.py": "the writer of a named format",
    "export/qwen2_moe.py": "the writer of a named format",
    "export/qwen3_moe.py": "the writer of a named format",
    "export/flex_olmo.py": "the writer of a named format",
    "export/granitemoe.py": "the writer of a named format",
    "export/cohere2_moe.py": "the writer of a named format",
    "export/ernie4_5_moe.py": "the writer of a named format",
    "export/hunyuan_v1_moe.py": "the writer of a named format",
    "export/gguf.py": "the writer of a named format (llama.cpp's architectures)",
    "export/gguf_vocab.py": "the writer of a named format (its tokenizer part)",
    "export/hf_moe_common.py": "what the Mixtral and Qwen2/3-MoE writers share",
    "export/timm_export.py": "the writer of a named format",
    "export/bam.py": "the writer of a named format",
    "pretrain.py": "the presets it pre-trains, by timm architecture (a choice of models, not knowledge of one)",
    "bench/": "the models a benchmark runs",
    "methods/jetpack/bench.py": "the models a benchmark runs",
    "methods/d2dmoe/bench.py": "the models a benchmark runs",
    "methods/bam/bench.py": "the models a benchmark runs",
}


def family_names_in_code(source: str) -> list[tuple[int, str]]:
    """(line, token) for every identifier or name-like string literal that names a model family."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME:
            text = token.string
        elif token.type == tokenize.STRING:
            body = token.string.lstrip("rbuRBUfF")
            if body.startswith(('"""', "'''")) or not NAME_LIKE.match(body[1:-1]):
                continue  # a docstring or a message: prose may mention a family
            text = body[1:-1]
        else:
            continue  # comments, numbers, operators
        words = FORMAT_NAMES.sub(" ", text).replace("_", " ").replace(".", " ")
        if FAMILY.search(words):
            found.append((token.start[0], text))
    return found


def _allowed(relative: str) -> bool:
    return any(relative == key or (key.endswith("/") and relative.startswith(key)) for key in ALLOWED)


def test_no_model_family_is_named_outside_the_adapters():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if not _allowed(relative):
            offenders += [f"upcycle/{relative}:{line}: {text}" for line, text in family_names_in_code(path.read_text())]
    assert not offenders, "family knowledge outside upcycle/adapters (ask the adapter instead):\n" + "\n".join(
        offenders
    )


@pytest.mark.parametrize(
    ("code", "named"),
    [
        ('if record["adapter"] == "hf_llama":\n    pass\n', ["hf_llama"]),
        ('SOURCE_TYPES = ("llama", "mistral")\n', ["llama", "mistral"]),
        ("def _is_bert_ffn_output(name):\n    return name\n", ["_is_bert_ffn_output"]),
        ("from .adapters.timm_vit_projections import f\n", ["timm_vit_projections"]),
        ('"""A ViT, a Llama."""\nraise ValueError("not a Llama-style checkpoint")  # Llama\n', []),
        ('FORMATS = ("mixtral", "qwen2_moe", "timm")\n', []),
    ],
)
def test_the_scan_finds_family_names_in_code_and_leaves_prose_and_format_names(code, named):
    assert [text for _, text in family_names_in_code(code)] == named


def test_every_allowed_path_exists():
    for key in ALLOWED:
        assert (PACKAGE / key).exists(), f"ALLOWED names upcycle/{key}, which is gone: drop it"


def test_adapter_facts_are_consistent():
    from upcycle.adapters.base import all_adapters
    from upcycle.export import EXPORT_FORMATS

    for adapter in all_adapters():
        assert set(adapter.export_formats) <= set(EXPORT_FORMATS.names()), adapter.name
        assert bool(adapter.streaming_model_types) == (adapter.checkpoint_layout is not None), adapter.name
        if adapter.merge_model_types:
            assert set(adapter.block_modules) == {"ffn", "attention"} and len(adapter.attention_projections) == 4


def test_every_import_statement_in_the_package_resolves():
    """Imports inside functions run only when their function does; after a module moves, one that names the old
    place fails late, in a user's run. Resolve every ``from upcycle... import name`` statically here."""
    import ast
    import importlib

    unresolved = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            parts = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
            target = ".".join([*parts, node.module] if node.module else parts) if node.level else node.module
            if not target or not target.startswith("upcycle"):
                continue
            imported = importlib.import_module(target)
            for alias in node.names:
                if not hasattr(imported, alias.name):
                    try:
                        importlib.import_module(f"{target}.{alias.name}")
                    except ImportError:
                        unresolved.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {target}.{alias.name}")
    assert not unresolved, "imports that fail when their code runs:\n" + "\n".join(unresolved)
