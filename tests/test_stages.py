"""Pipeline stages: a finished stage is reused only for the recipe it was built from; bookkeeping does not count."""

import json

import pytest
import torch
from torch import nn

from tests.models.helpers import tiny_lm
from upcycle.stages import cached_stage, save_stage

RECIPE = {"mix": {"lr": 1e-4, "steps": 150, "checkpoint_every": 200, "log_every": 10}, "branches": [{"seed": 0}]}


def finished_stage(directory, fingerprint) -> nn.Module:
    """Build a stage under ``fingerprint`` once; returns the model it saved."""

    def build():
        model = tiny_lm()
        save_stage(model, directory)
        return model

    return cached_stage(directory, fingerprint, build, redo=False)


def test_a_stage_is_reused_when_only_its_checkpoint_and_log_cadence_changed(tmp_path):
    built = finished_stage(tmp_path, RECIPE)
    cadence = {**RECIPE, "mix": {**RECIPE["mix"], "checkpoint_every": 50, "keep_checkpoints": 3, "log_every": 5}}
    again = cached_stage(tmp_path, cadence, lambda: pytest.fail("rebuilt a finished stage"), redo=False)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in built.state_dict().items())


@pytest.mark.parametrize("changed", [{"mix": {**RECIPE["mix"], "lr": 2e-4}}, {"branches": [{"seed": 1}]}])
def test_a_stage_of_another_recipe_is_refused_and_kept(tmp_path, changed):
    finished_stage(tmp_path, RECIPE)
    key = next(iter(changed))
    with pytest.raises(ValueError, match=rf"another recipe \(changed: {key}\)"):
        cached_stage(tmp_path, {**RECIPE, **changed}, lambda: pytest.fail("built over another stage"), redo=False)
    assert json.loads((tmp_path / "stage.json").read_text()) == RECIPE
