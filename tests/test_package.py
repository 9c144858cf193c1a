"""The package surface: registries, the CLI shell, atomic writes (a fresh import: tests/test_fresh_process.py)."""

import argparse
from pathlib import Path

import pytest

import upcycle
from upcycle.atomic import atomic_directory, atomic_write_text
from upcycle.cli import build_parser, main


def test_registries():
    routers = ["cmoe", "dynamic_k", "moefication", "sigmoid", "soft", "soft_attention", "sphero", "topk"]
    assert upcycle.list_routers() == routers
    assert {m["name"] for m in upcycle.list_methods()} >= {"sparse_upcycling", "neuron_split", "d2dmoe", "moefication"}
    assert upcycle.list_backends() == ["auto", "eager", "grouped", "grouped_mm", "sorted"]


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert {"cmoe", "dynamic_k", "moefication", "sigmoid", "soft", "soft_attention", "sphero", "topk"} <= lines
    assert {"eager", "grouped", "grouped_mm", "sorted"} <= lines


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in _subcommands())


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_every_cli_argument_is_explained():
    unexplained = [
        f"{name} {action.dest}"
        for name, parser in _subcommands().items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert unexplained == []


def test_cli_rejects_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_cli_rounds_only_for_the_layers_benchmark(capsys):
    assert main(["bench", "convert", "--quick", "--rounds", "2"]) == 2
    assert "--rounds applies to the layers benchmark only" in capsys.readouterr().err


def test_atomic_write_replaces_whole_file(tmp_path: Path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "weights.safetensors").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_existing_unless_overwrite(tmp_path: Path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(target):
        pass
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
