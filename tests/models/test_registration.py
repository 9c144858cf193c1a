"""upcycle.models registers upcycle_lm with transformers' Auto API, lazily: importing the package (and installing
the hook) imports nothing from transformers; loading transformers' Auto modules then registers the classes."""

import subprocess
import sys

import pytest
import transformers

import upcycle.models
from upcycle.models.lm import UpcycleLMConfig, UpcycleLMForCausalLM, UpcycleLMModel

from .helpers import tiny_lm

FRESH_PROCESS = """
import sys
import upcycle
had_transformers = "transformers" in sys.modules
import upcycle.models
upcycle.models.register_on_transformers_import()
assert ("transformers" in sys.modules) == had_transformers, "importing upcycle.models imported transformers"
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(type(model).__name__, type(transformers.AutoConfig.from_pretrained(sys.argv[1])).__name__)
"""


def test_a_fresh_process_loads_a_checkpoint_through_auto_classes(tmp_path):
    tiny_lm().save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", FRESH_PROCESS, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["UpcycleLMForCausalLM", "UpcycleLMConfig"]


def test_registration_is_idempotent():
    upcycle.models.register()
    upcycle.models.register()
    upcycle.models.register_on_transformers_import()
    assert type(transformers.AutoConfig.for_model("upcycle_lm")) is UpcycleLMConfig
    config = UpcycleLMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    assert type(transformers.AutoModelForCausalLM.from_config(config)) is UpcycleLMForCausalLM
    assert type(transformers.AutoModel.from_config(config)) is UpcycleLMModel
    assert sum(type(f).__name__ == "_AutoModuleHook" for f in sys.meta_path) == 1


def test_lazy_names_and_class_lookup():
    assert upcycle.models.UpcycleLMForCausalLM is UpcycleLMForCausalLM
    assert "UpcycleLMConfig" in dir(upcycle.models)
    assert upcycle.models.get_model_class("UpcycleLMModel") is UpcycleLMModel
    assert upcycle.models.get_model_class("LlamaForCausalLM") is None
    with pytest.raises(AttributeError):
        upcycle.models.NoSuchModel  # noqa: B018
